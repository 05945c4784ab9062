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

from .logdet import SeriesPlan, _per_sample, value_with_gradient_of


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


class SavedBeta:
    """A LipSwish stand-in for the rules above whose β = softplus(raw β) comes from the raw β a Function saved (the
    tensor the forward ran with: under torch.func.functional_call a swapped-in one, which the module no longer holds
    by the time of the backward)."""

    def __init__(self, raw_beta: Tensor) -> None:
        self.beta = F.softplus(raw_beta)


def with_saved_beta(module, raw_beta: Optional[Tensor]):
    """`module` for an activation rule, or a SavedBeta of `raw_beta` where the activation is a LipSwish."""
    return module if raw_beta is None else SavedBeta(raw_beta)


def is_plain(module: nn.Module, classes: Tuple[type, ...]) -> bool:
    """Whether `module` is exactly one of `classes`, or torch.nn.utils.parametrize's subclass of one (which changes
    only how `.weight` is read): a user's subclass may override forward, which a closed form would skip."""
    cls = type(module)
    return cls in classes or (cls.__name__.startswith("Parametrized") and len(cls.__bases__) == 1
                              and cls.__bases__[0] in classes)  # fmt: skip


def hook_free(modules: Sequence[nn.Module]) -> bool:
    """Whether calling these modules runs nothing but their forward: no forward or backward hooks, per module or
    global (e.g. torch.nn.utils.spectral_norm's pre-hook, pruning, activation recorders), which a closed form that
    reads the weights directly would skip. Checked at every call: hooks can be added after the block is built."""
    from torch.nn.modules import module as torch_module

    if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks):  # fmt: skip
        return False
    return not any(m._forward_hooks or m._backward_hooks or m._backward_pre_hooks or _foreign_pre_hooks(m)
                   for m in modules)  # fmt: skip


def _foreign_pre_hooks(module: nn.Module) -> bool:
    """Forward pre-hooks other than an operator-mode spectral norm's input-size check (kexue_fast.nn.spectral_norm),
    which the closed forms run themselves (_ConvLayer.check_input)."""
    hooks = module._forward_pre_hooks
    return bool(hooks) and not all(getattr(h, "input_size_check", False) for h in hooks.values())


class DenseChain:
    """The Linear layers and activations of g, read through their (possibly parametrized) `.weight`."""

    def __init__(self, linears: List[nn.Linear], activations: List[nn.Module]) -> None:
        self.linears = linears
        self.activations = activations
        table = _rules()
        self.rules: List[Callable] = [table[type(a)] for a in activations]
        self.closed_form: Optional[object] = None  # chain_neumann's description of the chain, built on first use

    @classmethod
    def detect(cls, g: nn.Module) -> Optional[DenseChain]:
        """A chain Linear (act Linear)* of supported activations, else None."""
        if type(g) is not nn.Sequential or len(g) % 2 == 0:  # a subclass may change what forward computes
            return None
        layers = list(g)
        linears, acts = layers[0::2], layers[1::2]
        table = _rules()
        if not all(is_plain(m, (nn.Linear,)) for m in linears):
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


def series_value_and_rows(
    weights: Sequence[Tensor], derivs: Sequence[Tensor], plans: Sequence[SeriesPlan], probes: Sequence[Tensor],
    rows: bool,
) -> Tuple[Tensor, Optional[List[Tensor]]]:  # fmt: skip
    """The estimate mean_p Σ_k c_k v_pᵀJ^k v_p [B] and, if `rows`, the Neumann rows Σ_k c'_k v_pᵀJ^{k−1} per probe.

    Σ_k c_k wᵀ_k is accumulated and dotted with v once at the end; differentiable if weights and derivs carry a
    graph."""
    value = None
    found: List[Tensor] = []
    for plan, v in zip(plans, probes):
        w = v
        weighted = None
        row = None
        for k in range(1, plan.n_terms + 1):
            if rows:
                c = plan.neumann_coeff(k)
                row = plan.term(k, w) * c if row is None else row + plan.term(k, w) * c
            w = DenseChain.vjp(w, weights, derivs)
            c = plan.value_coeff(k)
            # `a + b * c`, not a.add(b, alpha=c): inductor (torch 2.13, CPU) drops alpha when b is a matmul's result
            weighted = plan.term(k, w) * c if weighted is None else weighted + plan.term(k, w) * c
        per_probe = _per_sample(weighted, v) if weighted is not None else v.new_zeros(v.shape[0])
        value = per_probe if value is None else value + per_probe
        if rows:
            found.append(row if row is not None else torch.zeros_like(v))
    assert value is not None
    return value / len(probes), (found if rows else None)


def chain_series_logdet(
    chain: DenseChain, x: Tensor, plans: Sequence[SeriesPlan], probes: Sequence[Tensor], *, neumann_grad: bool
) -> Tuple[Tensor, Tensor]:
    """(g(x), log-det estimate [B]) for a dense chain with autograd graphs: same estimator and gradients as
    logdet.series_logdet. Used for neumann_grad=False (the series differentiated) and under torch.compile; eager
    Neumann gradients take the closed form of kexue_fast.flows.chain_neumann."""
    gx, weights, derivs = chain.forward(x)  # derivs carry the graph of h(x, θ) when gradients are wanted
    need_grad = torch.is_grad_enabled() and gx.requires_grad
    through_series = need_grad and not neumann_grad
    if through_series:
        weights_c, derivs_c = weights, derivs
    else:
        weights_c = [w.detach() for w in weights]
        derivs_c = [d.detach() for d in derivs]
    value, rows = series_value_and_rows(weights_c, derivs_c, plans, probes, rows=need_grad and not through_series)
    if not need_grad:
        return gx.detach(), value.detach()
    if through_series:
        return gx, value
    assert rows is not None
    surrogate = 0
    for row, v in zip(rows, probes):
        surrogate = surrogate + _per_sample(row, DenseChain.jvp(v, weights, derivs))
    return gx, value_with_gradient_of(value.detach(), surrogate / len(probes))
