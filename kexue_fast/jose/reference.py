"""Pure-torch truth for JoSE's update algebra (Meng et al., "Spherical Text Embedding", NeurIPS 2019; kexue.fm
"JoSE:球面上的词向量和句向量").

Word (centre) vectors u, context vectors v and document vectors d live on the unit sphere. With a negatively
sampled centre word u' the losses are hinges on cosines (= dot products of unit vectors):

    separate (the official code)  word–context  max(0, m − uᵀv + u'ᵀv)     word–document  max(0, m − uᵀd + u'ᵀd)
    joint    (the paper)          max(0, m − uᵀv − uᵀd + u'ᵀv + u'ᵀd)

Riemannian SGD: every vector x with Euclidean gradient ∇ = ∂L/∂x steps along the tangent direction
t = −(I − x xᵀ)∇ by α·c and is renormalized (the retraction):

    x ← (x + α c t) / ‖x + α c t‖.

The step factor c has two rules. The paper scales by the cosine distance between −∇ and x, c = 1 + xᵀ∇/‖∇‖;
the official C code (yumeng5/Spherical-Text-Embedding, jose.c) keeps that factor for the centre word but uses
2·xᵀ∇/‖∇‖ for the negative (which can be negative) and the unnormalized 1 + xᵀ∇ for the context / document.
For the separate word–context hinge, with f = uᵀv, h = u'ᵀv (the word–document hinge is the same with d for v):

    vector  tangent t               paper c                  jose_c c
    u       v − f u                 1 − f                    1 − f
    u'      h u' − v                1 + h                    2h
    v       (u − u') − (f − h) v    1 + (h − f)/‖u − u'‖     1 − (f − h)

For the joint hinge, with f = uᵀv, g = uᵀd, h = u'ᵀv, k = u'ᵀd, s = v + d:

    u       s − (f + g) u           1 − (f + g)/‖s‖          1 − (f + g)/‖s‖
    u'      (h + k) u' − s          1 + (h + k)/‖s‖          2(h + k)/‖s‖
    v       (u − u') − (f − h) v    1 + (h − f)/‖u − u'‖     1 − (f − h)
    d       (u − u') − (g − k) d    1 + (k − g)/‖u − u'‖     1 − (g − k)

Every ratio x/y above lies in [−1, 1] (Cauchy–Schwarz, unit rows) and is clamped there: computed in floating point
from nearly cancelling sums, or by a Hogwild thread from rows another thread is rewriting, it can blow up.

A pair updates only while its hinge is active (f − h < m, resp. f + g − h − k < m); every gradient is taken at the
old vectors. Shapes: every vector argument is [B, D] (B independent triples, rows assumed unit-norm) or [D].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

STEP_RULES = ("paper", "jose_c")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


def retract(x: Tensor, direction: Tensor, scale: Tensor) -> Tensor:
    """(x + scale·direction) / ‖x + scale·direction‖ over the last dim; scale [..., 1] broadcasts."""
    y = x + scale * direction
    return y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)


def _check_rule(step_rule: str) -> None:
    if step_rule not in STEP_RULES:
        raise ValueError(f"step_rule must be one of {STEP_RULES}; got {step_rule!r}")


class SeparateUpdate(NamedTuple):
    """New u, v, u' ([B, D]), the hinge loss [B] and whether each triple was active [B]."""

    u: Tensor
    v: Tensor
    u_neg: Tensor
    loss: Tensor
    active: Tensor


class JointUpdate(NamedTuple):
    """New u, v, d, u' ([B, D]), the joint hinge loss [B] and whether each triple was active [B]."""

    u: Tensor
    v: Tensor
    d: Tensor
    u_neg: Tensor
    loss: Tensor
    active: Tensor


def _unit_ratio(x: Tensor, y: Tensor) -> Tensor:
    """x / y clamped to [−1, 1]: the ratios (h − f)/‖u − u'‖, (k − g)/‖u − u'‖, (h + k)/‖s‖, (f + g)/‖s‖ lie there
    (Cauchy–Schwarz with unit rows), but computed in floating point from nearly cancelling sums, or by a Hogwild
    thread from rows another thread is rewriting, they can blow up (and turn a row into NaN)."""
    return (x / y.clamp_min(torch.finfo(x.dtype).tiny)).clamp(-1.0, 1.0)


