"""Trans-LoRA on a real small model: BBC News topic labelling, SmolLM2-135M -> another base
(the numbers `benchmarks/beyond.py` reports).

Task: prompt "Article: {first `snippet_chars` characters of a BBC News article}\\nTopic:",
answer " business" | " entertainment" | " politics" | " sport" | " tech". Accuracy is
closed-set: the label with the highest Σ log p(label tokens | prompt) wins (zero-shot models
get the same closed choice, so they are above chance when they understand the prompt).

Source: SmolLM2-135M-Instruct (`smollm2-135m`) + a LoRA trained on `n_train` real examples.
Target, by `target`:
    "pruned"          SmolLM2 with LoRAM structured pruning (`lorakit.prune.loram`, criterion
                      "random", `prune_ratio` of the MLP channels removed in every layer; attention
                      kept: SmolLM2 has only 3 KV groups): other weights *and shapes*, so the
                      source LoRA cannot be reused as it is;
    "pruned-reduced"  (default) the same, plus vocabulary reduction (`lorakit.lang.reduce`) to the
                      tokens an English Bible corpus uses (KJV, `vocab_texts` chapters): a different
                      tokenizer (other ids; news words split into other pieces), so only text can
                      cross between the models (sequence-level distillation);
    an alias / dir    any causal LM `lorakit.models.load_model` opens (e.g. "gemma3-270m" once its
                      packages are installed; they are not on this machine).
Rows of the result (held-out test accuracy):
    source_base, source_lora                       the source without / with its LoRA
    target_base                                    the target zero-shot
    target_real_lora                               a LoRA trained on the target on the same real
                                                   examples as the source LoRA (the upper reference)
    target_trans_lora                              Trans-LoRA: 5 seeds + discriminator + distillation
    target_trans_lora_unfiltered (optional)        the paper's ablation without the discriminator
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

import lorakit
from lorakit.errors import ConfigError
from lorakit.methods.lora import LoraConfig
from lorakit.transfer.trans_lora import (
    Example,
    TransferError,
    TransLoraConfig,
    TransLoraReport,
    fit_lora,
    only_active,
    transfer_lora,
)

TEMPLATE = "Article: {input}\nTopic:"
TARGETS = ("pruned", "pruned-reduced")


def snippet(text: str, chars: int) -> str:
    """The article's first `chars` characters (whitespace collapsed), cut at a word boundary."""
    flat = " ".join(text.split())
    if len(flat) <= chars:
        return flat
    cut = flat[:chars]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def bbc_topic_examples(split: str, n: int, snippet_chars: int = 240, seed: int = 0) -> tuple[list[Example], list[str]]:
    """(n examples of (snippet, " label"), label names) from `lorakit.data.bbc_news(split)`."""
    from lorakit.data import bbc_news

    texts, labels, names = bbc_news(split, seed=seed)
    if n > len(texts):
        raise ConfigError(f"asked for {n} {split} examples, BBC News has {len(texts)}")
    return [Example(snippet(t, snippet_chars), " " + names[y]) for t, y in zip(texts[:n], labels[:n])], names


