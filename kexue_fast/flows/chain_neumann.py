"""The Neumann gradient of a dense chain's log-det series in closed form: one autograd node, no graph through g.

For g(x) = W_L φ(⋯ φ(W_1 x + b_1) ⋯) + b_L with pre-activations h_i, a_i = φ(h_i) (a_0 = x), d_i = φ'(h_i), the
Neumann gradient of the log-det is the gradient of the surrogate s_b = mean_p r_pbᵀ J_b v_pb with the Neumann rows r
and the probes v held constant, J = W_L D_{L−1} ⋯ D_1 W_1. Forward mode through the chain gives
    z_1 = W_1 v,  u_i = d_i ⊙ z_i (u_0 = v),  z_{i+1} = W_{i+1} u_i,  J v = z_L;
reverse mode from ρ_L = s̄ r, for i = L … 1, with e_i = ρ_i W_i:
    ∂W_i += ρ_iᵀ u_{i−1},  ρ_{i−1} = e_i ⊙ d_{i−1},  ∂h_{i−1} += e_i ⊙ z_{i−1} ⊙ φ''(h_{i−1}),
    ∂β_{i−1} += Σ e_i ⊙ z_{i−1} ⊙ ∂φ'/∂β   (LipSwish's β);
and the branch output g itself, from η_L = ḡ, with f_i = η_i W_i:
    ∂W_i += η_iᵀ a_{i−1},  ∂b_i = Σ_b η_i,  η_{i−1} = f_i ⊙ d_{i−1} + ∂h_{i−1},  ∂x = η_1 W_1,
    ∂β_{i−1} += Σ f_i ⊙ ∂φ/∂β.
A kexue_fast spectral norm with coefficient c, W = V / δ, δ = max(1, σ̂/c), σ̂ = uᵀVv, is folded in: with G = ∂W,
    ∂V = (G − ⟨G, W⟩ κ u vᵀ) / δ,   κ = [σ̂/c ≥ 1] / c.
These are the gradients autograd gets by differentiating the surrogate through the parametrizations
(tests/test_flows.py: 1e-12 in float64), without its double-backward graph and with nothing saved per series term.
The forward-mode pass also gives Jv, so the value's terms are (vᵀJ^{k−1})·(Jv): n − 1 vector–Jacobian products.
The gradient through the series itself (neumann_grad=False) is a sum of such surrogates: for T = Σ_k c_k vᵀJ^k v,
    dT = Σ_{j<n} L_jᵀ dJ r_j,   r_j = J^j v,   L_j = Σ_{i<n−j} c_{i+j+1} vᵀJ^i,
so the same backward runs over the n·P pairs (L_j, r_j), with the forward-mode pass from every r_j (it saves
O(n·B·(d + Σ hidden)) per probe; taken off the CPU only, see _series_closed_form).
Eager only: torch.compile traces kexue_fast.flows.chain.chain_series_logdet instead. Under backward(create_graph=True)
the gradients come from torch's graph of y and the surrogate (recomputed from the saved inputs), so that they can be
differentiated again.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chain import DenseChain, chain_series_logdet, series_value_and_rows, with_saved_beta
from .logdet import SeriesPlan

# Past this many elements, the per-term buffer of the one-GEMM series accumulation gives way to the term-by-term sum.
_STACKED_SERIES_MAX = 1 << 22
_PARAMS = 5  # _ChainNeumann.apply(x, probes, spec, plans, through_series, *params)


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-d tensor, broadcast as an operand (no per-step host-to-device copy)."""
    return torch.tensor(value, dtype=dtype, device=device)


def _sigmoid_backward_(t: Tensor, s: Tensor) -> Tensor:
    """t ⊙ s(1 − s), written into t."""
    return torch.ops.aten.sigmoid_backward.grad_input(t, s, grad_input=t)


