"""Pure-torch truth for the orthogonality regularizers (materializes every intermediate: the spec, not the fast path).

Self-Orthogonality Module (SOM; Zhang et al. 2020, "Self-Orthogonality Module: A Network Architecture Plug-in for
Learning Orthogonal Filters", WACV; kexue.fm post "Self-Orthogonality Module"). For a layer output Y [b, k] (b =
batch × positions, k = neurons/channels):

    Z = tanh(γY),   ẑ_j = z_j / max(‖z_j‖, eps) (columns),   Θ = ẐᵀẐ [k, k],
    R = λ₁ (Σ_{i≠j} Θ_ij)² + λ₂ Σ_{i≠j} Θ_ij²          (γ = 10, λ₁ = 100, λ₂ = 1 in the paper).

Exact identities make it cheap (`som_cheap`): Σ_{i,j} Θ_ij = ‖Ẑ1‖² (O(bk)) and ‖ẐᵀẐ‖_F = ‖ẐẐᵀ‖_F, so with
d_i = Θ_ii = ‖ẑ_i‖²,  Σ_{i≠j} Θ_ij = ‖Ẑ1‖² − Σd_i  and  Σ_{i≠j} Θ_ij² = ‖ẐẐᵀ‖_F² − Σd_i²  (O(bk·min(b, k))).

Weight regularizers, with W the weight reshaped to [out, fan_in] (one row per filter) so that W Wᵀ is the filters'
Gram (the papers' WᵀW with filters as columns):
    BigGAN (Brock et al. 2019, eq. 3)        R_β(W) = β ‖W Wᵀ ⊙ (11ᵀ − I)‖_F²
    soft orthogonality (Brock et al. 2017;   R(W) = s ‖W Wᵀ − I‖_F²
    Bansal et al. 2018)
"""

from __future__ import annotations

import torch
from torch import Tensor


def normalized_tanh(y: Tensor, gamma: float, eps: float = 1e-12) -> Tensor:
    """Ẑ [b, k]: the columns of tanh(γY) scaled to unit norm (norm clamped below at eps)."""
    z = torch.tanh(gamma * y)
    return z / torch.linalg.vector_norm(z, dim=0).clamp_min(eps)


def som_direct(y: Tensor, gamma: float = 10.0, lambda1: float = 100.0, lambda2: float = 1.0, eps: float = 1e-12):
    """R by the definition: Θ = ẐᵀẐ materialized [k, k], off-diagonal entries summed. y: [b, k]."""
    zh = normalized_tanh(y, gamma, eps)
    theta = zh.T @ zh
    off = ~torch.eye(theta.shape[0], dtype=torch.bool, device=theta.device)
    s1 = theta[off].sum()
    s2 = (theta[off] ** 2).sum()
    return lambda1 * s1**2 + lambda2 * s2


def som_cheap(y: Tensor, gamma: float = 10.0, lambda1: float = 100.0, lambda2: float = 1.0, eps: float = 1e-12):
    """R by the identities: ‖Ẑ1‖² for the sum, the smaller of ẐẐᵀ [b, b] and ẐᵀẐ [k, k] for the squares. y: [b, k]."""
    zh = normalized_tanh(y, gamma, eps)
    d = (zh * zh).sum(0)
    s1 = (zh.sum(1) ** 2).sum() - d.sum()
    gram = zh @ zh.T if y.shape[0] < y.shape[1] else zh.T @ zh
    s2 = (gram**2).sum() - (d * d).sum()
    return lambda1 * s1**2 + lambda2 * s2


def filters(weight: Tensor) -> Tensor:
    """The weight as [out, fan_in]: one row per output unit (filter)."""
    return weight.reshape(weight.shape[0], -1)


def biggan_orthogonal_direct(weight: Tensor, beta: float = 1e-4) -> Tensor:
    """β ‖W Wᵀ ⊙ (11ᵀ − I)‖_F² with the Gram materialized."""
    w = filters(weight)
    gram = w @ w.T
    off = ~torch.eye(gram.shape[0], dtype=torch.bool, device=gram.device)
    return beta * (gram[off] ** 2).sum()


def orthogonality_direct(weight: Tensor, strength: float = 1.0) -> Tensor:
    """s ‖W Wᵀ − I‖_F² with the Gram materialized."""
    w = filters(weight)
    gram = w @ w.T
    return strength * ((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)) ** 2).sum()
