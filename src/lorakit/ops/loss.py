"""Memory-efficient causal-LM loss: the LM head and the cross entropy fused, in row chunks.

The plain recipe ``F.cross_entropy(hidden @ W.T, labels)`` materialises the logits
(N, V) in fp32, keeps them for backward, and then allocates their gradient (N, V) as
well. For SmolLM2-135M (V = 49152) with a batch of 8 x 128 tokens that is 3 x 201 MB
of transient memory for a 135M-parameter model -- more than the model itself.

``chunked_linear_cross_entropy`` follows the "fused linear cross entropy" of
Liger-Kernel (Hsu et al., 2024, arXiv:2410.10989; the idea comes from
mgmalek/efficient_cross_entropy): the forward pass walks over chunks of rows of the
hidden states and, for each chunk c,

    z_c      = h_c @ W.T + b                    (n_c, V), fp32 accumulate
    l_c      = s * tanh(z_c / s)                (optional logit soft-capping, s = softcap)
    loss_i   = logsumexp(l_i) - l_i[y_i]        per row, ignored rows dropped
    dL/dl_c  = (softmax(l_c) - onehot(y_c)) * r (r = 1/n_valid for "mean", 1 for "sum")
    dL/dz_c  = dL/dl_c * (1 - tanh^2(z_c / s))  (only with soft-capping)
    dL/dh_c  = dL/dz_c @ W                      (n_c, d)
    dL/dW   += dL/dz_c.T @ h_c                  (V, d), only if W requires grad
    dL/db   += sum_rows dL/dz_c                 (V,),   only if b requires grad

so the gradient is computed *during the forward pass*, while the chunk's logits are
still alive. Only dL/dh (N, d) -- and dL/dW, dL/db when they need a gradient -- are
saved for backward, which merely multiplies them by the incoming scalar grad_output.
Peak extra memory is one or two (chunk_size, V) fp32 buffers instead of 3 x (N, V).

Costs and limits: the forward does the work of forward + backward (the backward pass
is then free); the result only supports first-order gradients of a scalar loss
(``reduction`` "mean" or "sum"), which is all LM training needs. Rows whose label is
``ignore_index`` are skipped entirely (no matmul), so padding costs nothing.

``causal_lm_loss`` adds the next-token shift on top, with exactly the semantics of
``transformers.loss.loss_utils.ForCausalLMLoss``.
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError

__all__ = ["chunked_linear_cross_entropy", "causal_lm_loss", "causal_lm_distill_loss"]

_REDUCTIONS = ("mean", "sum")
_VOCAB_SLICE = 4096  # rows of a low-precision head upcast at a time (4096 x 576 fp32 = 9 MB)


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 at least (bf16/fp16 are upcast), fp64 if any input is fp64."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _check_chunk_size(chunk_size) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_label_range(labels1d: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels1d != ignore_index) & ((labels1d < 0) | (labels1d >= vocab))
    if bool(bad.any()):
        first = labels1d[bad][0].item()
        raise ConfigError(f"label {first} is outside [0, {vocab}) and is not ignore_index={ignore_index}")


def _next_token_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(B, T) labels -> the label each position predicts: shifted left by one, ignore_index last."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _head_logits(h_c: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cdtype: torch.dtype) -> torch.Tensor:
    """h_c @ w.T (+ b) in cdtype, (n_c, V). A w of another dtype (a frozen bf16/fp16 head) is upcast
    a vocab slice at a time: a whole fp32 copy would add V x d x 4 bytes at the step's peak."""
    if w.dtype == cdtype:
        return h_c @ w.T if b is None else torch.addmm(b, h_c, w.T)
    z = torch.empty(h_c.shape[0], w.shape[0], dtype=cdtype, device=h_c.device)
    for s in range(0, w.shape[0], _VOCAB_SLICE):
        z[:, s:s + _VOCAB_SLICE] = h_c @ w[s:s + _VOCAB_SLICE].to(cdtype).T
    if b is not None:
        z += b
    return z


