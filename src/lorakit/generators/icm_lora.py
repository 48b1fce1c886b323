"""ICM-LoRA: a conditional VAE that generates a task's LoRA from its task vector (Shao et al.,
"In-Context Meta LoRA Generation", IJCAI 2025, arXiv:2501.17635).

Training set: for each training task τ a LoRA is fine-tuned (every task from the same seeded
init, see `lorakit.generators.family`) and several parameter snapshots θ_τ,j ∈ R^P (all LoRA
tensors, flattened in a fixed order) are kept. The condition is the task vector

    c_τ = mean over the context rows of the base model's last-layer hidden state
          (pool "last": the last token's state, as the reference; "mean": mean over tokens)

The CVAE (reference architecture, model/CVAE_design.py of github.com/YihuaJerry/ICM-LoRA):

    x = (θ − μ) / σ                       normalised parameters (P,), zero-padded to L = 2^D·⌈P/2^D⌉
    encoder: D × [Conv1d(k, stride 2) → BatchNorm → LeakyReLU]   (1, L) → (C_D, L/2^D)
             e = Linear(flatten) ∈ R^latent
             μ_z, log σ_z² = Linear([e, c]), Linear([e, c])
    z = μ_z + σ_z ⊙ ε,  ε ~ N(0, I)
    decoder: Linear([z, c]) → (C_D, L/2^D) → (D−1) × [ConvTranspose1d(k, 2) → BN → ELU]
             → ConvTranspose1d(k, 2) → BN → ELU → Conv1d(k, 1 channel)  → x̂ (L,)
    loss = MSE(x̂, x) + β · mean_batch KL(N(μ_z, σ_z²) ‖ N(0, I)),  β = kld_weight = 0.005

Generation for a new task: c from its context, z = 0 (the prior's mode; `sample_z=True` draws
z ~ N(0, I) from a seeded generator, as the reference's sampling script), θ̂ = μ + σ ⊙ x̂[:P],
and θ̂ is written into a plain lorakit LoRA, so it saves, loads, merges and exports to PEFT.

Deviations from the reference, and why:
- Normalisation. The reference standardises each tensor of each checkpoint by its own
  mean/std and de-normalises a generated vector with the statistics of an existing LoRA of
  the *same* task — which a held-out task does not have. Here μ is the element-wise mean over
  all training snapshots and σ one standard deviation per tensor of the residual θ − μ, both
  stored with the generator. Subtracting μ also removes the shared random init of the A
  factors, which a convolutional decoder could not otherwise reproduce.
- Condition augmentation (`context_draws`, default 8). The reference pairs every snapshot
  of a task with that task's single task vector. With a few dozen tasks the CVAE then
  memorises: on the synthetic family it reproduces the training tasks' LoRAs but its LoRAs
  for held-out tasks are worse than the plain average LoRA (tests/generators). Each snapshot
  is instead paired with a task vector of a random context-sized draw of the task's rows, so
  the decoder learns how task vectors vary for one task, as they do between the context a
  held-out task offers and any other; held-out quality then approaches the task's own LoRA.
  `context_draws=0` is the reference behaviour.
- The condition is standardised (mean per dimension, one global scale) before use.
- The task vector is computed with the *base* model (the reference runs the task's own
  fine-tuned LoRA model, again unavailable for a held-out task), and the last-layer state is
  taken after the final norm (transformers' last `hidden_states` entry).
- Channel list, latent size and padding granule are configurable (the reference hard-codes
  12 levels and pads to 4096), so tiny models fit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lorakit.core.adapter import check_finite_nonneg, check_nonneg_int, check_positive_int
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.fsutil import atomic_dir
from lorakit.generators.family import (
    POOLS,
    Task,
    TaskLoraConfig,
    inject_generated,
    task_embedding,
    train_task_loras,
)
from lorakit.generators.generative_adapter import CONFIG_FILE, WEIGHTS_FILE, _load_tensors, _read_meta

REFERENCE_CHANNELS = [8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8]


@dataclass
class IcmLoraConfig:
    """latent_dim: z size (reference 256); channels: conv channels per level (reference: 12
    levels, REFERENCE_CHANNELS); kernel_size: odd conv width (reference 7); kld_weight: β
    (reference 0.005); pool / layer: how the task vector is read (family.task_embedding);
    steps, lr, batch_size, weight_decay: AdamW on the CVAE; sample_z: draw z at generation
    (else z = 0); seed: init, batches and ε.
    """

    latent_dim: int = 256
    channels: list[int] = field(default_factory=lambda: list(REFERENCE_CHANNELS))
    kernel_size: int = 7
    kld_weight: float = 0.005
    pool: str = "last"
    layer: int = -1
    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    sample_z: bool = False
    context_draws: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("latent_dim", "steps", "batch_size"):
            check_positive_int(name, getattr(self, name))
        check_nonneg_int("context_draws", self.context_draws)
        if not isinstance(self.channels, (list, tuple)) or not self.channels:
            raise ConfigError(f"channels must be a non-empty list of positive integers, got {self.channels!r}")
        self.channels = [check_positive_int("channels[i]", c) for c in self.channels]
        check_positive_int("kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd (stride-2 convolutions halve the length exactly), "
                              f"got {self.kernel_size}")
        check_finite_nonneg("kld_weight", self.kld_weight)
        check_finite_nonneg("weight_decay", self.weight_decay)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0 or math.isinf(self.lr):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ConfigError(f"layer must be an integer (hidden-state index, -1 = last), got {self.layer!r}")


class CVAE(nn.Module):
    """The reference's 1-D convolutional conditional VAE over a flattened parameter vector."""

    def __init__(self, input_length: int, condition_dim: int, latent_dim: int, channels: Sequence[int],
                 kernel_size: int = 7, kld_weight: float = 0.005):
        super().__init__()
        self.input_length = input_length
        self.kld_weight = kld_weight
        self.channels = list(channels)
        granule = 2 ** len(self.channels)
        self.padded_length = granule * math.ceil(input_length / granule)
        self.last_length = self.padded_length // granule
        k, pad = kernel_size, kernel_size // 2
        enc, c_in = [], 1
        for c in self.channels:
            enc.append(nn.Sequential(nn.Conv1d(c_in, c, k, 2, pad), nn.BatchNorm1d(c), nn.LeakyReLU()))
            c_in = c
        self.encoder = nn.Sequential(*enc)
        flat = self.last_length * self.channels[-1]
        self.to_latent = nn.Linear(flat, latent_dim)
        self.fc_mu = nn.Linear(latent_dim + condition_dim, latent_dim)
        self.fc_var = nn.Linear(latent_dim + condition_dim, latent_dim)
        self.to_decode = nn.Linear(latent_dim + condition_dim, flat)
        rev = self.channels[::-1]
        self.decoder = nn.Sequential(*[
            nn.Sequential(nn.ConvTranspose1d(rev[i], rev[i + 1], k, 2, pad, output_padding=1),
                          nn.BatchNorm1d(rev[i + 1]), nn.ELU())
            for i in range(len(rev) - 1)])
        self.final_layer = nn.Sequential(
            nn.ConvTranspose1d(rev[-1], rev[-1], k, 2, pad, output_padding=1), nn.BatchNorm1d(rev[-1]), nn.ELU(),
            nn.Conv1d(rev[-1], 1, k, 1, pad))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(b, P) -> (b, L) zero-padded."""
        return F.pad(x, (0, self.padded_length - x.shape[-1]))

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, P), c (b, cond) -> μ_z, log σ_z² (b, latent)."""
        e = self.to_latent(self.encoder(self.pad(x)[:, None, :]).flatten(1))
        ec = torch.cat([e, c], dim=-1)
        return self.fc_mu(ec), self.fc_var(ec)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z (b, latent), c (b, cond) -> x̂ (b, L) (padded length; the first P entries are θ)."""
        h = self.to_decode(torch.cat([z, c], dim=-1)).view(-1, self.channels[-1], self.last_length)
        return self.final_layer(self.decoder(h))[:, 0, :]

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, reconstruction MSE, KL) of a batch x (b, P) with conditions c (b, cond)."""
        mu, log_var = self.encode(x, c)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
        z = mu + eps * torch.exp(0.5 * log_var)
        recons = F.mse_loss(self.decode(z, c), self.pad(x))
        kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1))
        return recons + self.kld_weight * kld, recons, kld


