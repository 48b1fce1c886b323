"""Trans-LoRA: move a trained adapter to a new base model without the original data
(Wang et al., NeurIPS 2024, "Trans-LoRA: towards data-free Transferable Parameter Efficient
Finetuning", arXiv:2405.17258).

An adapter θ_s only works on the base M_s it was trained on. When M_s is replaced by M_t
(another size, family or tokenizer) and the task data is gone, Trans-LoRA distils
M_s + θ_s into a new adapter θ_t on M_t, on *synthetic* task inputs that a discriminator
has judged indistinguishable from real ones. Only a few real examples are kept (5 in the
paper). The stages, as implemented here:

1. Discriminator (the paper trains it at task-finetuning time, next to θ_s). Synthesize
   ρ·|D_real| inputs with the source base M_s (few-shot prompts of the seeds, step 2 below),
   then train a LoRA φ on M_s as a next-token yes/no classifier of
   "{disc_instruction}\\n\\n{x}\\n\\nAnswer:" -> " yes" (real) | " no" (synthetic):

       s_φ(x)          = z_yes(x) − z_no(x)      logits of the two answer tokens at the last position
       p_φ(real | x)   = σ(s_φ(x))               (the softmax restricted to the two answers)
       L_disc          = − Σ_{x real} w₁ log σ(s_φ(x)) − Σ_{x synth} w₀ log(1 − σ(s_φ(x))),
                         w_c = 1 / n_c  (balanced classes)

2. Synthetic inputs for the transfer. The generator (the *target* base M_t by default — the
   paper's Fig. 1: "the target model is used to synthesize data for transfer"; or the source
   base) continues a few-shot prompt of `shots` randomly chosen seed inputs separated by "###"
   lines, sampling at `gen_temperature` / `gen_top_p`, and stops at the next "###". Candidates
   are cleaned (lorakit.data.augment: charset and length checks, copies of seeds, exact and
   near duplicates by shingle Jaccard) and kept iff

       p_φ(real | x) ≥ τ                         (τ = 0.5: the discriminator's own decision)

   Rounds of `candidates_per_round` candidates repeat until `n_synthetic` inputs are kept or
   `max_rounds` is reached (the paper keeps generating until the filtered set is as large as
   the original training set).

3. Teacher outputs: y(x) = greedy decoding of M_s + θ_s on prompt(x) = prompt_template.format(input=x),
   cut at `output_stop`.

4. Distillation into a fresh adapter θ_t on M_t (by default the source adapter's own config:
   same method, rank, targets), AdamW on θ_t only:

       sequence KD (any tokenizers):   L = − 1/|y| Σ_t log p_{M_t+θ_t}(y_t | prompt(x), y_<t)
       logit KD (same vocabulary):     L = T² · 1/|y| Σ_t KL( softmax(z^{s}_t / T) ‖ softmax(z^{t}_t / T) )

   where z^s are the teacher's (M_s + θ_s) and z^t the student's logits on the completion
   positions. Across tokenizers only the text crosses between the models.

Deviations from the paper (see also the issue note): the discriminator is trained with the
two-way softmax over the answer tokens instead of the full-vocabulary LM loss on the answer word
(same decision rule, no probability mass wasted on other tokens); generation uses a plain
completion-style few-shot prompt instead of an instruction/chat prompt, so base and instruct
models both work; the filter keeps p ≥ τ per sample (τ configurable) rather than only the argmax.

    from lorakit.transfer import TransLoraConfig, transfer_lora
    target, report = transfer_lora(src, src_tok, "default", tgt, tgt_tok, seeds,
                                   TransLoraConfig(prompt_template="Article: {input}\\nTopic:"))
    lorakit.save(target, "out/trans_lora", name="trans_lora")
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import string
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.core.adapter import AdapterConfig, check_positive_int, check_range
from lorakit.core.inject import adapter_modules, adapter_names, check_not_merged, plan_injection, state
from lorakit.data.augment import FilterConfig, as_records, dedup, filter_generated, normalize_text
from lorakit.errors import AdapterError, ConfigError, LorakitError
from lorakit.methods.lora import LoraConfig

GENERATORS = ("target", "source")
KD_MODES = ("sequence", "logits")
DEFAULT_GENERATION_TEMPLATE = (
    "Below are examples of inputs of one task, each after a line with ###. "
    "Write one more input of the same kind.\n\n{examples}"
)
DEFAULT_DISC_INSTRUCTION = "Is the following a real input of the task (not a synthetic one)?"
IGNORE = -100


class TransferError(LorakitError, RuntimeError):
    """A transfer stage produced nothing to continue with (e.g. no synthetic input passed the filter).

    `report` holds what the stages before the failure measured (a `TransLoraReport`, or None)."""

    def __init__(self, message: str, report: TransLoraReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class TransLoraConfig:
    """Settings of one Trans-LoRA transfer (module docstring for the equations).

    Task format — prompt_template: how an input becomes the model prompt ("{input}" once,
        e.g. "Article: {input}\\nTopic:"), the same template the source adapter was trained with;
        output_stop: the teacher's output ends at this string (None: at EOS / the token limit);
        it is appended to the distillation targets so the student learns to stop too.
    Synthesis — generator: "target" (paper) or "source" base model; n_synthetic: filtered
        inputs to collect; candidates_per_round (None = 2·n_synthetic) and max_rounds; shots:
        seed inputs shown per generation prompt (the paper's 5); generation_template with
        "{examples}"; example_delimiter between examples; gen_max_new_tokens / gen_temperature
        (> 0: sampling) / gen_top_p; require_end: drop candidates cut off by the token limit;
        single_line: an input ends at its first newline (for one-line inputs; else at "\n###");
        charset_filter / min_alpha_ratio / dedup_threshold: candidate cleaning (lorakit.data.augment).
    Discriminator — filter: use it (False = the paper's "unfiltered synthetic" ablation);
        disc_synthetic_ratio ρ: synthetic / real training examples; disc_r / disc_alpha /
        disc_target: its LoRA; disc_steps / disc_lr / disc_batch_size; disc_val_fraction: share
        of each class held out to report accuracy; disc_instruction / disc_answers ("yes", "no");
        threshold τ on p(real); disc_name: its adapter name on the source model;
        keep_discriminator: leave it there after `transfer_lora`.
    Teacher — teacher_max_new_tokens; min_teacher_agreement: the source adapter must reproduce
        at least this share of the few-shot outputs (when given), else the examples and the adapter
        describe different tasks (0 = no check).
    Student — adapter: its config (None = a copy of the source adapter's config); adapter_name;
        kd: "sequence" or "logits" (same vocabulary only); kd_temperature T; steps / lr /
        batch_size / max_length (tokens per training sequence); gen_batch_size for generation and
        scoring; seed.
    """

    prompt_template: str = "{input}"
    output_stop: str | None = "\n"
    generator: str = "target"
    n_synthetic: int = 64
    candidates_per_round: int | None = None
    max_rounds: int = 4
    shots: int = 5
    generation_template: str = DEFAULT_GENERATION_TEMPLATE
    example_delimiter: str = "###"
    gen_max_new_tokens: int = 96
    gen_temperature: float = 1.0
    gen_top_p: float = 0.95
    require_end: bool = False
    single_line: bool = False
    charset_filter: bool = True
    min_alpha_ratio: float = 0.5
    dedup_threshold: float = 0.8
    filter: bool = True
    disc_synthetic_ratio: float = 1.0
    disc_r: int = 8
    disc_alpha: float = 16.0
    disc_target: str | list[str] = "all-linear"
    disc_steps: int = 100
    disc_lr: float = 5e-4
    disc_batch_size: int = 8
    disc_val_fraction: float = 0.0
    disc_instruction: str = DEFAULT_DISC_INSTRUCTION
    disc_answers: tuple[str, str] = ("yes", "no")
    threshold: float = 0.5
    disc_name: str = "trans_lora_disc"
    keep_discriminator: bool = False
    teacher_max_new_tokens: int = 16
    min_teacher_agreement: float = 0.0
    adapter: AdapterConfig | None = None
    adapter_name: str = "trans_lora"
    kd: str = "sequence"
    kd_temperature: float = 1.0
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 256
    gen_batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_template(self.prompt_template, "input", "prompt_template")
        _check_template(self.generation_template, "examples", "generation_template")
        if self.output_stop is not None and (not isinstance(self.output_stop, str) or not self.output_stop):
            raise ConfigError(f"output_stop must be a non-empty string or None, got {self.output_stop!r}")
        if not isinstance(self.example_delimiter, str) or not self.example_delimiter.strip():
            raise ConfigError(f"example_delimiter must be a non-blank string, got {self.example_delimiter!r}")
        if self.generator not in GENERATORS:
            raise ConfigError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.kd not in KD_MODES:
            raise ConfigError(f"kd must be one of {KD_MODES}, got {self.kd!r}")
        for name in ("n_synthetic", "max_rounds", "shots", "gen_max_new_tokens", "disc_r", "disc_steps",
                     "disc_batch_size", "teacher_max_new_tokens", "steps", "batch_size", "max_length",
                     "gen_batch_size"):
            check_positive_int(name, getattr(self, name))
        if self.candidates_per_round is not None:
            check_positive_int("candidates_per_round", self.candidates_per_round)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        for name in ("gen_temperature",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or math.isinf(v):
                raise ConfigError(f"{name} must be a finite number >= 0 (0 = greedy), got {v!r}")
        for name in ("disc_alpha", "disc_lr", "lr", "kd_temperature", "disc_synthetic_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
                raise ConfigError(f"{name} must be a positive finite number, got {v!r}")
        check_range("gen_top_p", self.gen_top_p, 0.0, 1.0, hi_open=False)
        if self.gen_top_p == 0:
            raise ConfigError("gen_top_p must be in (0, 1], got 0")
        check_range("min_alpha_ratio", self.min_alpha_ratio, 0.0, 1.0, hi_open=False)
        check_range("dedup_threshold", self.dedup_threshold, 0.0, 1.0, hi_open=False)
        if self.dedup_threshold == 0:
            raise ConfigError("dedup_threshold must be in (0, 1], got 0")
        check_range("disc_val_fraction", self.disc_val_fraction, 0.0, 1.0)
        check_range("threshold", self.threshold, 0.0, 1.0, hi_open=False)
        check_range("min_teacher_agreement", self.min_teacher_agreement, 0.0, 1.0, hi_open=False)
        answers = tuple(self.disc_answers) if isinstance(self.disc_answers, (list, tuple)) else None
        if (answers is None or len(answers) != 2 or not all(isinstance(a, str) and a.strip() for a in answers)
                or answers[0].strip() == answers[1].strip()):
            raise ConfigError(f"disc_answers must be two different non-blank words (real, synthetic), "
                              f"got {self.disc_answers!r}")
        self.disc_answers = answers
        if not isinstance(self.disc_instruction, str) or not self.disc_instruction.strip():
            raise ConfigError("disc_instruction must be a non-blank string")
        if self.adapter is not None and not isinstance(self.adapter, AdapterConfig):
            raise ConfigError(f"adapter must be an AdapterConfig (e.g. LoraConfig(r=8)) or None, "
                              f"got {type(self.adapter).__name__}")
        from lorakit.core.adapter import check_adapter_name

        check_adapter_name(self.adapter_name)
        check_adapter_name(self.disc_name)
        if self.adapter_name == self.disc_name:
            raise ConfigError(f"adapter_name and disc_name must differ, both are {self.adapter_name!r}")
        LoraConfig(r=self.disc_r, alpha=self.disc_alpha, target=self.disc_target)  # validates disc_target

    def prompt(self, x: str) -> str:
        return self.prompt_template.replace("{input}", x)


def _check_template(template: Any, key: str, what: str) -> None:
    if not isinstance(template, str):
        raise ConfigError(f"{what} must be a string, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{what} {template!r} is not a valid format string: {e}") from None
    if fields != [key]:
        raise ConfigError(f"{what} must contain the field {{{key}}} exactly once and no other field, "
                          f"got {template!r} (fields {fields}); write literal braces as {{{{ }}}}")


# =========================================================================== examples


@dataclass(frozen=True)
class Example:
    """One real task example: the input x and, when known, the output y."""

    input: str
    output: str | None = None


def as_examples(examples: Sequence[Any], where: str = "few_shot_examples") -> list[Example]:
    """Strings (inputs only), (input, output) pairs or {"input", "output"} mappings -> Examples.

    Raises ConfigError when empty, malformed, or mixing examples with and without outputs.
    """
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise ConfigError(f"{where} must be a list of examples, got {type(examples).__name__}")
    if len(examples) == 0:
        raise ConfigError(f"{where} is empty: Trans-LoRA needs a few real examples of the task (the paper "
                          "keeps 5) to prompt the generator and train the discriminator")
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, str):
            x, y = ex, None
        elif isinstance(ex, Example):
            x, y = ex.input, ex.output
        elif isinstance(ex, Mapping):
            unknown = set(ex) - {"input", "output"}
            if "input" not in ex or unknown:
                raise ConfigError(f"{where}[{i}] must have the key 'input' (and optionally 'output'), got {sorted(ex)}")
            x, y = ex["input"], ex.get("output")
        elif isinstance(ex, (tuple, list)) and len(ex) == 2:
            x, y = ex
        else:
            raise ConfigError(f"{where}[{i}]: expected a string, an (input, output) pair or a mapping, "
                              f"got {type(ex).__name__}")
        if not isinstance(x, str) or not x.strip():
            raise ConfigError(f"{where}[{i}]: the input must be a non-blank string, got {x!r}")
        if y is not None and not isinstance(y, str):
            raise ConfigError(f"{where}[{i}]: the output must be a string or None, got {type(y).__name__}")
        out.append(Example(x, y))
    has = {e.output is not None for e in out}
    if len(has) > 1:
        raise ConfigError(f"{where}: either every example has an output or none has")
    return out


# =========================================================================== helpers


@contextlib.contextmanager
def only_active(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block exactly the adapters `names` are active ([] = the base model)."""
    st = state(model)
    before = list(st.active)
    lorakit.activate(model, list(names))
    try:
        yield model
    finally:
        lorakit.activate(model, before)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if i is not None:
            return int(i)
    return 0


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                  stop: str | None = None) -> tuple[list[str], list[bool]]:
    """Continue each prompt (left-padded batches): (texts cut before `stop`, ended flags).

    Greedy when temperature == 0, else sampling seeded by `seed` (the global RNG is left as
    it was). A text "ended" when `stop` appeared or the model emitted EOS before the limit.
    """
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts: list[str] = []
    ended: list[bool] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for b0 in range(0, len(prompts), batch_size):
                enc = tokenizer(list(prompts[b0:b0 + batch_size]), return_tensors="pt", padding=True).to(_device(model))
                kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad}
                if temperature > 0:
                    kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=None)
                else:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                if stop is not None:
                    kw.update(stop_strings=[stop], tokenizer=tokenizer)
                out = model.generate(**enc, **kw)
                new = out[:, enc["input_ids"].shape[1]:]  # (b, new)
                for row in new.tolist():
                    hit_eos = eos is not None and eos in row
                    if hit_eos:
                        row = row[: row.index(eos)]
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    cut = text.find(stop) if stop is not None else -1
                    texts.append(text[:cut] if cut >= 0 else text)
                    ended.append(hit_eos or cut >= 0)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts, ended


