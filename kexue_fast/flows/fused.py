"""The fused Triton forward of a two-layer dense branch g(x) = W₂ φ(W₁x·t₁ + b₁)·t₂ + b₂ (kernels/iresnet.py), with
its autograd, and the log-det series that reuses the kernel's activation derivatives.

t_i = 1 / max(1, σ̂_i / c) are the spectral-norm scales of kexue_fast.nn.spectral_norm layers (1 for plain Linear),
taken as differentiable scalars so that the gradient reaches σ̂ = uᵀWv as it does through W/σ in torch. Backward:
with A = φ(h), D = φ'(h) from the kernel and ḡ the gradient of y,
    ∂x = ḡ + ((ḡ W₂)·t₂ ⊙ D) W₁·t₁,  ∂W₂ = (ḡᵀA)·t₂,  ∂t₂ = ⟨ḡᵀA, W₂⟩,  ∂W₁ = (Gᵀx)·t₁,  ∂t₁ = ⟨Gᵀx, W₁⟩
with G = (ḡ W₂)·t₂ ⊙ D; ∂b₂ = Σḡ, ∂b₁ = ΣG; ∂β (LipSwish) = Σ (ḡW₂)·t₂ ⊙ ∂φ/∂β.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._autograd import first_order
from .chain import DenseChain
from .logdet import SeriesPlan, _per_sample, value_with_gradient_of

_DOUBLE_BACKWARD = {
    "op": "InvertibleResBlock's fused Triton block",
    "instead": 'backend="torch" or "cpp" (closed forms with a graph backward) support it',
}  # first_order's message


def _activation_param(act: nn.Module) -> Tuple[str, Optional[Tensor], float]:
    from ..nn.iresnet import LipSwish

    if isinstance(act, LipSwish):
        return "lipswish", act.beta, 0.0
    if isinstance(act, nn.ELU):
        return "elu", None, float(act.alpha)
    return "tanh", None, 0.0


class _DenseResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, t1, t2, beta, activation: str, const: float):
        from ..kernels.iresnet import dense_residual_forward

        param = beta.detach().reshape(1) if beta is not None else torch.full((1,), const, device=x.device)
        param = param.to(x.dtype).contiguous()
        scales = torch.stack([t1.reshape(()), t2.reshape(())]).detach().contiguous()
        y, a, d = dense_residual_forward(x.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(),
                                         b2.contiguous(), scales, activation, param)  # fmt: skip
        ctx.activation = activation
        ctx.save_for_backward(x, w1, b1, w2, t1, t2, a, d, param)
        ctx.mark_non_differentiable(a, d)
        return y, a, d

    @staticmethod
    @first_order(**_DOUBLE_BACKWARD)
    def backward(ctx, gy, _ga, _gd):
        x, w1, b1, w2, t1, t2, a, d, param = ctx.saved_tensors
        ga = (gy @ w2) * t2
        gh = ga * d
        gx = gy + (gh @ w1) * t1
        gw2_eff = gy.T @ a
        gw1_eff = gh.T @ x
        gbeta = None
        if ctx.activation == "lipswish" and ctx.needs_input_grad[7]:
            h = (x @ w1.T) * t1 + b1
            s = torch.sigmoid(param * h)
            gbeta = (ga * h * h * s * (1 - s) / 1.1).sum().reshape(())
        return (gx, gw1_eff * t1, gh.sum(0), gw2_eff * t2, gy.sum(0), (gw1_eff * w1).sum().reshape(t1.shape),
                (gw2_eff * w2).sum().reshape(t2.shape), gbeta, None, None)  # fmt: skip


class FusedDenseBranch:
    """A DenseChain of exactly Linear · act · Linear, act ∈ {LipSwish, ELU, Tanh}, Linear plain or normalized by one
    kexue_fast SpectralNorm in matrix mode: the shape the fused kernel computes."""

    def __init__(self, chain: DenseChain) -> None:
        self.chain = chain

    @classmethod
    def detect(cls, chain: Optional[DenseChain]) -> Tuple[Optional[FusedDenseBranch], str]:
        from ..nn.iresnet import LipSwish
        from ..nn.spectral_norm import SpectralNorm

        if chain is None:
            return None, "g is not a dense chain"
        if len(chain.linears) != 2:
            return None, f"the fused kernel handles Linear·act·Linear, g has {len(chain.linears)} Linear layers"
        if not isinstance(chain.activations[0], (LipSwish, nn.ELU, nn.Tanh)):
            return None, f"the fused kernel has no {type(chain.activations[0]).__name__}"
        for layer in chain.linears:
            if layer.bias is None:
                return None, "the fused kernel needs biases"
            plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
            if plist is not None and (len(plist) != 1 or not isinstance(plist[0], SpectralNorm) or plist[0].conv
                                      is not None or plist[0].dim != 0):  # fmt: skip
                return None, "the fused kernel takes plain weights or one matrix-mode kexue_fast spectral norm"
        if chain.linears[0].in_features > 128:
            return None, f"the fused kernel keeps D <= 128 in registers, D = {chain.linears[0].in_features}"
        return cls(chain), ""

    def raw_and_scales(self) -> Tuple[List[Tensor], List[Tensor]]:
        raws, scales = [], []
        for layer in self.chain.linears:
            plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
            if plist is None:
                raws.append(layer.weight)
                scales.append(layer.weight.new_ones(()))
                continue
            raws.append(plist.original)
            scales.append(1.0 / plist[0].divisor(plist.original))
        return raws, scales

    def series_logdet(self, x: Tensor, plans: Sequence[SeriesPlan], probes: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """(y = x + g(x), log-det estimate [B]) with the Neumann gradient (the only gradient mode fused)."""
        (w1, w2), (t1, t2) = self.raw_and_scales()
        l1, l2 = self.chain.linears
        activation, beta, const = _activation_param(self.chain.activations[0])
        y, _, d = _DenseResidual.apply(x, w1, l1.bias, w2, l2.bias, t1, t2, beta, activation, const)
        weights_c = [(w1 * t1).detach(), (w2 * t2).detach()]
        value = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        need_grad = torch.is_grad_enabled() and y.requires_grad
        rows = []
        for plan, v in zip(plans, probes):
            w = v
            weighted = torch.zeros_like(v)
            row = torch.zeros_like(v)
            for k in range(1, plan.n_terms + 1):
                if need_grad:
                    row = row.add(plan.term(k, w), alpha=plan.neumann_coeff(k))
                w = DenseChain.vjp(w, weights_c, [d])
                weighted = weighted.add(plan.term(k, w), alpha=plan.value_coeff(k))
            value = value + _per_sample(weighted, v)
            rows.append(row)
        value = value / len(probes)
        if not need_grad:
            return y.detach(), value
        # The surrogate rᵀ J v needs φ'(h) with its graph in (x, θ): one small torch recomputation of h.
        w1e, w2e = w1 * t1, w2 * t2
        h = torch.nn.functional.linear(x, w1e, l1.bias)
        _, d_graph = self.chain.rules[0](h, self.chain.activations[0])
        surrogate = 0
        for row, v in zip(rows, probes):
            surrogate = surrogate + _per_sample(row, ((v @ w1e.T) * d_graph) @ w2e.T)
        return y, value_with_gradient_of(value, surrogate / len(probes))
