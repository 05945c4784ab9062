"""Analytic log-det series for dense chains g(x) = W_L φ(⋯ φ(W_1 x + b_1) ⋯) + b_L.

The Jacobian is J = W_L D_{L−1} W_{L−1} ⋯ D_1 W_1 with D_i = diag(φ'(h_i)), h_i the pre-activations. So one
vector–Jacobian product wᵀJ is L matrix products and L−1 elementwise products on [B, ·] rows — no autograd engine,
no recomputation of g: the activation derivatives of the forward pass serve every term of the series. The Neumann
gradient ∂/∂(θ, x) of mean_p rᵀ J v (r the Neumann row) is one small differentiable expression in (W, h(x, θ)).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .logdet import SeriesPlan, _per_sample, _ValueWithGradientOf


# Each activation with its derivative, sharing the transcendental (one sigmoid / exp / tanh per layer).
def _lipswish(h: Tensor, module) -> Tuple[Tensor, Tensor]:
    beta = module.beta
    s = torch.sigmoid(beta * h)
    hs = h * s
    return hs / 1.1, (s + beta * (hs - hs * s)) / 1.1


def _elu(h: Tensor, module) -> Tuple[Tensor, Tensor]:
    a = F.elu(h, module.alpha)
    return a, torch.where(h > 0, torch.ones_like(h), a + module.alpha)


def _tanh(h: Tensor, module) -> Tuple[Tensor, Tensor]:
    a = torch.tanh(h)
    return a, 1 - a * a


def _leaky(h: Tensor, module) -> Tuple[Tensor, Tensor]:
    slope = module.negative_slope
    return F.leaky_relu(h, slope), torch.where(h > 0, torch.ones_like(h), torch.full_like(h, slope))


def _rules():
    from ..nn.iresnet import LipSwish

    return {LipSwish: _lipswish, nn.ELU: _elu, nn.Tanh: _tanh, nn.LeakyReLU: _leaky}


class DenseChain:
    """The Linear layers and activations of g, read through their (possibly parametrized) `.weight`."""

    def __init__(self, linears: List[nn.Linear], activations: List[nn.Module]) -> None:
        self.linears = linears
        self.activations = activations
        table = _rules()
        self.rules: List[Callable] = [table[type(a)] for a in activations]

    @classmethod
    def detect(cls, g: nn.Module) -> Optional[DenseChain]:
        """A chain Linear (act Linear)* of supported activations, else None."""
        if not isinstance(g, nn.Sequential) or len(g) % 2 == 0:
            return None
        layers = list(g)
        linears, acts = layers[0::2], layers[1::2]
        table = _rules()
        if not all(type(m) is nn.Linear or (isinstance(m, nn.Linear) and type(m).__name__.startswith("Parametrized"))
                   for m in linears):  # fmt: skip
            return None
        if not all(type(a) in table for a in acts):
            return None
        return cls(linears, acts)

    def forward(self, x: Tensor) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
        """g(x) with its graph, the effective weights W_i and the activation derivatives φ'(h_i)."""
        weights = [layer.weight for layer in self.linears]
        derivs: List[Tensor] = []
        a = x
        for i, (layer, w) in enumerate(zip(self.linears, weights)):
            a = F.linear(a, w, layer.bias)
            if i < len(self.rules):
                a, d = self.rules[i](a, self.activations[i])
                derivs.append(d)
        return a, weights, derivs

    @staticmethod
    def vjp(w: Tensor, weights: Sequence[Tensor], derivs: Sequence[Tensor]) -> Tensor:
        """wᵀ J for w [B, D]: w W_L, ⊙ D_{L−1}, · W_{L−1}, …, · W_1."""
        for i in range(len(weights) - 1, -1, -1):
            w = w @ weights[i]
            if i > 0:
                w = w * derivs[i - 1]
        return w

    @staticmethod
    def jvp(v: Tensor, weights: Sequence[Tensor], derivs: Sequence[Tensor]) -> Tensor:
        """J v for v [B, D]: v W_1ᵀ, ⊙ D_1, …, · W_Lᵀ."""
        for i, w in enumerate(weights):
            v = v @ w.T
            if i < len(derivs):
                v = v * derivs[i]
        return v


def chain_series_logdet(
    chain: DenseChain, x: Tensor, plans: Sequence[SeriesPlan], probes: Sequence[Tensor], *, neumann_grad: bool
) -> Tuple[Tensor, Tensor]:
    """(g(x), log-det estimate [B]) for a dense chain: same estimator and gradients as logdet.series_logdet.

    Per probe, Σ_k c_k vᵀJ^k v is accumulated as (Σ_k c_k wᵀ_k)·v, one dot at the end; the Neumann row likewise."""
    gx, weights, derivs = chain.forward(x)  # derivs carry the graph of h(x, θ) when gradients are wanted
    need_grad = torch.is_grad_enabled() and gx.requires_grad
    through_series = need_grad and not neumann_grad
    if through_series:
        weights_c, derivs_c = weights, derivs
    else:
        weights_c = [w.detach() for w in weights]
        derivs_c = [d.detach() for d in derivs]
    value = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    surrogate = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for plan, v in zip(plans, probes):
        w = v
        weighted = torch.zeros_like(v)
        row = torch.zeros_like(v) if need_grad and not through_series else None
        for k in range(1, plan.n_terms + 1):
            if row is not None:
                row = row.add(plan.term(k, w), alpha=plan.neumann_coeff(k))
            w = DenseChain.vjp(w, weights_c, derivs_c)
            weighted = weighted.add(plan.term(k, w), alpha=plan.value_coeff(k))
        value = value + _per_sample(weighted, v)
        if row is not None:
            surrogate = surrogate + _per_sample(row, DenseChain.jvp(v, weights, derivs))
    value = value / len(probes)
    if not need_grad:
        return gx.detach(), value.detach()
    if through_series:
        return gx, value
    return gx, _ValueWithGradientOf.apply(value.detach(), surrogate / len(probes))
