"""Serving many adapters on one base model (S-LoRA style): an adapter pool and a batched engine.

    from lorakit.serve import AdapterPool, Engine, Request

    pool = AdapterPool("adapters/", budget_bytes=512 << 20)
    engine = Engine(model, tokenizer, pool, max_batch=16)
    results = engine.generate([Request(ids, adapter="fr"), Request(ids2, adapter="de"), Request(ids3)])
"""

from lorakit.serve.cache import AdapterPool, LoadedAdapter, PoolStats
from lorakit.serve.engine import Engine, Request, Result, ServingLinear, TokenEvent, parse_rank_groups

__all__ = ["AdapterPool", "Engine", "LoadedAdapter", "PoolStats", "Request", "Result", "ServingLinear", "TokenEvent",
           "parse_rank_groups"]