def _head_input_grad(g: torch.Tensor, w: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
    """g @ w (n_c, d) in cdtype, upcasting a low-precision w a vocab slice at a time."""
    if w.dtype == cdtype:
        return g @ w
    return sum(g[:, s:s + _VOCAB_SLICE] @ w[s:s + _VOCAB_SLICE].to(cdtype) for s in range(0, w.shape[0], _VOCAB_SLICE))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and all gradients in one chunked pass; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, chunk_size, ignore_index, reduction, softcap):
        # hidden: (N, d)  weight: (V, d)  labels: (N,) int64  bias: (V,) or None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        need_any = need_h or need_w or need_b
        cdtype = _compute_dtype(hidden.dtype, weight.dtype, *(() if bias is None else (bias.dtype,)))
        device = hidden.device

        # Autocast would silently run our matmuls in bf16; the whole point is fp32 accumulation.
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            # a trained head needs a whole fp32 grad_w anyway; a frozen bf16 one is upcast in slices
            w = weight.to(cdtype) if need_w else weight  # no copy when already fp32: (V, d)
            b = None if bias is None else bias.to(cdtype)
            rows = (labels != ignore_index).nonzero().squeeze(1)  # only valid rows do any work
            n_valid = rows.numel()
            scale = 1.0 / n_valid if (reduction == "mean" and n_valid > 0) else 1.0

            loss = torch.zeros((), dtype=cdtype, device=device)
            grad_h = torch.zeros_like(hidden) if need_h else None  # ignored rows: zero gradient
            grad_w = torch.zeros_like(w) if need_w else None  # accumulated in compute dtype
            grad_b = torch.zeros_like(b) if need_b else None

            for start in range(0, n_valid, chunk_size):
                idx = rows[start : start + chunk_size]  # (n_c,)
                h_c = hidden.index_select(0, idx).to(cdtype)  # (n_c, d)
                y_c = labels.index_select(0, idx).unsqueeze(1)  # (n_c, 1)
                z = _head_logits(h_c, w, b, cdtype)  # (n_c, V)
                if softcap is not None:
                    t = z.div_(softcap).tanh_()  # reuse z's buffer for tanh(z / s)
                    logits = t * softcap
                else:
                    t, logits = None, z
                target = logits.gather(1, y_c).squeeze(1)  # (n_c,)
                # In-place, numerically stable logsumexp: logits becomes exp(l - max).
                row_max = logits.amax(dim=1, keepdim=True)
                e = logits.sub_(row_max).exp_()
                denom = e.sum(dim=1, keepdim=True)
                lse = row_max.squeeze(1) + denom.log().squeeze(1)
                loss += (lse - target).sum()
                if not need_any:
                    continue
                # (softmax - onehot) * scale, still in the same buffer, in one pass + a scatter
                g = e.mul_(denom.reciprocal_().mul_(scale))
                g.scatter_add_(1, y_c, torch.full(y_c.shape, -scale, dtype=cdtype, device=device))
                if t is not None:  # d(s * tanh(z/s))/dz = 1 - tanh^2(z/s)
                    g.mul_(t.square_().neg_().add_(1.0))
                if need_h:
                    grad_h.index_copy_(0, idx, _head_input_grad(g, w, cdtype).to(grad_h.dtype))
                if need_w:
                    grad_w.addmm_(g.T, h_c)
                if need_b:
                    grad_b += g.sum(dim=0)

            if reduction == "mean" and n_valid > 0:
                loss = loss / n_valid

        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # The gradients were computed for d(loss) = 1; the chain rule only rescales them.
        # (A single multiplication; torch.equal(grad_output, 1) would cost a device sync.)
        out = []
        for g in (grad_h, grad_w, grad_b):
            out.append(None if g is None else g * grad_output.to(g.dtype))
        return out[0], out[1], None, out[2], None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Cross entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, never holding (N, V).

    Equal (within float tolerance) to
    ``F.cross_entropy((hidden @ weight.T + bias).float(), labels, ignore_index=ignore_index,
    reduction=reduction)`` -- with ``logit_softcap`` s, the logits are first mapped to
    ``s * tanh(logits / s)`` (Gemma-2 style) -- in value and in gradients wrt ``hidden``,
    ``weight`` and ``bias``.

    Args:
        hidden: (..., d) hidden states, any float dtype (bf16/fp16 are upcast to fp32).
        weight: (V, d) LM-head / tied embedding matrix.
        labels: (...) integer targets in [0, V) or ``ignore_index``; same leading shape
            as ``hidden``.
        chunk_size: rows per chunk; peak extra memory is ~ chunk_size x V fp32 (x2 with
            soft-capping). 1024 rows x 49152 vocab = 201 MB.
        ignore_index: label value that contributes neither loss nor gradient.
        reduction: "mean" (over non-ignored rows) or "sum".
        bias: optional (V,) LM-head bias.
        logit_softcap: optional soft-capping constant s > 0.

    Returns:
        a 0-dim loss in fp32 (fp64 if an input is fp64). With every label ignored the
        loss is 0 (not NaN, unlike ``F.cross_entropy``) and all gradients are 0.

    Only first-order gradients of the scalar loss are supported (the gradient is computed
    in the forward pass; see the module docstring).
    """
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_chunk_size(chunk_size)
    if logit_softcap is not None and not logit_softcap > 0:
        raise ConfigError(f"logit_softcap must be > 0 or None, got {logit_softcap!r}")
    if weight.dim() != 2:
        raise ConfigError(f"weight must be (V, d), got shape {tuple(weight.shape)}")
    vocab, d = weight.shape
    if hidden.shape[-1] != d:
        raise ConfigError(
            f"hidden has last dimension {hidden.shape[-1]} but weight is {tuple(weight.shape)} (V, d)"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ConfigError(
            f"labels shape {tuple(labels.shape)} does not match hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ConfigError(f"labels must be an integer tensor, got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ConfigError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")

    hidden2d = hidden.reshape(-1, d)
    labels1d = labels.reshape(-1).to(device=hidden.device, dtype=torch.long)
    _check_label_range(labels1d, vocab, ignore_index)

    return _ChunkedLinearCrossEntropy.apply(
        hidden2d,
        weight,
        labels1d,
        bias,
        chunk_size,
        ignore_index,
        reduction,
        None if logit_softcap is None else float(logit_softcap),
    )


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids_or_labels: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Next-token loss from the last hidden states, like ``transformers``' ``ForCausalLMLoss``.

    Position t predicts token t+1: labels (B, T) are padded on the right with
    ``ignore_index`` and shifted left by one, so the last position predicts nothing
    and ``ignore_index`` labels (padding, prompt tokens) are skipped. The result is the
    mean over predicted tokens, or, when ``num_items_in_batch`` is given (gradient
    accumulation), their sum divided by it -- exactly as ``model(ids, labels=...).loss``.

    Args:
        hidden_states: (B, T, d) output of the decoder (``model.model(...).last_hidden_state``).
        lm_head_weight: (V, d) ``model.get_output_embeddings().weight``.
        input_ids_or_labels: (B, T) labels (usually the input ids, with -100 on padding);
            may be None when ``shift_labels`` is given.
        bias: optional (V,) LM-head bias.
        num_items_in_batch: if given, loss = sum / num_items_in_batch.
        shift_labels: (B, T) labels already aligned with the positions (no shift done).
        chunk_size, logit_softcap: see ``chunked_linear_cross_entropy``.
    """
    if shift_labels is None:
        if input_ids_or_labels is None:
            raise ConfigError("causal_lm_loss needs input_ids_or_labels or shift_labels")
        shift_labels = _next_token_labels(input_ids_or_labels.to(hidden_states.device), ignore_index)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = chunked_linear_cross_entropy(
        hidden_states,
        lm_head_weight,
        shift_labels.to(hidden_states.device),
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        reduction=reduction,
        bias=bias,
        logit_softcap=logit_softcap,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# -- distillation: CE + KL to a teacher's distribution, from both models' hidden states ----------
class _ChunkedLinearDistill(torch.autograd.Function):
    """CE + kl_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) per valid row, in row chunks:

        z_s = h_s W_s^T,  z_t = h_t W_t^T                        (n_c, V) fp32, per chunk
        loss_i = lse(z_s,i) - z_s,i[y_i] + k T^2 sum_v p_v (log p_v - log q_v)
                 p = softmax(z_t,i / T),  q = softmax(z_s,i / T)
        dL/dz_s,i = (softmax(z_s,i) - onehot(y_i) + k T (q - p)) / n   (n = valid rows)
        dL/dh_s = dL/dz_s @ W_s                                   (only this is kept for backward)

    Neither model's (N, V) logits are ever held: at most a few (chunk, V) fp32 buffers.
    """

    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, labels, chunk_size, ignore_index, kl_weight, T, ce):
        cdtype = _compute_dtype(hidden.dtype, weight.dtype)
        device = hidden.device
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            rows = (labels != ignore_index).nonzero().squeeze(1)
            n = max(rows.numel(), 1)
            loss = torch.zeros((), dtype=cdtype, device=device)
            grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
            for start in range(0, rows.numel(), chunk_size):
                idx = rows[start : start + chunk_size]
                y_c = labels.index_select(0, idx).unsqueeze(1)  # (n_c, 1)
                z = _head_logits(hidden.index_select(0, idx).to(cdtype), weight, None, cdtype)  # (n_c, V)
                zt = _head_logits(t_hidden.index_select(0, idx).to(cdtype), t_weight, None, cdtype)
                lp = torch.log_softmax(zt.div_(T), dim=1)  # log p (teacher at T)
                del zt
                ls = torch.log_softmax(z, dim=1)  # log softmax(z_s): the CE part
                lq = ls if T == 1.0 else torch.log_softmax(z.div_(T), dim=1)  # log q (student at T)
                del z
                p = lp.exp()
                kl = lp.sub_(lq).mul_(p).sum() * (T * T)  # sum p (log p - log q), in lp's buffer
                del lp
                loss += kl_weight * kl - (ls.gather(1, y_c).sum() if ce else 0.0)
                if grad_h is None:
                    continue
                g = ls.exp_()  # softmax(z_s), in ls's buffer
                if lq is ls:  # T = 1: q = softmax(z_s) = g
                    g.mul_(float(ce) + kl_weight).sub_(p, alpha=kl_weight)
                else:
                    g.mul_(float(ce)).add_(lq.exp_().sub_(p), alpha=kl_weight * T)
                if ce:
                    g.scatter_add_(1, y_c, torch.full(y_c.shape, -1.0, dtype=cdtype, device=device))
                g.div_(n)
                grad_h.index_copy_(0, idx, _head_input_grad(g, weight, cdtype).to(grad_h.dtype))
            loss = loss / n
        ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad_h,) = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_output.to(grad_h.dtype)
        return gh, None, None, None, None, None, None, None, None, None