def encode_pairs(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int
                 ) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) per pair: prompt tokens (with the tokenizer's special tokens) then the
    completion tokens; the prompt is cut from the left so the sequence fits `max_length`."""
    if len(prompts) != len(completions):
        raise ConfigError(f"{len(prompts)} prompts but {len(completions)} completions")
    out = []
    for p, c in zip(prompts, completions):
        pi = tokenizer(p)["input_ids"]
        ci = tokenizer(c, add_special_tokens=False)["input_ids"]
        if not ci:
            raise ConfigError(f"completion {c!r} has no tokens")
        ci = ci[: max_length - 1]
        pi = pi[-(max_length - len(ci)):]
        out.append((pi + ci, len(pi)))
    return out


def _collate(rows: Sequence[tuple[list[int], int]], pad: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded (ids, attention, labels) with labels = ids on completion tokens, -100 elsewhere."""
    width = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(rows):
        ids_t[r, : len(ids)] = torch.tensor(ids)
        att[r, : len(ids)] = 1
        lab[r, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    return ids_t.to(device), att.to(device), lab.to(device)


def _hidden_and_head(model: nn.Module, ids: torch.Tensor, att: torch.Tensor):
    """(hidden (B, T, d), head fn) with head(h) = logits; the fused path avoids (B, T, V) logits."""
    from lorakit.evaluate import fused_head

    fused = fused_head(model)
    if fused is not None:
        decoder, weight, bias, softcap = fused
        hidden = decoder(input_ids=ids, attention_mask=att, use_cache=False)[0]

        def head(h: torch.Tensor) -> torch.Tensor:
            z = F.linear(h, weight, bias)
            return softcap * torch.tanh(z / softcap) if softcap else z

        return hidden, head
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
    return logits, lambda z: z


def _target_logits(model: nn.Module, ids: torch.Tensor, att: torch.Tensor, lab: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) at the N positions that predict a completion token, their targets (N,))."""
    shift = F.pad(lab, (0, 1), value=IGNORE)[:, 1:]  # position t predicts token t+1
    mask = shift != IGNORE
    hidden, head = _hidden_and_head(model, ids, att)
    return head(hidden[mask]).float(), shift[mask]


@torch.no_grad()
def completion_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                        batch_size: int = 8, max_length: int = 256) -> list[tuple[float, int]]:
    """(Σ log p(completion tokens | prompt), number of completion tokens) per pair."""
    rows = encode_pairs(tokenizer, prompts, completions, max_length)
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(rows), batch_size):
            batch = rows[b0:b0 + batch_size]
            ids, att, lab = _collate(batch, _pad_id(tokenizer), _device(model))
            shift = F.pad(lab, (0, 1), value=IGNORE)[:, 1:]
            mask = shift != IGNORE
            logits, targets = _target_logits(model, ids, att, lab)
            lp = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
            counts = mask.sum(1).tolist()
            for piece in torch.split(lp, counts):
                out.append((float(piece.sum()), len(piece)))
    finally:
        model.train(was_training)
    return out


def completion_nll(model: nn.Module, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                   batch_size: int = 8, max_length: int = 256) -> float:
    """Mean negative log-likelihood per completion token (nats)."""
    lp = completion_logprobs(model, tokenizer, prompts, completions, batch_size, max_length)
    return -sum(s for s, _ in lp) / max(1, sum(n for _, n in lp))


# =========================================================================== 1. synthesis


def generation_prompt(shots: Sequence[str], config: TransLoraConfig) -> str:
    """The few-shot prompt: every shown input after a delimiter line, ending on a fresh delimiter."""
    d = config.example_delimiter
    examples = "".join(f"{d}\n{s.strip()}\n" for s in shots) + f"{d}\n"
    return config.generation_template.replace("{examples}", examples)


def clean_candidates(candidates: Sequence[str], seeds: Sequence[str], config: TransLoraConfig,
                     exclude: Sequence[str] = ()) -> list[str]:
    """Drop blank candidates, copies of seeds / of `exclude` and exact or near duplicates
    (shingle Jaccard ≥ dedup_threshold); with charset_filter also text failing
    `lorakit.data.augment.charset_ok` (replacement or control characters, < min_alpha_ratio letters)."""
    cands = [c.strip() for c in candidates if c.strip()]
    refs = [s for s in seeds] + [e for e in exclude]
    if config.charset_filter:
        fc = FilterConfig(min_words=1, max_words=10**9, dedup_threshold=config.dedup_threshold,
                          copy_threshold=config.dedup_threshold, min_alpha_ratio=config.min_alpha_ratio,
                          backend="exact")
        kept, _ = filter_generated(as_records(cands), as_records(refs), fc)
        return [r["text"] for r in kept]
    # no charset check: copies of references and duplicates only (tiny random models write bytes)
    keys = {normalize_text(r) for r in refs}
    fresh = [c for c in cands if normalize_text(c) not in keys]
    idx = dedup(refs + fresh, config.dedup_threshold, backend="exact")
    return [(refs + fresh)[i] for i in idx if i >= len(refs)]


def synthesize_prompts(model: nn.Module, tokenizer, seeds: Sequence[str], n: int, config: TransLoraConfig,
                       seed: int | None = None, exclude: Sequence[str] = ()) -> list[str]:
    """Generate `n` candidate task inputs from the base `model` (all its adapters off) by
    few-shot prompting with `config.shots` random seed inputs each, and return the clean ones
    (`clean_candidates`: ≤ n, in generation order). Deterministic for a given `seed`
    (default `config.seed`)."""
    seeds = [e.input for e in as_examples(list(seeds), "seeds")]
    check_positive_int("n", n)
    seed = config.seed if seed is None else seed
    rng = random.Random(seed)
    k = min(config.shots, len(seeds))
    prompts = [generation_prompt(rng.sample(seeds, k), config) for _ in range(n)]
    with only_active(model, []):
        texts, ended = generate_text(model, tokenizer, prompts, config.gen_max_new_tokens, config.gen_temperature,
                                     config.gen_top_p, seed, config.gen_batch_size,
                                     stop="\n" if config.single_line else "\n" + config.example_delimiter)
    if config.require_end:
        texts = [t for t, e in zip(texts, ended) if e]
    return clean_candidates(texts, seeds, config, exclude)


# =========================================================================== 2. discriminator


@dataclass
class DiscriminatorReport:
    """Training summary: counts, the loss per step, accuracies (p ≥ 0.5 counts as "real")."""

    n_real: int
    n_synthetic: int
    losses: list[float]
    train_accuracy: float
    val_accuracy: float | None
    n_val: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["losses"] = [round(x, 5) for x in self.losses]
        return d


class Discriminator:
    """A yes/no LoRA classifier of "real task input" on a causal LM (module docstring, step 1).

    `score(texts)` gives p(real | x) = σ(z_yes − z_no) at the position after "Answer:".
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, config: TransLoraConfig):
        if name not in adapter_names(model):
            raise AdapterError(f"discriminator adapter {name!r} is not on this model (it has {adapter_names(model)})")
        self.model, self.tokenizer, self.name, self.config = model, tokenizer, name, config
        self.prefix, self.yes_id, self.no_id = answer_tokens(tokenizer, config.disc_answers)

    def _rows(self, texts: Sequence[str]) -> list[list[int]]:
        keep = self.config.max_length - len(self.prefix)
        if keep < 2:
            raise ConfigError(f"max_length {self.config.max_length} leaves no room for the discriminator prompt")
        rows = []
        for t in texts:
            body = self.tokenizer(f"{self.config.disc_instruction}\n\n{t.strip()}\n\n")["input_ids"][:keep]
            rows.append(body + self.prefix)
        return rows

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """(n,) s_φ(x) = z_yes − z_no; differentiable (used for training)."""
        rows = self._rows(texts)
        pad = _pad_id(self.tokenizer)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
        dev = _device(self.model)
        ids, att = ids.to(dev), att.to(dev)
        hidden, head = _hidden_and_head(self.model, ids, att)
        last = hidden[torch.arange(len(rows), device=dev), att.sum(1) - 1]  # (n, d) or (n, V)
        z = head(last).float()
        return z[:, self.yes_id] - z[:, self.no_id]

    @torch.no_grad()
    def score(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """(n,) p(real | x) in [0, 1], with only the discriminator adapter active."""
        if len(texts) == 0:
            return torch.zeros(0)
        bs = batch_size or self.config.gen_batch_size
        was_training = self.model.training
        self.model.eval()
        try:
            with only_active(self.model, [self.name]):
                out = [torch.sigmoid(self.logits(texts[b:b + bs])).cpu() for b in range(0, len(texts), bs)]
        finally:
            self.model.train(was_training)
        return torch.cat(out)


def answer_tokens(tokenizer, answers: tuple[str, str]) -> tuple[list[int], int, int]:
    """(shared prefix ids of "Answer: <yes>" / "Answer: <no>", yes id, no id): the answers are
    told apart at their first differing token, whatever the tokenizer merges."""
    a = tokenizer(f"Answer: {answers[0].strip()}", add_special_tokens=False)["input_ids"]
    b = tokenizer(f"Answer: {answers[1].strip()}", add_special_tokens=False)["input_ids"]
    c = 0
    while c < min(len(a), len(b)) and a[c] == b[c]:
        c += 1
    if c >= len(a) or c >= len(b):
        raise ConfigError(f"disc_answers {answers} tokenize so that one is a prefix of the other; pick other words")
    return a[:c], a[c], b[c]


def _split(items: list[str], fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    items = list(items)
    rng.shuffle(items)
    n_val = round(fraction * len(items))
    n_val = min(n_val, len(items) - 1)
    return items[n_val:], items[:n_val]


def _accuracy(disc: Discriminator, real: Sequence[str], synth: Sequence[str]) -> float | None:
    if not real and not synth:
        return None
    p = disc.score(list(real) + list(synth))
    y = torch.tensor([1.0] * len(real) + [0.0] * len(synth))
    return float(((p >= 0.5).float() == y).float().mean())


def train_discriminator(model: nn.Module, tokenizer, real: Sequence[str], synthetic: Sequence[str],
                        config: TransLoraConfig) -> tuple[Discriminator, DiscriminatorReport]:
    """Inject LoRA `config.disc_name` on `model` and train it to tell `real` task inputs from
    `synthetic` ones (balanced BCE on z_yes − z_no, AdamW, `disc_steps` steps of `disc_batch_size`).
    Every other adapter is off while it trains and scores; the active set is restored after."""
    real = [x.strip() for x in real if isinstance(x, str) and x.strip()]
    synthetic = [x.strip() for x in synthetic if isinstance(x, str) and x.strip()]
    if not real or not synthetic:
        raise ConfigError(f"train_discriminator needs real and synthetic inputs, got {len(real)} real and "
                          f"{len(synthetic)} synthetic")
    answer_tokens(tokenizer, config.disc_answers)  # fail before the model changes
    t0 = time.perf_counter()
    rng = random.Random(config.seed)
    r_train, r_val = _split(real, config.disc_val_fraction, rng)
    s_train, s_val = _split(synthetic, config.disc_val_fraction, rng)
    lorakit.inject(model, LoraConfig(r=config.disc_r, alpha=config.disc_alpha, target=config.disc_target),
                   name=config.disc_name, activate=False)
    disc = Discriminator(model, tokenizer, config.disc_name, config)
    params = [p for m in adapter_modules(model, config.disc_name).values() for p in m.parameters()]
    data = [(x, 1.0, 1.0 / len(r_train)) for x in r_train] + [(x, 0.0, 1.0 / len(s_train)) for x in s_train]
    g = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        opt = torch.optim.AdamW(params, lr=config.disc_lr, weight_decay=0.0)
        was_training = model.training
        model.train()
        order: list[int] = []
        try:
            with only_active(model, [config.disc_name]):
                for _ in range(config.disc_steps):
                    if len(order) < config.disc_batch_size:
                        order += torch.randperm(len(data), generator=g).tolist()
                    idx, order = order[: config.disc_batch_size], order[config.disc_batch_size:]
                    batch = [data[i] for i in idx]
                    s = disc.logits([b[0] for b in batch])
                    y = torch.tensor([b[1] for b in batch], device=s.device)
                    w = torch.tensor([b[2] for b in batch], device=s.device)
                    loss = (w * F.binary_cross_entropy_with_logits(s, y, reduction="none")).sum() / w.sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
        finally:
            model.train(was_training)
    report = DiscriminatorReport(
        n_real=len(real), n_synthetic=len(synthetic), losses=losses,
        train_accuracy=_accuracy(disc, r_train, s_train), val_accuracy=_accuracy(disc, r_val, s_val),
        n_val=len(r_val) + len(s_val), seconds=time.perf_counter() - t0)
    return disc, report


def filter_synthetic(discriminator: Discriminator, texts: Sequence[str], threshold: float | None = None
                     ) -> tuple[list[str], torch.Tensor]:
    """(texts with p(real) ≥ threshold in their order, p(real) of every text). Default τ: the
    discriminator's config.threshold."""
    tau = discriminator.config.threshold if threshold is None else threshold
    check_range("threshold", tau, 0.0, 1.0, hi_open=False)
    texts = list(texts)
    p = discriminator.score(texts)
    return [t for t, q in zip(texts, p.tolist()) if q >= tau], p


# =========================================================================== 3. teacher


def teacher_outputs(model: nn.Module, tokenizer, inputs: Sequence[str], adapter: str,
                    config: TransLoraConfig) -> list[str]:
    """Greedy outputs of base + adapter `adapter` (only it active) on prompt_template(x),
    cut at `output_stop`. Outputs keep their leading whitespace (" business")."""
    if adapter not in adapter_names(model):
        raise AdapterError(f"adapter {adapter!r} is not on the source model (it has {adapter_names(model) or 'none'})")
    check_not_merged(model, adapter)
    prompts = [config.prompt(x) for x in inputs]
    with only_active(model, [adapter]):
        texts, _ = generate_text(model, tokenizer, prompts, config.teacher_max_new_tokens, 0.0, 1.0, config.seed,
                                 config.gen_batch_size, stop=config.output_stop)
    return texts


# =========================================================================== 4. student


def fit_lora(model: nn.Module, tokenizer, prompts: Sequence[str], completions: Sequence[str],
             adapter_config: AdapterConfig, name: str, steps: int, lr: float, batch_size: int = 8,
             max_length: int = 256, seed: int = 0, teacher: tuple[nn.Module, str] | None = None,
             kd_temperature: float = 1.0) -> list[float]:
    """Inject adapter `name` and train only it on (prompt, completion) pairs with AdamW:
    next-token cross-entropy on the completion tokens, or — with `teacher` = (model, adapter)
    sharing this tokenizer — T²·KL(teacher ‖ student) on the same positions. Only `name` is
    active while training; afterwards it is added to the active set. Returns the loss per step."""
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    rows = encode_pairs(tokenizer, prompts, completions, max_length)
    if not rows:
        raise ConfigError("fit_lora needs at least one (prompt, completion) pair")
    if teacher is not None:
        t_model, t_adapter = teacher
        if t_adapter not in adapter_names(t_model):
            raise AdapterError(f"teacher adapter {t_adapter!r} is not on the teacher model")
    lorakit.inject(model, adapter_config, name=name, activate=False)
    params = [p for m in adapter_modules(model, name).values() for p in m.parameters() if p.requires_grad]
    pad = _pad_id(tokenizer)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    before = list(state(model).active)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        was_training = model.training
        model.train()
        order: list[int] = []
        try:
            with only_active(model, [name]):
                for _ in range(steps):
                    if len(order) < batch_size:
                        order += torch.randperm(len(rows), generator=g).tolist()
                    idx, order = order[:batch_size], order[batch_size:]
                    ids, att, lab = _collate([rows[i] for i in idx], pad, _device(model))
                    logits, targets = _target_logits(model, ids, att, lab)
                    if teacher is None:
                        loss = F.cross_entropy(logits, targets)
                    else:
                        with torch.no_grad(), only_active(teacher[0], [teacher[1]]):
                            t_was = teacher[0].training
                            teacher[0].eval()
                            dev = _device(teacher[0])
                            t_logits, _ = _target_logits(teacher[0], ids.to(dev), att.to(dev), lab.to(dev))
                            teacher[0].train(t_was)
                        if t_logits.shape != logits.shape:
                            raise ConfigError(f"logit distillation needs one vocabulary: teacher logits "
                                              f"{tuple(t_logits.shape)} vs student {tuple(logits.shape)}")
                        T = kd_temperature
                        loss = T * T * F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits.to(logits.device) / T, -1),
                                                log_target=True, reduction="batchmean")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
        finally:
            model.train(was_training)
    lorakit.activate(model, before + [name])
    return losses


