"""The cascade's GAN losses: a weighted average over stages of the per-stage losses (kexue.fm "级联抑制").

For stage scores D [B, N] and stage weights λ [N] (λ ≥ 0, Σλ > 0):
    discriminator   L_D = Σ_i λ_i mean_b ℓ(D_bi, real_b) / Σ_i λ_i
    generator       L_G = Σ_i λ_i mean_b g(D_bi) / Σ_i λ_i      (scores of generated samples)
with, per kind,          ℓ(D, real)        ℓ(D, fake)         g(D)
    "hinge"              relu(1 − D)       relu(1 + D)        −D
    "bce"                softplus(−D)      softplus(D)        softplus(−D)   (non-saturating)
    "wgan"               −D                D                  −D
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("hinge", "bce", "wgan")
StageWeights = Union[Sequence[float], Tensor, None]


def stage_weights(weights: StageWeights, n_stages: int, *, device=None, dtype=torch.float32) -> Tensor:
    """λ [n_stages] normalized to sum 1 (uniform when None), after checking it is finite, ≥ 0, with a positive sum
    (read on the host: one sync for a GPU tensor). A tensor that requires grad gives a λ differentiable in it."""
    if isinstance(n_stages, bool) or not isinstance(n_stages, numbers.Integral) or n_stages < 1:
        raise ValueError(f"n_stages must be an int >= 1, got {n_stages!r}")
    if isinstance(weights, (str, bytes)):
        raise TypeError(f"weights must be a sequence of numbers or a tensor, got {type(weights).__name__}")
    if weights is None:
        return torch.full((n_stages,), 1.0 / n_stages, device=device, dtype=dtype)
    if isinstance(weights, Tensor):
        if not (weights.is_floating_point() or weights.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"weights must be real numbers, got a tensor of {weights.dtype}")
        values = [float(x) for x in weights.detach().reshape(-1).cpu()]
        shape = tuple(weights.shape)
    else:
        try:
            values = [float(x) for x in weights]
        except (TypeError, ValueError):
            raise TypeError(f"weights must be a sequence of numbers or a tensor, got {weights!r}") from None
        shape = (len(values),)
    if shape != (n_stages,):
        raise ValueError(f"weights must have one entry per stage (n_stages = {n_stages}), got shape {shape}")
    if not all(math.isfinite(x) and x >= 0 for x in values) or max(values) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {values}")
    top = max(values)  # scaled first: the sum of large finite weights (1e308, 1e308) would overflow to inf
    if isinstance(weights, Tensor) and weights.requires_grad:
        scaled = weights.reshape(-1).to(device=device, dtype=dtype) / top
        return scaled / scaled.sum()
    total = sum(x / top for x in values)
    return torch.tensor([x / top / total for x in values], device=device, dtype=dtype)


def _scores(scores: object) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating tensor, got {scores.dtype}")
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [batch >= 1, n_stages >= 1] (or [batch]), got shape {tuple(scores.shape)}")
    return scores


def _kind(kind: object) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind  # type: ignore[return-value]


def _average(per_sample: Tensor, weights: StageWeights) -> Tensor:
    lam = stage_weights(weights, per_sample.shape[1], device=per_sample.device, dtype=per_sample.dtype)
    return (per_sample.mean(0) * lam).sum()


def discriminator_terms(scores: Tensor, real: Union[bool, Tensor], kind: str) -> Tensor:
    """ℓ(D_bi, real_b) [B, N] (validated); the loss is its λ-weighted stage average of batch means."""
    scores = _scores(scores)
    kind = _kind(kind)
    if isinstance(real, np.bool_):
        real = bool(real)
    if isinstance(real, Tensor):
        if real.dtype != torch.bool or real.shape not in ((), (scores.shape[0],)):
            raise ValueError(f"real must be a bool, a 0-d bool tensor or a bool tensor [batch] = [{scores.shape[0]}], "
                             f"got {real.dtype} of shape {tuple(real.shape)}")  # fmt: skip
        # a 0-d bool tensor labels the whole batch (not read on the host: no sync, traceable by torch.compile)
        sign = torch.where(real.to(scores.device).reshape(-1, 1), -1.0, 1.0).to(scores.dtype)
    elif isinstance(real, bool):
        sign = -1.0 if real else 1.0
    else:
        raise TypeError(f"real must be a bool or a bool tensor, got {type(real).__name__}")
    signed = sign * scores  # −D for real samples, +D for generated ones
    if kind == "hinge":
        return F.relu(1 + signed)
    if kind == "bce":
        return F.softplus(signed)
    return signed


def generator_terms(scores: Tensor, kind: str) -> Tensor:
    """g(D_bi) [B, N] (validated)."""
    scores = _scores(scores)
    return F.softplus(-scores) if _kind(kind) == "bce" else -scores


def cascading_rejection_loss(
    scores: Tensor, real: Union[bool, Tensor], kind: str = "hinge", weights: StageWeights = None
) -> Tensor:
    """The discriminator loss L_D of stage scores [B, N] (or [B]) for real (real=True) or generated (False) samples,
    or a mixed batch (real: bool tensor [B]). weights: λ [N], uniform by default. A scalar."""
    return _average(discriminator_terms(scores, real, kind), weights)


def cascading_rejection_generator_loss(scores: Tensor, kind: str = "hinge", weights: StageWeights = None) -> Tensor:
    """The generator loss L_G of the stage scores [B, N] (or [B]) of generated samples. A scalar."""
    return _average(generator_terms(scores, kind), weights)