def causal_lm_distill_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    kl_weight: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = 128,
) -> torch.Tensor:
    """Next-token CE + kl_weight * T^2 * KL(teacher || student), from both models' last hidden
    states, never holding either (tokens x vocab) logits tensor.

    Equal (within float tolerance) to ``lorakit.quant.lrec_loss(student_logits, teacher_logits,
    labels, kl_weight, T)``: position t predicts label t+1, both terms are averaged over the
    positions whose label is not ``ignore_index``. The gradient flows to ``hidden_states`` only:
    the heads and the teacher get none (use ``lrec_loss`` on full logits when a head trains).

    Args:
        hidden_states: (B, T, d) the student decoder's output; lm_head_weight: (V, d).
        teacher_hidden_states: (B, T, d_t) the teacher's (no grad); teacher_head_weight: (V, d_t).
        labels: (B, T) usually the input ids, with ``ignore_index`` on padding; None: the KL term
            alone, averaged over every position that predicts a next token.
        kl_weight >= 0, temperature > 0; chunk_size: rows per chunk (a few chunk x V fp32 buffers).
    """
    if not kl_weight >= 0 or not temperature > 0:
        raise ConfigError(f"kl_weight must be >= 0 and temperature > 0, got {kl_weight!r} and {temperature!r}")
    _check_chunk_size(chunk_size)
    vocab, d = lm_head_weight.shape
    if teacher_head_weight.shape[0] != vocab or hidden_states.shape[-1] != d \
            or teacher_hidden_states.shape[-1] != teacher_head_weight.shape[1]:
        raise ConfigError(f"shapes do not chain: student {tuple(hidden_states.shape)} @ {tuple(lm_head_weight.shape)}, "
                          f"teacher {tuple(teacher_hidden_states.shape)} @ {tuple(teacher_head_weight.shape)}")
    ce = labels is not None
    if not ce:
        labels = torch.zeros(hidden_states.shape[:-1], dtype=torch.long, device=hidden_states.device)
    if hidden_states.shape[:-1] != teacher_hidden_states.shape[:-1] or tuple(labels.shape) != tuple(
            hidden_states.shape[:-1]):
        raise ConfigError(f"leading shapes differ: student {tuple(hidden_states.shape[:-1])}, teacher "
                          f"{tuple(teacher_hidden_states.shape[:-1])}, labels {tuple(labels.shape)}")
    if lm_head_weight.requires_grad:
        raise ConfigError("causal_lm_distill_loss gives no gradient to the LM head; it requires a frozen head")
    shift = _next_token_labels(labels.to(hidden_states.device), ignore_index).reshape(-1).long()
    _check_label_range(shift, vocab, ignore_index)
    return _ChunkedLinearDistill.apply(
        hidden_states.reshape(-1, d), lm_head_weight, teacher_hidden_states.detach().reshape(-1, teacher_hidden_states.shape[-1]),
        teacher_head_weight.detach(), shift, chunk_size, ignore_index, float(kl_weight), float(temperature), ce)