def same_vocabulary(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def distill_lora(target_model: nn.Module, target_tokenizer, inputs: Sequence[str], outputs: Sequence[str],
                 config: TransLoraConfig, adapter_config: AdapterConfig | None = None,
                 teacher: tuple[nn.Module, Any, str] | None = None) -> list[float]:
    """Step 4: train adapter `config.adapter_name` on the target from (input, teacher output)
    pairs. kd="sequence": cross-entropy on the teacher's text; kd="logits": KL to the
    teacher's logits, `teacher` = (source model, source tokenizer, source adapter) with the
    target's vocabulary. The target prompt is prompt_template(input); the target text is the
    output plus `output_stop`. Returns the loss per step."""
    acfg = adapter_config or config.adapter
    if acfg is None:
        raise ConfigError("distill_lora needs an adapter config (argument or TransLoraConfig.adapter)")
    if len(inputs) != len(outputs):
        raise ConfigError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    stop = config.output_stop or ""
    pairs = [(config.prompt(x), y + stop) for x, y in zip(inputs, outputs) if y.strip()]
    if not pairs:
        raise TransferError("no (input, output) pair with a non-blank output to distil on")
    t = None
    if config.kd == "logits":
        if teacher is None:
            raise ConfigError("kd='logits' needs teacher=(source_model, source_tokenizer, source_adapter)")
        if not same_vocabulary(teacher[1], target_tokenizer):
            raise ConfigError("kd='logits' needs the source and target tokenizers to share one vocabulary; "
                              "use kd='sequence' across tokenizers")
        t = (teacher[0], teacher[2])
    return fit_lora(target_model, target_tokenizer, [p for p, _ in pairs], [c for _, c in pairs], acfg,
                    config.adapter_name, config.steps, config.lr, config.batch_size, config.max_length,
                    config.seed, teacher=t, kd_temperature=config.kd_temperature)


# =========================================================================== the whole transfer


@dataclass
class TransLoraReport:
    """What happened in each stage of `transfer_lora` (JSON-ready via `as_dict`)."""

    n_seeds: int = 0
    teacher_agreement: float | None = None
    discriminator: dict[str, Any] | None = None
    n_generated: int = 0
    n_clean: int = 0
    n_kept: int = 0
    keep_rate: float = 0.0
    rounds: int = 0
    n_distill: int = 0
    distill_losses: list[float] = field(default_factory=list)
    kept_examples: list[dict[str, str]] = field(default_factory=list)
    rejected_examples: list[str] = field(default_factory=list)
    p_real: dict[str, float] | None = None  # min / median / max of p(real) over the filtered candidates
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["distill_losses"] = [round(x, 5) for x in self.distill_losses]
        return d


def _source_adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    cfg = state(model).configs[name]
    return copy.deepcopy(cfg)


def transfer_lora(source_model: nn.Module, source_tokenizer, source_adapter: str, target_model: nn.Module,
                  target_tokenizer, few_shot_examples: Sequence[Any], config: TransLoraConfig | None = None,
                  discriminator_examples: Sequence[Any] | None = None,
                  discriminator: Discriminator | None = None) -> tuple[nn.Module, TransLoraReport]:
    """Transfer adapter `source_adapter` of `source_model` to `target_model` (module docstring).

    few_shot_examples: a few real examples (strings = inputs, (input, output) pairs or mappings);
        their inputs prompt the generator; their outputs, when given, check that the source
        adapter solves this task (`min_teacher_agreement`).
    discriminator_examples: real inputs the discriminator learns from (default: the few-shot
        inputs; the paper uses the task data available when the source LoRA was trained).
    discriminator: a `Discriminator` trained earlier (skips step 1).

    Returns (target_model with the new active adapter `config.adapter_name`, report). Nothing is
    changed before every input is validated; the source model gets its active adapters back and
    loses the discriminator adapter it was given here (unless `keep_discriminator`).
    """
    cfg = config or TransLoraConfig()
    seeds = as_examples(few_shot_examples)
    disc_real = [e.input for e in as_examples(discriminator_examples, "discriminator_examples")] \
        if discriminator_examples is not None else [e.input for e in seeds]
    if source_model is target_model:
        raise ConfigError("source_model and target_model are the same object; Trans-LoRA moves an adapter "
                          "to a different base (load the target separately)")
    if source_adapter not in adapter_names(source_model):
        raise AdapterError(f"adapter {source_adapter!r} is not on the source model "
                           f"(it has {adapter_names(source_model) or 'no adapters'})")
    check_not_merged(source_model, source_adapter)
    if cfg.adapter_name in adapter_names(target_model):
        raise AdapterError(f"the target model already has an adapter {cfg.adapter_name!r}; pick another adapter_name")
    if cfg.filter and discriminator is None and cfg.disc_name in adapter_names(source_model):
        raise AdapterError(f"the source model already has an adapter {cfg.disc_name!r}: pass it as "
                           "discriminator=Discriminator(...) or pick another disc_name")
    if discriminator is not None and discriminator.model is target_model:
        raise ConfigError("the discriminator must live on the source (or a third) model, not on the target")
    if cfg.kd == "logits" and not same_vocabulary(source_tokenizer, target_tokenizer):
        raise ConfigError("kd='logits' needs the source and target tokenizers to share one vocabulary; "
                          "use kd='sequence' across tokenizers")
    acfg = cfg.adapter if cfg.adapter is not None else _source_adapter_config(source_model, source_adapter)
    plan_injection(target_model, acfg, cfg.adapter_name)  # targets must exist: fail early
    if cfg.filter and discriminator is None:
        answer_tokens(source_tokenizer, cfg.disc_answers)

    report = TransLoraReport(n_seeds=len(seeds))
    seed_inputs = [e.input for e in seeds]
    trained_disc = False
    try:
        # -- the few-shot outputs must be what the adapter does (else: a different task)
        if seeds[0].output is not None:
            t0 = time.perf_counter()
            got = teacher_outputs(source_model, source_tokenizer, seed_inputs, source_adapter, cfg)
            agree = [normalize_text(a) == normalize_text(e.output) for a, e in zip(got, seeds)]
            report.teacher_agreement = sum(agree) / len(agree)
            report.seconds["teacher_check"] = time.perf_counter() - t0
            if report.teacher_agreement < cfg.min_teacher_agreement:
                raise ConfigError(
                    f"mismatched task: the source adapter {source_adapter!r} reproduces only "
                    f"{report.teacher_agreement:.0%} of the few-shot outputs (min_teacher_agreement="
                    f"{cfg.min_teacher_agreement}); the examples, the prompt_template {cfg.prompt_template!r} "
                    f"and the adapter do not describe the same task (e.g. expected {seeds[0].output!r}, "
                    f"got {got[0]!r})")
        # -- 1. discriminator
        if cfg.filter and discriminator is None:
            t0 = time.perf_counter()
            n_fake = max(1, round(cfg.disc_synthetic_ratio * len(disc_real)))
            fake = synthesize_prompts(source_model, source_tokenizer, seed_inputs, n_fake, cfg, seed=cfg.seed + 1,
                                      exclude=disc_real)
            report.seconds["disc_synthesis"] = time.perf_counter() - t0
            if not fake:
                raise TransferError(f"the source model generated no usable synthetic input out of {n_fake} "
                                    "for the discriminator; check generation_template / gen_max_new_tokens")
            discriminator, disc_report = train_discriminator(source_model, source_tokenizer, disc_real, fake, cfg)
            trained_disc = True
            report.discriminator = disc_report.as_dict()
            report.seconds["disc_train"] = disc_report.seconds
        # -- 2. synthetic transfer inputs, filtered
        gen_model, gen_tok = (target_model, target_tokenizer) if cfg.generator == "target" else \
            (source_model, source_tokenizer)
        per_round = cfg.candidates_per_round or 2 * cfg.n_synthetic
        kept: list[str] = []
        scores: list[float] = []
        t_gen = t_filter = 0.0
        for r in range(cfg.max_rounds):
            report.rounds = r + 1
            t0 = time.perf_counter()
            cands = synthesize_prompts(gen_model, gen_tok, seed_inputs, per_round, cfg, seed=cfg.seed + 1000 + r,
                                       exclude=kept + disc_real)
            t_gen += time.perf_counter() - t0
            report.n_generated += per_round
            report.n_clean += len(cands)
            t0 = time.perf_counter()
            if cfg.filter and cands:
                passed, p = filter_synthetic(discriminator, cands, cfg.threshold)
                scores += p.tolist()
                if len(report.rejected_examples) < 5:
                    report.rejected_examples += [c for c, q in zip(cands, p.tolist()) if q < cfg.threshold][:5]
            else:
                passed = cands
            t_filter += time.perf_counter() - t0
            kept += passed[: cfg.n_synthetic - len(kept)]
            if len(kept) >= cfg.n_synthetic:
                break
        report.seconds["synthesis"] = t_gen
        report.seconds["filter"] = t_filter
        report.n_kept = len(kept)
        report.keep_rate = len(kept) / max(1, report.n_clean)
        if scores:
            q = torch.tensor(scores)
            report.p_real = {"min": float(q.min()), "median": float(q.median()), "max": float(q.max())}
        if not kept:
            best = f", highest p(real) {report.p_real['max']:.3f}" if report.p_real else ""
            raise TransferError(
                f"no synthetic input survived after {report.rounds} round(s): {report.n_generated} generated, "
                f"{report.n_clean} clean, 0 judged real (threshold {cfg.threshold}{best}); raise max_rounds / "
                "candidates_per_round, lower threshold, use generator='source', or give the discriminator more "
                "real examples", report)
        # -- 3. teacher labels
        t0 = time.perf_counter()
        outputs = teacher_outputs(source_model, source_tokenizer, kept, source_adapter, cfg)
        report.seconds["teacher"] = time.perf_counter() - t0
        pairs = [(x, y) for x, y in zip(kept, outputs) if y.strip()]
        report.n_distill = len(pairs)
        report.kept_examples = [{"input": x, "output": y} for x, y in pairs[:5]]
        # -- 4. distillation
        t0 = time.perf_counter()
        report.distill_losses = distill_lora(
            target_model, target_tokenizer, [x for x, _ in pairs], [y for _, y in pairs], cfg, acfg,
            teacher=(source_model, source_tokenizer, source_adapter))
        report.seconds["distill"] = time.perf_counter() - t0
    finally:
        if trained_disc and not cfg.keep_discriminator and cfg.disc_name in adapter_names(source_model):
            lorakit.delete(source_model, cfg.disc_name)
    return target_model, report
