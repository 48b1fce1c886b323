"""Vocabulary reduction (MAFT, Alabi et al., arXiv:2204.06487).

A multilingual model spends much of its parameters on embedding rows of scripts and
languages the target never uses (MAFT removed non-African-script tokens from XLM-R before
adaptive fine-tuning and shrank it by ~50%). ``reduce_vocabulary`` keeps only the tokens a
corpus actually uses (plus special tokens and, by default, the base alphabet so any text can
still be encoded), slices the embedding and LM-head rows to them, and rebuilds the tokenizer
with contiguous new ids:

    kept_ids  = sorted(used(texts) ∪ specials ∪ alphabet ∪ BPE intermediates)   (old ids, K of them)
    E'        = E[kept_ids]            (K, d)        H' = H[kept_ids]  (untied head, + bias)
    new id j  <->  old id kept_ids[j]  (order preserved)

Exactness on the corpus: every text of ``texts`` tokenises to the same pieces as before
(ids mapped by ``old_to_new``), so the reduced model gives identical logits on the kept ids:
``reduced(x')[..., j] == full(x)[..., kept_ids[j]]``. Why the tokenisation is unchanged:

- BPE applies, at each step, the lowest-ranked applicable merge. Dropping a merge that never
  fires on the corpus cannot change any step there. The merges that fire build the used tokens
  from smaller ones, so we keep the *closure* of the used tokens under their merges (the
  intermediate pieces, e.g. "Ġkw" on the way to "Ġkwambiri") and every merge whose two parts
  and result are all kept (a superset of the firing ones, all of them original merges).
- Unigram picks the best-scoring segmentation; removing pieces not in it keeps it the best.
- WordPiece takes the longest matching piece; an unused longer piece never matched.

Text outside the corpus still encodes (with ``keep_alphabet=True``) but into shorter pieces.

We rebuild a real tokenizer (edited ``tokenizer.json`` behind a copy of the transformers
wrapper, special tokens remapped, including the post-processor's BOS/EOS ids) rather than an
id-mapping wrapper around the old one: the result saves, loads and serves like any tokenizer.
``report["kept_ids"]`` / ``report["old_to_new"]`` map ids of data tokenised earlier.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.lang.vocab import (
    _BYTE_FALLBACK,
    _check_texts,
    _embeddings,
    _full_vocab_json,
    _merged,
    _merges,
    _model_type,
    _set_rows,
    _tok_json,
    _with_backend,
)

__all__ = ["reduce_vocabulary"]


def reduce_vocabulary(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    keep_special: bool = True,
    keep_alphabet: bool = True,
):
    """Keep only the vocabulary ``texts`` use; slice the model's embedding rows to it.

    Args:
        model: a transformers model whose vocabulary matches ``tokenizer`` (changed in place).
        tokenizer: its fast tokenizer.
        texts: the corpus whose tokens are kept (e.g. every target-language training text).
        keep_special: keep every added/special token (else only those used on ``texts``, the
            unknown token, and the ids the post-processor inserts).
        keep_alphabet: keep the base alphabet (the 256 byte symbols of a byte-level BPE, the
            ``<0xNN>`` byte-fallback pieces, single characters of Unigram/WordPiece) so any
            text can still be encoded.

    Returns:
        ``(model, new_tokenizer, report)``. ``report``: ``n_before``, ``n_after`` (rows),
        ``kept_ids`` (LongTensor (n_after,): old id of each new id), ``old_to_new``
        (LongTensor (n_before,), -1 for dropped ids), ``params_saved``, ``bytes_saved``
        (embedding + untied head + bias), ``bytes_before`` / ``bytes_after`` (all parameters)
        and ``fraction_saved``.
    """
    texts = _check_texts(texts)
    emb, head, tied = _embeddings(model)
    n_rows = emb.weight.shape[0]
    data = _tok_json(tokenizer)
    kind = _model_type(data)
    m = data["model"]
    vocab = _full_vocab_json(data)  # token -> old id
    if max(vocab.values()) >= n_rows:
        raise ConfigError(f"the tokenizer has ids up to {max(vocab.values())} but the model only "
                          f"{n_rows} embedding rows: they do not belong together")
    id_to_tok = {i: t for t, i in vocab.items()}

    used: set[int] = set()
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        used.update(int(i) for i in ids)
    keep = set(used)
    added = data.get("added_tokens", [])
    if keep_special:
        keep.update(t["id"] for t in added)
    keep.update(_post_processor_ids(data.get("post_processor")))
    for name in ("unk_token",):
        if m.get(name) in vocab:
            keep.add(vocab[m[name]])
    if kind == "Unigram" and m.get("unk_id") is not None:
        keep.add(int(m["unk_id"]))
    if keep_alphabet:
        keep.update(_alphabet(data, vocab))
    if kind == "BPE":
        keep = _merge_closure(m, vocab, keep)

    kept_ids = sorted(keep)
    old_to_new = torch.full((n_rows,), -1, dtype=torch.long)
    old_to_new[kept_ids] = torch.arange(len(kept_ids))
    remap = {old: new for new, old in enumerate(kept_ids)}
    kept_tokens = {id_to_tok[i] for i in kept_ids if i in id_to_tok}

    # ---- tokenizer
    if kind == "BPE":
        m["vocab"] = {t: remap[i] for t, i in m["vocab"].items() if i in remap}
        list_format = bool(m.get("merges")) and isinstance(m["merges"][0], list)
        m["merges"] = [
            [a, b] if list_format else f"{a} {b}"
            for a, b in _merges(m)
            if a in kept_tokens and b in kept_tokens and _merged(m, a, b) in kept_tokens
        ]
    elif kind == "Unigram":
        m["vocab"] = [m["vocab"][i] for i in kept_ids if i < len(m["vocab"])]
        if m.get("unk_id") is not None:
            m["unk_id"] = remap[int(m["unk_id"])]
    else:
        m["vocab"] = {t: remap[i] for t, i in m["vocab"].items() if i in remap}
    data["added_tokens"] = [dict(t, id=remap[t["id"]]) for t in added if t["id"] in remap]
    data["post_processor"] = _remap_post_processor(data.get("post_processor"), remap)
    new_tokenizer = _with_backend(tokenizer, data)

    # ---- model
    bytes_before = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    index = torch.tensor(kept_ids, dtype=torch.long, device=emb.weight.device)
    _set_rows(model, emb, head, tied, lambda w: w.index_select(0, index.to(w.device)).clone())
    if emb.padding_idx is not None:
        emb.padding_idx = remap.get(emb.padding_idx)
    _remap_config_ids(model, remap)
    bytes_after = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    removed = n_rows - len(kept_ids)
    per_row = emb.weight.shape[1] * (1 if tied or head is None else 2)
    report = {
        "n_before": n_rows,
        "n_after": len(kept_ids),
        "kept_ids": torch.tensor(kept_ids, dtype=torch.long),
        "old_to_new": old_to_new,
        "params_saved": removed * per_row + (removed if isinstance(head, nn.Linear) and head.bias is not None else 0),
        "bytes_saved": bytes_before - bytes_after,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "fraction_saved": (bytes_before - bytes_after) / bytes_before if bytes_before else 0.0,
    }
    return model, new_tokenizer, report


def _alphabet(data: dict, vocab: dict[str, int]) -> set[int]:
    """Ids of the base symbols from which any text can be built."""
    m = data["model"]
    out: set[int] = set()
    if _model_type(data) == "BPE" and "ByteLevel" in str(data.get("pre_tokenizer")):
        from tokenizers import pre_tokenizers

        out.update(vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab)
    if m.get("byte_fallback"):
        out.update(i for t, i in vocab.items() if _BYTE_FALLBACK.fullmatch(t))
    prefix = m.get("continuing_subword_prefix") or ""
    for t, i in vocab.items():
        body = t[len(prefix):] if prefix and t.startswith(prefix) else t
        if len(body) == 1:
            out.add(i)
    return out


def _merge_closure(m: dict, vocab: dict[str, int], keep: set[int]) -> set[int]:
    """``keep`` plus every token a kept token is merged from, recursively."""
    built_from = defaultdict(list)
    for a, b in _merges(m):
        built_from[_merged(m, a, b)].append((a, b))
    id_to_tok = {i: t for t, i in vocab.items()}
    stack = [id_to_tok[i] for i in keep if i in id_to_tok]
    seen = set(stack)
    while stack:
        tok = stack.pop()
        for a, b in built_from.get(tok, ()):
            for part in (a, b):
                if part not in seen and part in vocab:
                    seen.add(part)
                    stack.append(part)
    return keep | {vocab[t] for t in seen}


def _post_processor_ids(pp) -> set[int]:
    """Ids a post-processor inserts (TemplateProcessing's special_tokens, Bert/Roberta's cls/sep)."""
    out: set[int] = set()
    if isinstance(pp, dict):
        for key, value in pp.items():
            if key in ("cls", "sep") and isinstance(value, list) and len(value) == 2:
                out.add(int(value[1]))
            elif key == "ids" and isinstance(value, list):
                out.update(int(i) for i in value)
            else:
                out |= _post_processor_ids(value)
    elif isinstance(pp, list):
        for v in pp:
            out |= _post_processor_ids(v)
    return out


def _remap_post_processor(pp, remap: dict[int, int]):
    if isinstance(pp, dict):
        out = {}
        for key, value in pp.items():
            if key in ("cls", "sep") and isinstance(value, list) and len(value) == 2:
                out[key] = [value[0], remap[int(value[1])]]
            elif key == "ids" and isinstance(value, list):
                out[key] = [remap[int(i)] for i in value]
            else:
                out[key] = _remap_post_processor(value, remap)
        return out
    if isinstance(pp, list):
        return [_remap_post_processor(v, remap) for v in pp]
    return pp


def _remap_config_ids(model: nn.Module, remap: dict[int, int]) -> None:
    """bos/eos/pad/decoder-start ids of the config and generation config, in the new ids."""
    configs = [getattr(model, "config", None), getattr(model, "generation_config", None)]
    config = configs[0]
    if config is not None and hasattr(config, "get_text_config"):
        text_config = config.get_text_config()
        if text_config is not config:
            configs.append(text_config)
    for cfg in configs:
        if cfg is None:
            continue
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = getattr(cfg, key, None)
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                mapped = [remap[v] for v in value if v in remap]
                setattr(cfg, key, mapped or None)
            else:
                setattr(cfg, key, remap.get(int(value)))