def separate_factors(f: Tensor, h: Tensor, pair_dist: Tensor, step_rule: str) -> tuple[Tensor, Tensor, Tensor]:
    """Step factors (c_u, c_u', c_v) of the separate hinge; pair_dist = ‖u − u'‖ (used by the paper's c_v)."""
    _check_rule(step_rule)
    c_u = 1 - f
    if step_rule == "paper":
        return c_u, 1 + h, 1 + _unit_ratio(h - f, pair_dist)
    return c_u, 2 * h, 1 - (f - h)


def separate_update(u: Tensor, v: Tensor, u_neg: Tensor, alpha: float, margin: float, step_rule: str = "paper"):
    """One Riemannian step on max(0, m − uᵀv + u'ᵀv) for each row; returns a SeparateUpdate."""
    f, h = _dot(u, v), _dot(u_neg, v)
    active = (f - h) < margin
    dist = torch.linalg.vector_norm(u - u_neg, dim=-1, keepdim=True)
    c_u, c_n, c_v = separate_factors(f, h, dist, step_rule)
    a = torch.where(active, torch.as_tensor(alpha, dtype=u.dtype, device=u.device), torch.zeros_like(f))
    new_u = torch.where(active, retract(u, v - f * u, a * c_u), u)
    new_n = torch.where(active, retract(u_neg, h * u_neg - v, a * c_n), u_neg)
    new_v = torch.where(active, retract(v, (u - u_neg) - (f - h) * v, a * c_v), v)
    loss = (margin - (f - h)).clamp_min(0).squeeze(-1)
    return SeparateUpdate(new_u, new_v, new_n, loss, active.squeeze(-1))


def joint_factors(f: Tensor, g: Tensor, h: Tensor, k: Tensor, s_norm: Tensor, pair_dist: Tensor, step_rule: str):
    """Step factors (c_u, c_u', c_v, c_d) of the joint hinge; s_norm = ‖v + d‖, pair_dist = ‖u − u'‖."""
    _check_rule(step_rule)
    c_u = 1 - _unit_ratio(f + g, s_norm)
    if step_rule == "paper":
        return c_u, 1 + _unit_ratio(h + k, s_norm), 1 + _unit_ratio(h - f, pair_dist), 1 + _unit_ratio(k - g, pair_dist)
    return c_u, 2 * _unit_ratio(h + k, s_norm), 1 - (f - h), 1 - (g - k)


def joint_update(u: Tensor, v: Tensor, d: Tensor, u_neg: Tensor, alpha: float, margin: float,
                 step_rule: str = "paper") -> JointUpdate:  # fmt: skip
    """One Riemannian step on max(0, m − uᵀv − uᵀd + u'ᵀv + u'ᵀd) for each row; returns a JointUpdate."""
    f, g, h, k = _dot(u, v), _dot(u, d), _dot(u_neg, v), _dot(u_neg, d)
    gap = f + g - h - k
    active = gap < margin
    s = v + d
    s_norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    dist = torch.linalg.vector_norm(u - u_neg, dim=-1, keepdim=True)
    c_u, c_n, c_v, c_d = joint_factors(f, g, h, k, s_norm, dist, step_rule)
    a = torch.where(active, torch.as_tensor(alpha, dtype=u.dtype, device=u.device), torch.zeros_like(f))
    diff = u - u_neg
    new_u = torch.where(active, retract(u, s - (f + g) * u, a * c_u), u)
    new_n = torch.where(active, retract(u_neg, (h + k) * u_neg - s, a * c_n), u_neg)
    new_v = torch.where(active, retract(v, diff - (f - h) * v, a * c_v), v)
    new_d = torch.where(active, retract(d, diff - (g - k) * d, a * c_d), d)
    loss = (margin - gap).clamp_min(0).squeeze(-1)
    return JointUpdate(new_u, new_v, new_d, new_n, loss, active.squeeze(-1))


def riemannian_direction(x: Tensor, egrad: Tensor) -> Tensor:
    """−(I − x xᵀ)∇: the descent direction projected on the tangent space at x (x unit-norm, rows [B, D])."""
    return -(egrad - _dot(x, egrad) * x)


def cosine_factor(x: Tensor, egrad: Tensor) -> Tensor:
    """The paper's step factor c = 1 + xᵀ∇/‖∇‖ (the cosine distance between −∇ and x) [B, 1]."""
    return 1 + _dot(x, egrad) / torch.linalg.vector_norm(egrad, dim=-1, keepdim=True)