class IcmLoraGenerator(nn.Module):
    """A trained CVAE plus what turns its output into a LoRA: the parameter layout, the
    normalisation (μ, σ) and the condition's standardisation."""

    def __init__(self, layout: Sequence[tuple[str, Sequence[int]]], condition_dim: int, config: IcmLoraConfig,
                 task_lora: TaskLoraConfig):
        super().__init__()
        self.config, self.task_lora = config, task_lora
        self.layout = [(k, tuple(int(s) for s in shape)) for k, shape in layout]
        p = sum(math.prod(s) for _, s in self.layout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.cvae = CVAE(p, condition_dim, config.latent_dim, config.channels, config.kernel_size,
                             config.kld_weight)
        self.register_buffer("param_mean", torch.zeros(p))  # μ (P,)
        self.register_buffer("param_scale", torch.ones(p))  # σ (P,), one value per tensor
        self.register_buffer("cond_mean", torch.zeros(condition_dim))
        self.register_buffer("cond_scale", torch.ones(()))
        self.losses: list[float] = []
        self.recon_losses: list[float] = []

    @property
    def num_params(self) -> int:
        return self.param_mean.numel()

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """LoRA tensors -> θ (P,) in the layout's order."""
        missing = [k for k, _ in self.layout if k not in tensors]
        if missing or len(tensors) != len(self.layout):
            raise ConfigError(f"LoRA tensors do not match the generator's layout (missing {missing[:3]}, "
                              f"{len(tensors)} given, {len(self.layout)} expected)")
        return torch.cat([tensors[k].float().reshape(-1) for k, _ in self.layout])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k, shape in self.layout:
            n = math.prod(shape)
            out[k] = theta[i: i + n].reshape(shape).clone()
            i += n
        return out

    def condition(self, c: torch.Tensor) -> torch.Tensor:
        return (c - self.cond_mean) / self.cond_scale

    @torch.no_grad()
    def generate_state(self, model: nn.Module, context: torch.Tensor, seed: int | None = None,
                       attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The LoRA tensors generated for the task whose context rows are `context` (n, T)
        (`seed`: the z draw when config.sample_z)."""
        c = task_embedding(model, context, self.config.pool, self.config.layer, attention_mask)
        c = c.to(self.param_mean.device)
        if c.shape[0] != self.cond_mean.shape[0]:
            raise ConfigError(f"task vector has {c.shape[0]} dims, the generator was trained on "
                              f"{self.cond_mean.shape[0]} (another base model?)")
        was_training = self.training
        self.eval()
        z = torch.zeros(1, self.config.latent_dim)
        if self.config.sample_z:
            g = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
            z = torch.randn(1, self.config.latent_dim, generator=g)
        x = self.cvae.decode(z.to(c.device), self.condition(c)[None])[0, : self.num_params]
        self.train(was_training)
        return self.unflatten((self.param_mean + self.param_scale * x).cpu())

    def generate_adapter(self, model: nn.Module, context: torch.Tensor, name: str = "generated",
                         activate: bool = True, seed: int | None = None,
                         attention_mask: torch.Tensor | None = None) -> nn.Module:
        """Inject the generated LoRA into `model` as adapter `name` (a normal lorakit LoRA)."""
        tensors = self.generate_state(model, context, seed, attention_mask)
        return inject_generated(model, self.task_lora.lora_config(), name, self.task_lora.seed, tensors, activate)

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        meta = {"generator": "icm_lora", "paper": "arXiv:2501.17635", "config": asdict(self.config),
                "task_lora": asdict(self.task_lora), "layout": [[k, list(s)] for k, s in self.layout],
                "condition_dim": int(self.cond_mean.shape[0])}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(Path(path)) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            save_file(tensors, str(tmp / WEIGHTS_FILE))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> IcmLoraGenerator:
        from lorakit.config import from_dict

        meta = _read_meta(Path(path), "icm_lora")
        where = str(Path(path) / CONFIG_FILE)
        try:
            gen = cls([(k, s) for k, s in meta["layout"]], int(meta["condition_dim"]),
                      from_dict(IcmLoraConfig, meta["config"], where), from_dict(TaskLoraConfig, meta["task_lora"], where))
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterFileError(f"{where}: malformed generator description: {e}") from None
        _load_tensors(gen, Path(path))
        return gen.eval()


def _task_vectors(model: nn.Module, task: Task, config: IcmLoraConfig, g: torch.Generator) -> torch.Tensor:
    """(draws, d): the task vector of `task.context`, then `context_draws` more, each from a
    random set of as many rows drawn from the task's context and train rows."""
    vecs = [task_embedding(model, task.context, config.pool, config.layer)]
    pool = torch.cat([task.context, task.train])
    for _ in range(config.context_draws):
        rows = torch.randperm(pool.shape[0], generator=g)[: task.context.shape[0]]
        vecs.append(task_embedding(model, pool[rows], config.pool, config.layer))
    return torch.stack(vecs)


def train_icm_lora(model: nn.Module, tasks: Sequence[Task], config: IcmLoraConfig | None = None,
                   task_lora: TaskLoraConfig | None = None,
                   samples: Sequence[Sequence[dict[str, torch.Tensor]]] | None = None) -> IcmLoraGenerator:
    """Train ICM-LoRA's CVAE on `tasks`.

    `samples[i]` are LoRA snapshots of task i (from `family.train_task_loras(model, tasks,
    task_lora)`; trained here when not given). Returns the generator in eval mode with its
    per-step losses (`.losses`, `.recon_losses`).
    """
    config = config or IcmLoraConfig()
    task_lora = task_lora or TaskLoraConfig()
    if not tasks:
        raise ConfigError("train_icm_lora needs at least one task")
    if samples is None:
        samples = train_task_loras(model, tasks, task_lora)
    if len(samples) != len(tasks) or any(len(s) == 0 for s in samples):
        raise ConfigError(f"samples must hold at least one LoRA snapshot per task ({len(tasks)} tasks, "
                          f"{len(samples)} sample lists)")
    first = samples[0][0]
    layout = [(k, tuple(first[k].shape)) for k in sorted(first)]
    g = torch.Generator().manual_seed(config.seed)
    conds = torch.stack([_task_vectors(model, t, config, g) for t in tasks])  # (n_tasks, draws, d)
    gen = IcmLoraGenerator(layout, conds.shape[-1], config, task_lora)
    x = torch.stack([gen.flatten(s) for task_samples in samples for s in task_samples])  # (N, P)
    owner = torch.tensor([i for i, s in enumerate(samples) for _ in s])  # (N,) task of each sample
    with torch.no_grad():
        gen.param_mean.copy_(x.mean(0))
        resid = x - gen.param_mean
        i = 0
        for _, shape in layout:  # one σ per tensor
            n = math.prod(shape)
            gen.param_scale[i: i + n] = resid[:, i: i + n].std(unbiased=False).clamp_min(1e-8)
            i += n
        flat = conds.reshape(-1, conds.shape[-1])
        gen.cond_mean.copy_(flat.mean(0))
        gen.cond_scale.copy_((flat - gen.cond_mean).std(unbiased=False).clamp_min(1e-6))
    xn = (x - gen.param_mean) / gen.param_scale
    cn = gen.condition(conds)  # (n_tasks, draws, d)
    opt = torch.optim.AdamW(gen.cvae.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen.train()
    for _ in range(config.steps):
        rows = torch.randint(x.shape[0], (config.batch_size,), generator=g)  # with replacement
        draws = torch.randint(cn.shape[1], (config.batch_size,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss, recons, _ = gen.cvae(xn[rows], cn[owner[rows], draws], generator=g)
        loss.backward()
        opt.step()
        gen.losses.append(float(loss.detach()))
        gen.recon_losses.append(float(recons.detach()))
    return gen.eval()


__all__ = ["CVAE", "REFERENCE_CHANNELS", "IcmLoraConfig", "IcmLoraGenerator", "train_icm_lora"]
