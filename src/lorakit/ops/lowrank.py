"""Low-rank factor algebra (pure functions).

All functions take factors A (r, d_in), B (d_out, r) with ΔW = B A and avoid forming the
d_out × d_in product: QR of each factor reduces everything to an r × r core.
"""

from __future__ import annotations

import torch


def svd_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B A from its factors: returns U (d_out, r), S (r,), Vh (r, d_in).

    B = Qb Rb, Aᵀ = Qa Ra  =>  B A = Qb (Rb Raᵀ) Qaᵀ; the SVD of the r×r core gives the rest.
    """
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)  # fp32, or fp64 if given
    qb, rb = torch.linalg.qr(b.to(dt))  # (d_out, r), (r, r)
    qa, ra = torch.linalg.qr(a.to(dt).T)  # (d_in, r), (r, r)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (A', B') of B A in Frobenius norm (Eckart–Young)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    u, s, vh = svd_factors(a, b)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(a.dtype), (u[:, :rank] * root[None]).to(b.dtype)