class _Activation:
    """φ with φ', and its part of the backward: φ'' and, for LipSwish, the derivatives in β = softplus(raw β)."""

    def __init__(self, module: nn.Module) -> None:
        from ..nn.iresnet import LipSwish

        self.const = 0.0
        if isinstance(module, LipSwish):
            self.kind = "lipswish"
        elif isinstance(module, nn.ELU):
            self.kind, self.const = "elu", float(module.alpha)
        elif isinstance(module, nn.Tanh):
            self.kind = "tanh"
        elif isinstance(module, nn.LeakyReLU):
            self.kind, self.const = "leaky", float(module.negative_slope)
        else:
            raise TypeError(f"no closed-form Neumann gradient for {type(module).__name__}")

    def first(self, h: Tensor, beta: Union[Tensor, float, None]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(φ(h), φ'(h), what the backward reuses: σ(βh) for LipSwish); β a Python number on the CPU."""
        if self.kind == "lipswish":  # φ = h σ(βh)/1.1, φ' = σ (1 + βh(1 − σ))/1.1 = silu'(βh)/1.1
            bh = h * beta
            d = torch.ops.aten.silu_backward(_constant(1 / 1.1, h.dtype, h.device).expand_as(bh), bh)
            s = bh.sigmoid_()
            return torch.addcmul(_constant(0.0, h.dtype, h.device), h, s, value=1 / 1.1), d, s
        if self.kind == "elu":
            a = F.elu(h, self.const)
            return a, torch.where(h > 0, torch.ones_like(h), a + self.const), None
        if self.kind == "tanh":
            a = torch.tanh(h)
            return a, 1 - a * a, None
        slope = torch.full_like(h, self.const)
        return F.leaky_relu(h, self.const), torch.where(h > 0, torch.ones_like(h), slope), None

    def backward(self, f: Optional[Tensor], ez: Optional[Tensor], h: Tensor, a: Tensor, d: Tensor,
                 s: Optional[Tensor], beta: Union[Tensor, float, None]
                 ) -> Tuple[Optional[Tensor], Optional[Tensor]]:  # fmt: skip
        """(∂h, 1.1 ∂β) from f = ∂a (the output's path) and ez = Σ_p e ⊙ z (the surrogate's path); either may be
        None, both are overwritten. β is a Python number on the CPU.

        ∂h = f ⊙ φ' + ez ⊙ φ'';  ∂β = Σ f ⊙ ∂φ/∂β + Σ ez ⊙ ∂φ'/∂β. LipSwish with q = σ(1 − σ),
        m = q (2 + βh(1 − 2σ))/1.1: φ'' = β m, ∂φ'/∂β = h m, ∂φ/∂β = h² q/1.1."""
        if self.kind == "lipswish":  # q-weighted products by sigmoid_backward(t, σ) = t σ(1 − σ)
            assert s is not None and beta is not None
            grad_h, acc = None, None  # 1.1 ∂β = Σ h ⊙ acc
            if f is not None:
                acc = _sigmoid_backward_(f * h, s)  # f h q
                grad_h = f.mul_(d)
            if ez is not None:
                w = torch.rsub(s, 1, alpha=2)  # 1 − 2σ
                two = _constant(2.0, h.dtype, h.device)
                if isinstance(beta, Tensor):
                    w = torch.addcmul(two, h * beta, w)
                    beta_11 = beta / 1.1
                    em = _sigmoid_backward_(ez.mul_(w), s)  # 1.1 ez ⊙ m
                    grad_h = em * beta_11 if grad_h is None else grad_h.addcmul_(em, beta_11)
                else:
                    em = _sigmoid_backward_(ez.mul_(torch.addcmul(two, h, w, value=beta)), s)
                    grad_h = em * (beta / 1.1) if grad_h is None else grad_h.add_(em, alpha=beta / 1.1)
                acc = em if acc is None else acc.add_(em)
            grad_beta = torch.vdot(acc.reshape(-1), h.reshape(-1)) if acc is not None else None
            return grad_h, grad_beta
        grad_h = f.mul_(d) if f is not None else None
        if ez is not None and self.kind in ("elu", "tanh"):
            d2 = torch.where(h > 0, torch.zeros_like(h), d) if self.kind == "elu" else (a * d).mul_(-2)
            grad_h = ez * d2 if grad_h is None else grad_h.addcmul_(ez, d2)
        return grad_h, None


class _Linear:
    """A Linear's weight as the closed form takes it: plain (any parametrization read through `.weight`), or a
    matrix-mode kexue_fast SpectralNorm folded in (its raw weight and u, v)."""

    def __init__(self, layer: nn.Linear) -> None:
        from ..nn.spectral_norm import SpectralNorm

        plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
        self.layer = layer
        self.norm: Optional[SpectralNorm] = None
        if plist is not None and len(plist) == 1 and isinstance(plist[0], SpectralNorm):
            norm = plist[0]
            if norm.conv is None and norm.dim == 0 and plist.original.ndim == 2 and norm.coeff is not None:
                self.norm = norm

    def tensors(self) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """(weight, u, v): the raw weight and the norm's vectors (advanced as SpectralNorm.divisor would; the
        caller snapshots them), or the effective weight and None."""
        if self.norm is None:
            return self.layer.weight, None, None
        from ..nn.spectral_norm import _FROZEN

        norm = self.norm
        original = self.layer.parametrizations.weight.original
        if norm.training and norm.n_power_iterations > 0 and not _FROZEN[0]:
            norm._power_method(original, norm.n_power_iterations)
        return original, norm._u, norm._v


class _Spec:
    """What the closed form needs to know of a chain, built once per DenseChain."""

    def __init__(self, chain: DenseChain) -> None:
        self.chain = chain
        self.linears = [_Linear(layer) for layer in chain.linears]
        self.activations = [_Activation(a) for a in chain.activations]
        self.coeffs = [lin.norm.coeff if lin.norm is not None else None for lin in self.linears]


def _series_closed_form(x: Tensor) -> bool:
    """Whether the gradient through the series (neumann_grad=False) takes the closed form: off the CPU, where a step
    costs per operator (100 instead of 172 in the flows benchmark's step; GPU time unmeasured). On this project's CPU
    the graph path measured faster (the closed form's stacked n·B-row buffers and ~10% more multiply-adds: 4–24%
    slower, `python -m kexue_fast.bench --suite flows --full`, benchmarks/results/flows-cpu.md)."""
    return x.device.type != "cpu"


def _host_scalars(x: Tensor) -> bool:
    """Whether the spectral norms' σ̂ are read as Python numbers (fewer tensor ops; a device sync off the CPU)."""
    return x.device.type == "cpu"


@functools.lru_cache(maxsize=64)
def _series_coefficients(inv_prob: Tuple[float, ...], dtype: torch.dtype, device: torch.device,
                         through_series: bool) -> Tensor:  # fmt: skip
    """The weights of l_i = vᵀJ^i, i = 0..n−1: first the value's (c_{i+1}, to be dotted with Jv); then the Neumann
    row's (c'_{i+1}), or with through_series the rows L_j = Σ_i c_{i+j+1} l_i, j = 0..n−1 ([1 + n, n])."""
    plan = SeriesPlan(inv_prob)
    n = plan.n_terms
    value = [plan.value_coeff(k) for k in range(1, n + 1)]
    if through_series:
        rows = [[plan.value_coeff(i + j + 1) if i + j < n else 0.0 for i in range(n)] for j in range(n)]
    else:
        rows = [[plan.neumann_coeff(k) for k in range(1, n + 1)]]
    return torch.tensor([value, *rows], dtype=dtype, device=device)


def _stacked_series(weights: Sequence[Tensor], derivs: Sequence[Tensor], plan: SeriesPlan, probes: Tensor,
                    jv: Tensor, through_series: bool = False) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """One plan shared by the probes [P, B, D]: l_k = l_{k−1} J (l_0 = v) for k < n into one buffer; the value
    Σ c_k l_{k−1}·(Jv) = Σ c_k vᵀJ^k v and the rows from one small GEMM with the coefficients (jv = Jv [P, B, D], from
    the forward-mode pass the backward needs anyway). Returns (value [B], rows): the Neumann rows Σ c'_k l_{k−1}
    [P, B, D], or with through_series the rows L_j [n, P, B, D] that pair with J^j v in the series' gradient."""
    n, (p, b, dim) = plan.n_terms, probes.shape
    buf = probes.new_empty((n, p * b, dim))
    terms = buf.unbind(0)
    terms[0].copy_(probes.reshape(p * b, dim))
    hidden = [probes.new_empty((p, b, w.shape[1])) for w in weights[1:]]
    hidden_flat = [t.view(p * b, -1) for t in hidden]
    for k in range(1, n):
        w = terms[k - 1]
        for i in range(len(weights) - 1, 0, -1):
            torch.mm(w, weights[i], out=hidden_flat[i - 1])
            hidden[i - 1].mul_(derivs[i - 1])
            w = hidden_flat[i - 1]
        torch.mm(w, weights[0], out=terms[k])
    both = torch.mm(_series_coefficients(plan.inv_prob, probes.dtype, probes.device, through_series),
                    buf.view(n, -1)).view(-1, p, b, dim)  # fmt: skip
    weighted, rows = both[0], (both[1:] if through_series else both[1])
    per_probe = weighted.mul_(jv).sum(-1)
    return (per_probe[0] if p == 1 else per_probe.mean(0)), rows


def _one_plan(plans: Sequence[SeriesPlan]) -> bool:
    """Whether every probe has the same unmasked plan (what the stacked series needs)."""
    return all(p.mask is None and p.inv_prob == plans[0].inv_prob for p in plans)


def _neumann_rows(weights: Sequence[Tensor], derivs: Sequence[Tensor], plans: Sequence[SeriesPlan],
                  probes: Tensor) -> Tuple[List[Tensor], List[Tensor], Tensor, Tensor]:  # fmt: skip
    """The forward-mode pass per probe (z_i = W_i u_{i−1}, u_i = d_i ⊙ z_i, u_0 = v; Jv = W_L u_{L−1}), the value
    and the Neumann rows [P, B, D]: (zs, us, value, rows)."""
    zs, us = [], [probes]
    for i in range(len(weights) - 1):
        zs.append(torch.matmul(us[-1], weights[i].T))
        us.append(zs[-1] * derivs[i])
    if _one_plan(plans) and 1 <= plans[0].n_terms and plans[0].n_terms * probes.numel() <= _STACKED_SERIES_MAX:
        value, rows = _stacked_series(weights, derivs, plans[0], probes, torch.matmul(us[-1], weights[-1].T))
    else:
        value, row_list = series_value_and_rows(weights, derivs, plans, list(probes.unbind(0)), rows=True)
        assert row_list is not None
        rows = torch.stack(row_list)
    return zs, us[1:], value, rows


def _series_pairs(weights: Sequence[Tensor], derivs: Sequence[Tensor], plan: SeriesPlan,
                  probes: Tensor) -> Tuple[Tensor, Tensor, Tensor, List[Tensor], List[Tensor]]:  # fmt: skip
    """For the gradient of the series itself, dT = Σ_{j<n} L_jᵀ dJ (J^j v) with L_j = Σ_i c_{i+j+1} vᵀJ^i: the
    forward-mode pass from each r_j = J^j v (r_0 = v, r_{j+1} = W_L u_{L−1}), j < n, stacked.
    Returns (value [B], rows L [n·P, B, D], r [n·P, B, D], zs, us [n·P, B, H_i] per hidden layer)."""
    n, (p, b, dim) = plan.n_terms, probes.shape
    r = probes.new_empty((n, p * b, dim))
    r[0].copy_(probes.view(p * b, dim))
    zs = [probes.new_empty((n, p * b, w.shape[0])) for w in weights[:-1]]
    us = [torch.empty_like(z) for z in zs]
    jv = None
    for j in range(n):
        cur = r[j]
        for i in range(len(weights) - 1):
            torch.mm(cur, weights[i].T, out=zs[i][j])
            torch.mul(zs[i][j].view(p, b, -1), derivs[i], out=us[i][j].view(p, b, -1))
            cur = us[i][j]
        if j + 1 < n:
            torch.mm(cur, weights[-1].T, out=r[j + 1])
        elif j == 0:
            jv = torch.mm(cur, weights[-1].T)
    jv = (r[1] if n > 1 else jv).view(p, b, dim)
    value, rows = _stacked_series(weights, derivs, plan, probes, jv, through_series=True)
    return (value, rows.reshape(n * p, b, dim), r.view(n * p, b, dim), [z.view(n * p, b, -1) for z in zs],
            [u.view(n * p, b, -1) for u in us])  # fmt: skip


def _save_groups(ctx, **groups: Sequence[Optional[Tensor]]) -> None:
    """save_for_backward of named groups of tensors (None entries allowed); _saved_groups reads them back."""
    ctx.group_sizes = [(name, len(group)) for name, group in groups.items()]
    ctx.save_for_backward(*(t for group in groups.values() for t in group))


def _saved_groups(ctx) -> dict:
    saved, out, start = ctx.saved_tensors, {}, 0
    for name, size in ctx.group_sizes:
        out[name] = saved[start : start + size]
        start += size
    return out


def _fold_divisor(ratio: Tensor, coeff: float, on_host: bool) -> Tuple[Union[Tensor, float], Union[Tensor, float]]:
    """(δ = max(1, σ̂/c), what the backward's κ = [σ̂/c ≥ 1]/c needs) from ratio = σ̂/c: Python numbers on the host
    (κ itself), else tensors (σ̂/c kept: no sync)."""
    if on_host:
        value = float(ratio)
        return max(value, 1.0), float(value >= 1.0) / coeff
    return ratio.clamp_min(1.0), ratio


def _betas(raw_betas: Sequence[Optional[Tensor]], on_host: bool) -> list:
    """LipSwish's β = softplus(raw β) per activation (None elsewhere); Python numbers on the host, so that they
    enter the elementwise passes as scalar arguments instead of broadcast tensor ops."""
    betas = [F.softplus(r) if r is not None else None for r in raw_betas]
    return [float(b) if b is not None else None for b in betas] if on_host else betas


def _raw_beta_grad(grad_beta: Tensor, beta: Union[Tensor, float], raw_beta: Tensor, on_host: bool) -> Tensor:
    """∂/∂raw β from 1.1 ∂β: ∂β/∂raw = σ(raw) = 1 − e^{−β} (1 where softplus is linear, β > 20), and the 1/1.1 of
    φ's derivatives."""
    if on_host:
        grad_beta.mul_((1.0 if beta > 20 else -math.expm1(-beta)) / 1.1)
    else:
        grad_beta.mul_(torch.sigmoid(raw_beta)).div_(1.1)
    return grad_beta.reshape(raw_beta.shape)


def _graph_grads(ctx, n: int, x: Tensor, raw, biases, raw_betas, outs: List[Tensor], seeds: List[Tensor]) -> tuple:
    """A closed-form Function's backward under create_graph=True: the gradients of its rebuilt graph (outs, seeded)
    with respect to the inputs it needs, laid out as apply(x, probes, spec, plans, through_series, *raw, *biases,
    *us, *vs, *raw_betas) takes them."""
    needs = ctx.needs_input_grad
    candidates = [x, *raw, *biases, *raw_betas]
    flags = [needs[0], *needs[_PARAMS : _PARAMS + 2 * n], *needs[_PARAMS + 4 * n :]]
    wanted = [t for t, f in zip(candidates, flags) if f and t is not None]
    found = iter(torch.autograd.grad(outs, wanted, seeds, create_graph=True, allow_unused=True))
    got = [next(found) if f and t is not None else None for t, f in zip(candidates, flags)]
    return (got[0], None, None, None, None, *got[1 : 1 + 2 * n], *([None] * (2 * n)), *got[1 + 2 * n :])


class _ChainNeumann(torch.autograd.Function):
    """(y = x + g(x), log-det estimate [B]) of a dense chain; the estimate's gradient is the Neumann gradient, or with
    through_series the series' own (module doc).

    Saves x, h_i, a_i, d_i, the forward-mode z_i, u_i, the probes and the Neumann rows: O(B·(d + Σ hidden)) per
    probe, whatever the number of terms (n times that through the series)."""

    @staticmethod
    def forward(ctx, x: Tensor, probes: Tensor, spec: _Spec, plans: Sequence[SeriesPlan], through_series: bool,
                *params):  # fmt: skip
        n = len(spec.linears)
        raw, biases, us, vs, raw_betas = (params[:n], params[n : 2 * n], params[2 * n : 3 * n], params[3 * n : 4 * n],
                                          params[4 * n :])  # fmt: skip
        weights, kappas, divisors = [], [], []
        on_host = _host_scalars(x)
        for w, u, v, coeff in zip(raw, us, vs, spec.coeffs):
            if u is None:
                weights.append(w)
                kappas.append(None)
                divisors.append(None)
                continue
            ratio = torch.vdot(u, torch.addmv(_constant(0.0, w.dtype, w.device), w, v, beta=0, alpha=1 / coeff))
            divisor, kappa = _fold_divisor(ratio, coeff, on_host)
            weights.append(w / divisor)
            kappas.append(kappa)
            divisors.append(divisor)
        betas = _betas(raw_betas, on_host)
        hs, acts, derivs, sigs = [], [], [], []
        a = x
        for i in range(n):
            h = F.linear(a, weights[i], biases[i])
            if i < n - 1:
                a, d, s = spec.activations[i].first(h, betas[i])
                hs.append(h)
                acts.append(a)
                derivs.append(d)
                sigs.append(s)
        if through_series:  # the pairs (L_j, J^j v), j < n, of the series' gradient
            value, rows, probes, zs, u_fwd = _series_pairs(weights, derivs, plans[0], probes)
            ctx.plans = plans
        else:
            zs, u_fwd, value, rows = _neumann_rows(weights, derivs, plans, probes)
        ctx.through_series = through_series
        ctx.n_probes = len(plans)
        ctx.spec = spec
        ctx.has_bias = [b is not None for b in biases]
        ctx.on_host = on_host
        ctx.scalars = (kappas, divisors, betas) if on_host else None
        if on_host:
            kappas = divisors = betas = [None] * n
        _save_groups(ctx, x=[x], rows=[rows], probes=[probes], weights=weights, us=us, vs=vs, kappas=kappas,
                     divisors=divisors, betas=betas, raw_betas=raw_betas, hs=hs, acts=acts, derivs=derivs, sigs=sigs,
                     raw=raw, biases=biases, zs=zs, u_fwd=u_fwd)  # fmt: skip
        return h.add_(x), value  # y = x + g(x)

    @staticmethod
    def backward(ctx, grad_y: Optional[Tensor], grad_value: Optional[Tensor]):
        spec = ctx.spec
        n = len(spec.linears)
        saved = _saved_groups(ctx)
        (x,), (rows,), (probes,) = saved["x"], saved["rows"], saved["probes"]
        weights, us, vs, raw_betas = saved["weights"], saved["us"], saved["vs"], saved["raw_betas"]
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            return _graph_backward(ctx, x, rows, probes, saved["raw"], saved["biases"], us, vs, raw_betas, grad_y,
                                   grad_value)  # fmt: skip
        kappas, divisors, betas = ctx.scalars if ctx.on_host else (saved["kappas"], saved["divisors"], saved["betas"])
        hs, derivs, sigs, zs = saved["hs"], saved["derivs"], saved["sigs"], saved["zs"]
        acts, us_fwd = [x, *saved["acts"]], [probes, *saved["u_fwd"]]
        n_probes, lead, batch = ctx.n_probes, probes.shape[0], probes.shape[1]  # lead: n·P pairs through the series
        flat = lead * batch
        needs = ctx.needs_input_grad

        rho = None
        if grad_value is not None:
            rho = rows * (grad_value if n_probes == 1 else grad_value / n_probes).unsqueeze(-1)
        eta = grad_y  # ∂g = ∂y
        grad_w: List[Optional[Tensor]] = [None] * n
        grad_b: List[Optional[Tensor]] = [None] * n
        grad_raw_beta: List[Optional[Tensor]] = [None] * (n - 1)
        grad_x = None
        for i in range(n - 1, -1, -1):
            gw = eta.T @ acts[i] if eta is not None else None
            if rho is not None:
                r2, u2 = rho.reshape(flat, -1), us_fwd[i].reshape(flat, -1)
                gw = r2.T @ u2 if gw is None else gw.addmm_(r2.T, u2)
            grad_w[i] = gw
            if eta is not None and ctx.has_bias[i]:
                grad_b[i] = eta.sum(0)
            if i == 0:
                if eta is not None and needs[0]:
                    grad_x = torch.addmm(grad_y, eta, weights[0]) if grad_y is not None else eta @ weights[0]
                elif grad_y is not None and needs[0]:
                    grad_x = grad_y
                break
            j = i - 1
            f = eta @ weights[i] if eta is not None else None
            ez = None
            if rho is not None:
                e = torch.matmul(rho, weights[i])
                rho = e * derivs[j]
                ez = e.mul_(zs[j]).sum(0) if lead > 1 else e.mul_(zs[j]).squeeze(0)
            eta, grad_beta = spec.activations[j].backward(f, ez, hs[j], acts[i], derivs[j], sigs[j], betas[j])
            if grad_beta is not None and raw_betas[j] is not None and needs[_PARAMS + 4 * n + j]:
                grad_raw_beta[j] = _raw_beta_grad(grad_beta, betas[j], raw_betas[j], ctx.on_host)
        for i in range(n):  # the folded spectral norms: ∂V = (G − ⟨G, W⟩ κ u vᵀ) / δ
            if us[i] is None or grad_w[i] is None:
                continue
            g = grad_w[i]
            if ctx.on_host:
                coef = float(torch.vdot(g.reshape(-1), weights[i].reshape(-1))) * kappas[i]
                grad_w[i] = torch.addr(g, us[i], vs[i], beta=1 / divisors[i], alpha=-coef / divisors[i])
                continue
            coef = torch.vdot(g.reshape(-1), weights[i].reshape(-1)).mul_(kappas[i] >= 1)  # ⟨G, W⟩ [σ̂/c ≥ 1]
            grad_w[i] = torch.addr(g, us[i] * coef, vs[i], alpha=-1 / spec.coeffs[i]).div_(divisors[i])
        grad_w = [g if needs[_PARAMS + i] else None for i, g in enumerate(grad_w)]
        grad_b = [g if needs[_PARAMS + n + i] else None for i, g in enumerate(grad_b)]
        return (grad_x, None, None, None, None, *grad_w, *grad_b, *([None] * (2 * n)), *grad_raw_beta)


def _graph_backward(ctx, x, rows, probes, raw, biases, us, vs, raw_betas, grad_y, grad_value):
    """The same gradients from torch's graph of y and of the surrogate mean_p rᵀ J v (or of the series itself, with
    through_series) as chain_series_logdet builds them, for backward(create_graph=True): higher-order derivatives
    then exist, as through the graph path."""
    spec = ctx.spec
    chain = spec.chain
    n = len(spec.linears)
    weights = []
    for w, u, v, coeff in zip(raw, us, vs, spec.coeffs):
        weights.append(w if u is None else w / (torch.vdot(u, torch.mv(w, v)) / coeff).clamp_min(1.0))
    a, derivs = x, []
    for i in range(n):
        h = F.linear(a, weights[i], biases[i])
        if i < n - 1:
            # LipSwish's β = softplus(raw β) with its graph, from the saved raw β (not the module's: functional_call)
            a, d = chain.rules[i](h, with_saved_beta(chain.activations[i], raw_betas[i]))
            derivs.append(d)
    outs, seeds = [], []
    if grad_y is not None:
        outs.append(x + h)
        seeds.append(grad_y)
    if grad_value is not None:
        if ctx.through_series:  # probes holds r_j = J^j v, j < n: the probes are r_0
            first = list(probes[: ctx.n_probes].unbind(0))
            outs.append(series_value_and_rows(weights, derivs, ctx.plans, first, rows=False)[0])
        else:
            outs.append((rows * DenseChain.jvp(probes, weights, derivs)).sum(-1).mean(0))
        seeds.append(grad_value)
    return _graph_grads(ctx, n, x, raw, biases, raw_betas, outs, seeds)


def chain_neumann_logdet(
    chain: DenseChain, x: Tensor, plans: Sequence[SeriesPlan], probes: Sequence[Tensor], through_series: bool = False
) -> Tuple[Tensor, Tensor]:
    """(y = x + g(x), log-det estimate [B]) of a DenseChain with the Neumann gradient in closed form (eager
    autograd); through_series=True: with the gradient of the series itself (i-ResNet's), also in closed form where
    the probes share one unmasked plan (off the CPU: _series_closed_form), else by chain_series_logdet's graph."""
    through_series = through_series and torch.is_grad_enabled()  # without a backward, the value is all there is
    if through_series:
        stackable = _one_plan(plans) and 2 * plans[0].n_terms * len(probes) * x.numel() <= _STACKED_SERIES_MAX
        if not stackable or not _series_closed_form(x):
            gx, value = chain_series_logdet(chain, x, plans, probes, neumann_grad=False)
            return x + gx, value
    spec, params, stacked = _chain_inputs(chain, probes)
    return _ChainNeumann.apply(x, stacked, spec, plans, through_series, *params)


def _chain_inputs(chain: DenseChain, probes: Sequence[Tensor], snapshot: bool = True) -> Tuple[_Spec, list, Tensor]:
    """(spec, the parameters as _ChainNeumann.apply takes them: raw weights, biases, u's, v's (snapshot: copies),
    LipSwish raw β's; the probes stacked [P, B, D]), advancing the spectral norms' power iterations as their forward
    would."""
    spec = chain.closed_form
    if spec is None:
        spec = chain.closed_form = _Spec(chain)
    raw, us, vs = zip(*(lin.tensors() for lin in spec.linears))
    # One snapshot of every u, v: the power iteration rewrites them in place, possibly before this step's backward.
    vectors = [t for t in us + vs if t is not None]
    if vectors and snapshot:
        snapshot = iter(torch.cat(vectors).split([t.numel() for t in vectors]))
        us, vs = ([next(snapshot) if t is not None else None for t in group] for group in (us, vs))
    biases = [lin.layer.bias for lin in spec.linears]
    raw_betas = [a.raw_beta if act.kind == "lipswish" else None for a, act in zip(chain.activations, spec.activations)]
    stacked = probes[0].unsqueeze(0) if len(probes) == 1 else torch.stack(list(probes))
    return spec, [*raw, *biases, *us, *vs, *raw_betas], stacked
