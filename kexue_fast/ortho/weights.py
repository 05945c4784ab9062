"""Weight orthogonality regularizers, summed over weights (formulas and papers: kexue_fast.ortho.reference).

With W the weight as [m, n] = [out, fan_in] (one row per filter):
    biggan_orthogonal_regularizer   β ‖W Wᵀ ⊙ (11ᵀ − I)‖_F²  = β (‖G‖_F² − Σ_i ‖w_i‖⁴)
    orthogonality_penalty           s ‖W Wᵀ − I‖_F²          = s (‖G‖_F² − 2‖W‖_F² + m)
where ‖W Wᵀ‖_F = ‖WᵀW‖_F lets G be the smaller of the two Grams (O(mn·min(m, n))). When m ≤ n the m×m Gram is
the small one and the off-diagonal / residual entries are summed directly (no cancellation); when m > n the
identities use the n×n Gram, in float64: their subtraction cancels when the result is small against Σ‖w_i‖⁴
(nearly orthogonal filters), which in float32 cost 3–4 digits.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, List, Union

import torch
from torch import Tensor, nn

Weights = Union[Tensor, nn.Module, Iterable[Tensor]]


def _weights(weights: Weights) -> List[Tensor]:
    """A tensor, a module (its parameters with ndim >= 2, as BigGAN-PyTorch's `ortho`) or an iterable of tensors."""
    if isinstance(weights, Tensor):
        found = [weights]
    elif isinstance(weights, nn.Module):
        found = [p for p in weights.parameters() if p.ndim >= 2]
    else:
        try:
            found = list(weights)
        except TypeError:
            raise TypeError(f"weights must be a tensor, an nn.Module or an iterable of tensors, "
                            f"got {type(weights).__name__}") from None  # fmt: skip
    if not found:
        raise ValueError("no weights to regularize (a module needs parameters with ndim >= 2)")
    for i, w in enumerate(found):
        if not isinstance(w, Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"weights[{i}] must be a floating tensor, got {w.dtype}")
        if w.ndim < 2 or w.numel() == 0:
            raise ValueError(f"weights[{i}] must be a non-empty [out, ...] tensor with ndim >= 2, got {tuple(w.shape)}")
    return found


def _check_strength(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _rows(w: Tensor) -> Tensor:
    w = w.reshape(w.shape[0], -1)
    return w if w.dtype in (torch.float32, torch.float64) else w.float()


def _wide(w: Tensor) -> Tensor:
    """w in float64 for the cancelling identities (MPS has no float64: float32 there)."""
    return w.double() if w.device.type != "mps" else w.float()


def _tall_gram(w: Tensor) -> Tensor:
    """WᵀW [n, n] in float64 (the identities for m > n cancel): its dtype is the result's."""
    w64 = _wide(w)
    return w64.T @ w64


def biggan_orthogonal_regularizer(weights: Weights, beta: float = 1e-4) -> Tensor:
    """Σ_W β‖W Wᵀ ⊙ (11ᵀ − I)‖_F² (Brock et al. 2019, BigGAN, eq. 3; β = 1e-4 there). A scalar.

    Note BigGAN-PyTorch's `ortho` adds β·2(WWᵀ ⊙ (11ᵀ − I))W to the gradient, the gradient of half this value."""
    beta = _check_strength("beta", beta)
    total = []
    for w in _weights(weights):
        w = _rows(w)
        m, n = w.shape
        if m <= n:
            g = w @ w.T
            total.append(_off_diagonal_squares(g))
        else:
            g = _tall_gram(w)
            sq = (_wide(w) ** 2).sum(1)
            total.append(((g * g).sum() - (sq * sq).sum()).to(w.dtype))
    return beta * _sum(total)


def _sum(terms: List[Tensor]) -> Tensor:
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    return torch.stack([t.to(dtype) for t in terms]).sum()


def _off_diagonal_squares(g: Tensor) -> Tensor:
    off = ~torch.eye(g.shape[0], dtype=torch.bool, device=g.device)
    return (torch.where(off, g, torch.zeros_like(g)) ** 2).sum()


def orthogonality_penalty(weights: Weights, strength: float = 1.0) -> Tensor:
    """Σ_W s‖W Wᵀ − I‖_F² (soft orthogonality: Brock et al. 2017; Bansal et al. 2018), W = weight as [out, fan_in].
    A scalar."""
    strength = _check_strength("strength", strength)
    total = []
    for w in _weights(weights):
        w = _rows(w)
        m, n = w.shape
        if m <= n:
            g = w @ w.T
            total.append(((g - torch.eye(m, dtype=g.dtype, device=g.device)) ** 2).sum())
        else:
            g = _tall_gram(w)
            total.append(((g * g).sum() - 2 * (_wide(w) ** 2).sum() + m).to(w.dtype))
    return strength * _sum(total)