@torch.no_grad()
def choice_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str], choices: Sequence[str]) -> torch.Tensor:
    """(n, k) Σ log p(choice tokens | prompt) for every prompt and choice. The prompt runs once;
    its KV cache is repeated for the k choices (equal to scoring each prompt + choice in full,
    `completion_logprobs`, at 1/k of the prompt cost)."""
    cand = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    if not cand or any(len(c) == 0 for c in cand):
        raise ConfigError(f"every choice needs at least one token, got {list(choices)!r}")
    k, width = len(cand), max(len(c) for c in cand)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = next(model.parameters()).device
    out = torch.empty(len(prompts), k)
    was_training = model.training
    model.eval()
    try:
        for i, p in enumerate(prompts):
            ids = torch.tensor([tokenizer(p)["input_ids"]], device=dev)  # (1, T)
            cache = DynamicCache(config=model.config) if width > 1 else None
            res = model(input_ids=ids, cache=cache, use_cache=width > 1, logits_to_keep=1)
            first = res.logits[0, -1].float().log_softmax(-1)  # (V,)
            score = torch.stack([first[c[0]] for c in cand])
            if width > 1:
                cache.batch_repeat_interleave(k)
                rest = torch.full((k, width - 1), pad, dtype=torch.long)
                att = torch.zeros((k, ids.shape[1] + width - 1), dtype=torch.long)
                att[:, : ids.shape[1]] = 1
                for j, c in enumerate(cand):
                    rest[j, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                    att[j, ids.shape[1]: ids.shape[1] + len(c) - 1] = 1
                lp = model(input_ids=rest.to(dev), attention_mask=att.to(dev), cache=cache,
                           use_cache=True).logits.float().log_softmax(-1)  # (k, width-1, V)
                for j, c in enumerate(cand):
                    if len(c) > 1:
                        score[j] = score[j] + lp[j, torch.arange(len(c) - 1), torch.tensor(c[1:])].sum()
            out[i] = score.cpu()
    finally:
        model.train(was_training)
    return out


def label_accuracy(model: nn.Module, tokenizer, examples: Sequence[Example], label_names: Sequence[str],
                   template: str = TEMPLATE, adapters: Sequence[str] = ()) -> float:
    """Closed-set accuracy: argmax over labels of Σ log p(" label" | prompt), only `adapters` active."""
    cands = [" " + n for n in label_names]
    prompts = [template.replace("{input}", e.input) for e in examples]
    with only_active(model, list(adapters)):
        scores = choice_logprobs(model, tokenizer, prompts, cands)
    gold = torch.tensor([cands.index(e.output) for e in examples])
    return float((scores.argmax(1) == gold).float().mean())


def make_target(kind: str, source_base: nn.Module, source_tokenizer, prune_ratio: float = 0.2,
                vocab_texts: int = 300, seed: int = 0) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(target model, its tokenizer, description) for `kind` in TARGETS or a model alias / dir.
    `source_base` must not carry adapters yet (it is copied)."""
    if kind in TARGETS:
        from lorakit.prune import LoramConfig, loram_prune

        if lorakit.adapter_names(source_base):
            raise ConfigError("make_target copies the source base: build the target before injecting adapters")
        # random MLP channels only: SmolLM2 has 3 KV groups (one is a third of attention), and the
        # magnitude criterion at even 10% of the channels leaves SmolLM2 writing only newlines
        target, _ = loram_prune(source_base, LoramConfig(ratio=prune_ratio, criterion="random",
                                                         prune_attention=False, seed=seed))
        tok = source_tokenizer
        info: dict[str, Any] = {"kind": kind, "prune_ratio": prune_ratio, "criterion": "random",
                                "pruned": "MLP channels of every layer"}
        if kind == "pruned-reduced":
            from lorakit.data import english_replay_texts
            from lorakit.lang.reduce import reduce_vocabulary

            target, tok, rep = reduce_vocabulary(target, source_tokenizer, english_replay_texts()[:vocab_texts])
            info.update(vocab_before=rep["n_before"], vocab_after=rep["n_after"], vocab_corpus=f"KJV, {vocab_texts} chapters")
        return target.eval(), tok, info
    from lorakit.models import load_model

    target, tok = load_model(kind)
    return target.eval(), tok, {"kind": kind}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_transfer_benchmark(
    source: str = "smollm2-135m",
    target: str = "pruned-reduced",
    n_train: int = 64,
    n_seeds: int = 5,
    n_test: int = 200,
    snippet_chars: int = 240,
    prune_ratio: float = 0.2,
    lora: LoraConfig | None = None,
    lora_steps: int = 100,
    lora_lr: float = 1e-3,
    batch_size: int = 8,
    config: TransLoraConfig | None = None,
    overrides: dict[str, Any] | None = None,
    unfiltered: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a source LoRA on `n_train` real BBC examples, transfer it with Trans-LoRA from
    `n_seeds` of them (the discriminator sees the same `n_train` real inputs, as in the paper's
    task-finetuning stage), and compare on `n_test` held-out articles (module docstring).

    `config` overrides the transfer settings (default: distil for `lora_steps` steps at `lora_lr`
    on `n_train` filtered synthetic inputs — the same budget the real-data LoRA gets);
    `overrides` replaces single fields of it, e.g. {"generator": "source"}; `unfiltered` adds the
    paper's no-discriminator ablation row.
    Returns a JSON-ready dict: accuracy per row, the transfer report, sizes and seconds per stage.
    """
    if n_seeds > n_train:
        raise ConfigError(f"n_seeds ({n_seeds}) must not exceed n_train ({n_train}): seeds are real training examples")
    cfg = config or TransLoraConfig(
        prompt_template=TEMPLATE, output_stop="\n", single_line=True, n_synthetic=n_train, teacher_max_new_tokens=4,
        gen_max_new_tokens=snippet_chars // 3 + 16, steps=lora_steps, lr=lora_lr, batch_size=batch_size,
        disc_steps=lora_steps, seed=seed)
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in fields(TransLoraConfig)})
        if unknown:
            raise ConfigError(f"unknown TransLoraConfig field(s) in overrides: {unknown}")
        cfg = replace(cfg, **overrides)  # re-validated by __post_init__
    from lorakit.models import load_model

    lora = lora or LoraConfig(r=8, alpha=16, target="all-linear")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    src, src_tok = load_model(source)
    src.eval()
    tgt, tgt_tok, tinfo = make_target(target, src, src_tok, prune_ratio=prune_ratio, seed=seed)
    seconds["load"] = time.perf_counter() - t0
    train, names = bbc_topic_examples("train", n_train, snippet_chars, seed=seed)
    test, _ = bbc_topic_examples("test", n_test, snippet_chars, seed=seed)
    seeds = train[:n_seeds]
    prompts = [cfg.prompt(e.input) for e in train]
    comps = [e.output + (cfg.output_stop or "") for e in train]
    acc: dict[str, float] = {}

    t0 = time.perf_counter()
    acc["source_base"] = label_accuracy(src, src_tok, test, names, cfg.prompt_template)
    acc["target_base"] = label_accuracy(tgt, tgt_tok, test, names, cfg.prompt_template)
    seconds["eval_bases"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    src_losses = fit_lora(src, src_tok, prompts, comps, lora, "source", lora_steps, lora_lr, batch_size, seed=seed)
    seconds["source_lora_train"] = time.perf_counter() - t0
    acc["source_lora"] = label_accuracy(src, src_tok, test, names, cfg.prompt_template, adapters=["source"])

    t0 = time.perf_counter()
    real_losses = fit_lora(tgt, tgt_tok, prompts, comps, copy.deepcopy(lora), "real", lora_steps, lora_lr, batch_size,
                           seed=seed)
    seconds["target_real_lora_train"] = time.perf_counter() - t0
    acc["target_real_lora"] = label_accuracy(tgt, tgt_tok, test, names, cfg.prompt_template, adapters=["real"])
    lorakit.deactivate(tgt)

    t0 = time.perf_counter()
    failure = None
    try:
        _, report = transfer_lora(src, src_tok, "source", tgt, tgt_tok, seeds, cfg,
                                  discriminator_examples=[e.input for e in train])
    except TransferError as e:  # recorded as the row's result: the rows above stay measured
        failure, report = str(e), e.report or TransLoraReport(n_seeds=len(seeds))
        acc["target_trans_lora"] = None
    else:
        acc["target_trans_lora"] = label_accuracy(tgt, tgt_tok, test, names, cfg.prompt_template,
                                                  adapters=[cfg.adapter_name])
        lorakit.deactivate(tgt)
    seconds["trans_lora"] = time.perf_counter() - t0

    unfiltered_report = None
    if unfiltered:
        t0 = time.perf_counter()
        ucfg = replace(cfg, filter=False, adapter_name="trans_lora_unfiltered")
        _, urep = transfer_lora(src, src_tok, "source", tgt, tgt_tok, seeds, ucfg)
        seconds["trans_lora_unfiltered"] = time.perf_counter() - t0
        acc["target_trans_lora_unfiltered"] = label_accuracy(tgt, tgt_tok, test, names, cfg.prompt_template, adapters=[ucfg.adapter_name])
        unfiltered_report = urep.as_dict()

    tok_len = [len(src_tok(p)["input_ids"]) for p in prompts]
    return {
        "task": "bbc-news topic labelling (closed-set label log-likelihood)",
        "source": source,
        "target": tinfo,
        "sizes": {
            "source_params": _params(src), "target_params": _params(tgt),
            "source_vocab": len(src_tok), "target_vocab": len(tgt_tok),
            "n_train": n_train, "n_seeds": n_seeds, "n_test": n_test, "snippet_chars": snippet_chars,
            "prompt_tokens_mean": sum(tok_len) / len(tok_len),
        },
        "accuracy": acc,
        "chance": 1.0 / len(names),
        "losses": {"source_lora": [round(x, 4) for x in src_losses], "target_real_lora": [round(x, 4) for x in real_losses]},
        "trans_lora": report.as_dict(),
        "trans_lora_error": failure,
        "trans_lora_unfiltered": unfiltered_report,
        "config": {k: v for k, v in asdict(cfg).items() if k != "adapter"},
        "lora": lora.to_dict(),
        "lora_steps": lora_steps, "lora_lr": lora_lr, "batch_size": batch_size, "seed": seed,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
