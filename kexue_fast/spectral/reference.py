"""Pure-torch truth for spectral normalization (readable, float64-capable, differentiable).

Power iteration (Golub & Van Loan §8.2; as used by Miyato et al. 2018, "Spectral Normalization for GANs", and by
torch.nn.utils.parametrizations.spectral_norm): for W ∈ R^{m×n} and a start vector v,

    u ← W v / ‖W v‖,    v ← Wᵀ u / ‖Wᵀ u‖,    σ̂ = uᵀ W v = ‖Wᵀ u‖,

where each ‖·‖ is clamped below by `eps`. σ̂ ≤ σ₁(W) = ‖W‖₂ always, and σ̂ → σ₁ at rate (σ₂/σ₁)^{2k}.

Gram iteration (Delattre, Barthélemy, Araujo & Allauzen 2023, "Efficient Bound of Lipschitz Constant for
Convolutional Layers by Gram Iteration", Alg. 1) gives a certified *upper* bound:

    G₀ = W,  r₀ = 0;   r_{t+1} = 2 (r_t + log‖G_t‖_F),   G_{t+1} = (G_t/‖G_t‖_F)ᵀ (G_t/‖G_t‖_F)
    ‖W‖₂ ≤ ‖G_N‖_F^{1/2^N} · exp(r_N / 2^N),

which converges to σ₁ super-exponentially in N (the bound is ‖(WᵀW)^{2^{N-1}}‖_F^{1/2^N}).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def unit_or_keep(
    x: Tensor, previous: Tensor, eps: float, dim: Optional[int] = 0, out: Optional[Tensor] = None
) -> Tensor:
    """x/max(‖x‖, eps) along dim (dim=None: over all of x), or `previous` where x = 0: a zero weight (a
    zero-initialized layer) would otherwise zero the iterates for good (σ̂ = 0 from then on, whatever the weight
    becomes). No host sync. out=previous updates it in place by torch.where(out=): a copy_ into a module's buffer is
    refused inside torch.func transforms (torch.func.grad of a training forward: "mutate a captured Tensor"), an out=
    op is not, as torch's own spectral_norm writes its u, v by F.normalize(out=)."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(eps), previous, out=out)


def power_iteration_step(
    weight: Tensor, v: Tensor, eps: float = 1e-12, u: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """One iteration for one matrix `weight` [m, n] from `v` [n]; returns (u [m], v [n]), both unit; where Wv = 0
    (a zero weight) u is kept (`u`, or zeros when not given) and v too."""
    wv = torch.mv(weight, v)
    u = unit_or_keep(wv, torch.zeros_like(wv) if u is None else u, eps)
    v = unit_or_keep(torch.mv(weight.mH, u), v, eps)
    return u, v


def power_iteration(
    weights: Sequence[Tensor], v: Sequence[Tensor], n_iters: int, tol: Optional[float] = None, eps: float = 1e-12
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """Per-matrix loop: the truth the fast backends are checked against.

    weights: list of [m_i, n_i]; v: list of start vectors [n_i] (any non-zero norm).
    Returns (sigma [L], u list of [m_i], v list of [n_i]). With `tol`, each matrix stops once
    |σ̂_k − σ̂_{k−1}| ≤ tol·σ̂_k (after at least 2 iterations), else it runs exactly `n_iters`.
    """
    sigmas, us, vs = [], [], []
    for w, v0 in zip(weights, v):
        vk = F.normalize(v0, dim=0, eps=eps)
        previous = None
        u = None
        for _ in range(n_iters):
            u, vk = power_iteration_step(w, vk, eps, u)
            sigma = torch.linalg.vector_norm(torch.mv(w.mH, u))
            if tol is not None and previous is not None and abs(float(sigma - previous)) <= tol * float(sigma):
                break
            previous = sigma
        sigmas.append(sigma)
        us.append(u)
        vs.append(vk)
    return torch.stack(sigmas) if sigmas else torch.empty(0), us, vs


def power_iteration_batched(
    weight: Tensor, v: Tensor, n_iters: int, eps: float = 1e-12
) -> Tuple[Tensor, Tensor, Tensor]:
    """Same iteration for a batch of equal shapes: weight [B, m, n], v [B, n] -> (sigma [B], u [B, m], v [B, n])."""
    v = F.normalize(v, dim=-1, eps=eps)
    u = None
    for _ in range(n_iters):
        wv = torch.bmm(weight, v.unsqueeze(-1)).squeeze(-1)
        u = unit_or_keep(wv, torch.zeros_like(wv) if u is None else u, eps, dim=-1)
        w = torch.bmm(weight.mH, u.unsqueeze(-1)).squeeze(-1)
        sigma = torch.linalg.vector_norm(w, dim=-1)
        v = unit_or_keep(w, v, eps, dim=-1)  # where W = 0, v is kept (σ = 0)
    return sigma, u, v


def gram_iteration_bound(weight: Tensor, n_iters: int) -> Tensor:
    """Certified upper bound on ‖W‖₂ by Gram iteration (no rounding safeguards; see kexue_fast.spectral_norm_bound).

    weight [..., m, n] -> [...]. Works on the smaller Gram matrix (WᵀW or WWᵀ have the same spectrum).
    """
    g = weight if weight.shape[-2] >= weight.shape[-1] else weight.mT
    # scaled by the largest entry first: the first Frobenius norm would overflow for entries above ~1e154 (float64)
    peak = g.detach().abs().amax((-2, -1)).clamp_min(torch.finfo(g.dtype).tiny)
    g = g / peak[..., None, None]
    log_scale = torch.zeros(weight.shape[:-2], dtype=weight.dtype, device=weight.device)
    for _ in range(n_iters):
        f = torch.linalg.matrix_norm(g, ord="fro").clamp_min(torch.finfo(g.dtype).tiny)
        log_scale = 2.0 * (log_scale + torch.log(f))
        g = g / f[..., None, None]
        g = g.mT @ g
    scale = 2.0 ** (-n_iters)
    fro = torch.linalg.matrix_norm(g, ord="fro")
    # a zero matrix: bound 0 with gradient 0 (as vector_norm's at 0), not exp(log 0)'s 0 · ∞ = NaN
    nonzero = fro > 0
    safe = torch.where(nonzero, fro, torch.ones_like(fro))
    return torch.where(nonzero, peak * torch.exp(scale * (torch.log(safe) + log_scale)), torch.zeros_like(fro))


def conv_operator_matrix(conv, weight: Tensor, input_shape: Sequence[int]) -> Tensor:
    """The explicit matrix of x ↦ conv(x, weight) on inputs of `input_shape` (C, *spatial): its columns are the
    conv applied to each basis vector. Only for small shapes (tests)."""
    numel = math.prod(input_shape)
    basis = torch.eye(numel, dtype=weight.dtype, device=weight.device).reshape(numel, *input_shape)
    return conv(basis, weight).reshape(numel, -1).mT
