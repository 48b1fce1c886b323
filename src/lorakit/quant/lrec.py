"""LREC — low-rank error correction of a quantized base (INT2.1, Chai et al., arXiv:2306.08162).

The base is quantized (`lorakit.quant.quantize_model`), a LoRA is attached, and only the LoRA
trains, against the task labels AND the full-precision model's output distribution:

    L = CE(z_s, y) + λ · T² · KL( softmax(z_t / T) ‖ softmax(z_s / T) )

z_s: logits of the quantized model + LoRA (student), z_t: logits of the fp model (teacher, no
grad), λ = `kl_weight` (default 1.0), T = temperature (default 1.0; T² keeps the gradient scale
independent of T, as in Hinton et al.'s distillation). Per token, averaged over the tokens whose
label is not `ignore_index`. With `shift=True` (causal LMs) position t predicts label t+1, the
same as transformers' ForCausalLMLoss.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError

__all__ = ["kl_to_teacher", "lrec_loss", "lrec_train", "lrec_training_loss"]


def _shifted(student_logits, teacher_logits, labels, shift):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher logits "
                         f"{tuple(teacher_logits.shape)}")
    if shift:
        student_logits, teacher_logits = student_logits[..., :-1, :], teacher_logits[..., :-1, :]
        labels = None if labels is None else labels[..., 1:]
    return student_logits, teacher_logits, labels


def _token_kl(zs: torch.Tensor, zt: torch.Tensor, T: float) -> torch.Tensor:
    """KL(softmax(zt/T) ‖ softmax(zs/T)) · T² per position: (..., V) -> (...)."""
    log_ps = F.log_softmax(zs.float() / T, dim=-1)
    log_pt = F.log_softmax(zt.float() / T, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1) * (T * T)


def lrec_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
              kl_weight: float = 1.0, T: float = 1.0, shift: bool = True, ignore_index: int = -100,
              return_parts: bool = False):
    """CE(student, labels) + kl_weight · T² · KL(teacher ‖ student); see the module docstring.

    student_logits, teacher_logits: (batch, seq, V); labels: (batch, seq) or None (KL only).
    Returns the scalar loss, or (loss, ce, kl) with `return_parts=True`.
    """
    if T <= 0:
        raise ConfigError(f"temperature T must be > 0, got {T}")
    if kl_weight < 0:
        raise ConfigError(f"kl_weight must be >= 0, got {kl_weight}")
    zs, zt, y = _shifted(student_logits, teacher_logits.detach(), labels, shift)
    kl_tok = _token_kl(zs, zt, T)  # (batch, seq')
    if y is None:
        ce = zs.new_zeros((), dtype=torch.float32)
        kl = kl_tok.mean()
    else:
        mask = y != ignore_index
        n = mask.sum().clamp_min(1)
        ce = F.cross_entropy(zs.float().reshape(-1, zs.shape[-1]), y.reshape(-1), ignore_index=ignore_index,
                             reduction="sum") / n
        kl = (kl_tok * mask).sum() / n
    loss = ce + kl_weight * kl
    return (loss, ce.detach(), kl.detach()) if return_parts else loss


def lrec_training_loss(model: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, kl_weight: float = 1.0, T: float = 1.0,
                       chunk_size: int = 128) -> torch.Tensor:
    """The LREC loss of a causal LM batch, computed from both models' last hidden states in row
    chunks (``lorakit.ops.loss.causal_lm_distill_loss``) so that neither model's (tokens x vocab)
    logits are formed; the same value as ``lrec_loss`` on full logits, which it falls back to
    when a model's logits are not a plain frozen head over its decoder. The teacher runs without
    grad. labels None: the KL term alone (as ``lrec_loss``)."""
    from lorakit.evaluate import fused_head
    from lorakit.ops.loss import causal_lm_distill_loss

    s_head, t_head = fused_head(model), fused_head(teacher)
    plain = all(h is not None and h[2] is None and h[3] is None and not h[1].requires_grad for h in (s_head, t_head))
    if not plain:
        with torch.no_grad():
            zt = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        return lrec_loss(model(input_ids=input_ids, attention_mask=attention_mask).logits, zt, labels,
                         kl_weight=kl_weight, T=T)
    with torch.no_grad():
        ht = t_head[0](input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hs = s_head[0](input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return causal_lm_distill_loss(hs, s_head[1], ht, t_head[1], labels, kl_weight=kl_weight, temperature=T,
                                  chunk_size=chunk_size)


def _batch(b):
    if isinstance(b, torch.Tensor):
        b = {"input_ids": b}
    ids = b["input_ids"]
    return {"input_ids": ids, "attention_mask": b.get("attention_mask")}, b.get("labels", ids)


@torch.no_grad()
def kl_to_teacher(model: nn.Module, teacher: nn.Module, batches, T: float = 1.0) -> float:
    """Mean per-token KL(teacher ‖ model) over `batches` (tensors of ids or dicts with input_ids)."""
    total, count = 0.0, 0
    for b in batches:
        inputs, _ = _batch(b)
        kl = _token_kl(model(**inputs).logits, teacher(**inputs).logits, T)
        total, count = total + float(kl.sum()), count + kl.numel()
    return total / max(count, 1)


def lrec_train(model: nn.Module, teacher: nn.Module, batches, steps: int, lr: float = 1e-3,
               kl_weight: float = 1.0, T: float = 1.0, weight_decay: float = 0.0) -> list[float]:
    """Minimal LREC loop (for tests and small runs): AdamW on the parameters that require grad
    (the adapter, after `lorakit.inject`), `steps` steps cycling over `batches`. Labels default to
    the input ids (causal LM). The teacher runs in eval mode without grad. Returns the losses."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("model has no trainable parameters; attach an adapter first (lorakit.inject)")
    batches = list(batches)
    if not batches:
        raise ConfigError("batches is empty")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    teacher.eval()
    was_training = model.training
    model.train()
    losses = []
    for b in itertools.islice(itertools.cycle(batches), steps):
        inputs, labels = _batch(b)
        loss = lrec_training_loss(model, teacher, inputs["input_ids"], labels, inputs["attention_mask"],
                                  kl_weight=kl_weight, T=T)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.train(was_training)
    return losses
