"""The closed-form Neumann step of kexue_fast.flows.chain_neumann for convolutional chains: one autograd node.

For g(x) = K_L ∗ φ(⋯ φ(K_1 ∗ x + b_1) ⋯) + b_L (nn.Conv1d/2d/3d with integer zero padding, activations LipSwish,
ELU, Tanh or LeakyReLU), J = A_L D_{L−1} ⋯ D_1 A_1 with A_i the convolution by K_i (a linear map) and
D_i = diag(φ'(h_i)). Everything chain_neumann writes with a matrix W_i holds with A_i in its place:
    forward mode  z_i = A_i u_{i−1} (the convolution without bias),   u_i = d_i ⊙ z_i,   u_0 = v;
    series        l_k = l_{k−1} J: the adjoint Aᵀ (a transposed convolution) and ⊙ d_i, k < n;
    backward      one convolution backward per layer and path gives ρ_i A_i (the input gradient) and the kernel
                  gradient Σ_b ρ_iᵀ ⋆ u_{i−1}; the bias gradient from the output's path.
A kexue_fast spectral norm in operator mode (spectral_norm(conv, coeff=c, input_shape=...)) is folded in as for a
matrix, with W = V/δ, δ = max(1, σ̂/c), σ̂ = ⟨u, A_V v⟩ and ∂σ̂/∂V the kernel gradient of that convolution at
(input v, output gradient u):  ∂V = (G − ⟨G, W⟩ κ ∂σ̂/∂V)/δ,  κ = [σ̂/c ≥ 1]/c.
The Neumann gradient saves O(P·B·(d + Σ hidden)) for P probes, whatever the number of terms n. The gradient through
the series itself (neumann_grad=False; probes sharing one plan) is, as in chain_neumann,
    dT = Σ_{j<n} L_jᵀ dJ r_j,   r_j = J^j v,   L_j = Σ_{i<n−j} c_{i+j+1} vᵀJ^i,
the same backward over the n·P pairs (L_j, r_j) with the forward-mode pass from every r_j (n times that memory).
The gradients equal those of differentiating torch's graph (the autograd path of kexue_fast.flows.logdet;
tests/test_flows.py, 1e-12 in float64). Eager only: torch.compile traces conv_series_logdet, the same estimator
and gradients through torch's graph (no autograd.grad). Under backward(create_graph=True) the gradients come from
torch's graph of y and the surrogate (or the series), rebuilt from the saved inputs, so they can be differentiated
again.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chain import _rules, is_plain, with_saved_beta
from .chain_neumann import (
    _PARAMS,
    _Activation,
    _betas,
    _fold_divisor,
    _graph_grads,
    _host_scalars,
    _Linear,
    _one_plan,  # fmt: skip
    _raw_beta_grad,
    _save_groups,
    _saved_groups,
)
from .logdet import SeriesPlan, _per_sample, value_with_gradient_of

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ConvLayer(_Linear):
    """One convolution as the closed form takes it: its geometry, and its weight plain (any parametrization read
    through `.weight`) or with an operator-mode kexue_fast SpectralNorm folded in (raw kernel and u, v)."""

    def __init__(self, layer: nn.Module) -> None:
        from ..nn.spectral_norm import SpectralNorm

        self.layer = layer
        self.nd = len(layer.kernel_size)
        self.stride, self.padding = list(layer.stride), list(layer.padding)
        self.dilation, self.groups = list(layer.dilation), layer.groups
        self.norm: Optional[SpectralNorm] = None
        plist = getattr(getattr(layer, "parametrizations", None), "weight", None)
        if plist is not None and len(plist) == 1 and isinstance(plist[0], SpectralNorm):
            norm = plist[0]
            if norm.conv is not None and norm.coeff is not None and norm.conv._symmetric():
                self.norm = norm

    def apply(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return _CONV[self.nd](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def check_input(self, x: Tensor) -> None:
        """The layer's forward pre-hooks that check input sizes (an operator-mode spectral norm's: the closed forms
        skip the module's forward, and hook_free admits only these)."""
        for hook in self.layer._forward_pre_hooks.values():
            if getattr(hook, "input_size_check", False):
                hook(self.layer, (x,))

    def adjoint(self, y: Tensor, weight: Tensor, input_shape: Sequence[int]) -> Tensor:
        """Aᵀ y: the transposed convolution, its output padded to the input's spatial size."""
        geometry = zip(input_shape[2:], y.shape[2:], self.stride, self.padding, self.dilation, weight.shape[2:])
        extra = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in geometry]
        return _TRANSPOSED[self.nd](y, weight, None, self.stride, self.padding, extra, self.groups, self.dilation)

    def backward(self, grad: Tensor, inp: Tensor, weight: Tensor, need_input: bool, need_bias: bool = False
                 ) -> Tuple[Optional[Tensor], Tensor, Optional[Tensor]]:  # fmt: skip
        """(grad · A, the kernel gradient Σ_b, the bias gradient) of the convolution at `inp`."""
        return torch.ops.aten.convolution_backward(
            grad, inp, weight, [weight.shape[0]] if need_bias else None, self.stride, self.padding, self.dilation,
            False, [0] * self.nd, self.groups, [need_input, True, need_bias],
        )  # fmt: skip


class ConvChain:
    """The convolutions and activations of g = Sequential(conv, act, conv, …, conv), with what the closed form needs."""

    def __init__(self, convs: List[nn.Module], activations: List[nn.Module]) -> None:
        self.layers = [_ConvLayer(c) for c in convs]
        self.activations = [_Activation(a) for a in activations]
        self.raw_beta_modules = activations

    @classmethod
    def detect(cls, g: nn.Module) -> Optional[ConvChain]:
        """A chain conv (act conv)* of zero-padded, integer-padded convolutions and supported activations, else
        None (string padding, other padding modes and other layers take the autograd path)."""
        if type(g) is not nn.Sequential or len(g) % 2 == 0:  # a subclass may change what forward computes
            return None
        layers = list(g)
        convs, acts = layers[0::2], layers[1::2]
        table = _rules()
        for conv in convs:
            if not is_plain(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or conv.padding_mode != "zeros":
                return None
            if isinstance(conv.padding, str):
                return None
        if not all(type(a) in table for a in acts):
            return None
        return cls(convs, acts)


def _vjp(chain: ConvChain, weights: Sequence[Tensor], derivs: Sequence[Tensor], shapes: Sequence, term: Tensor,
         lead: int) -> Tensor:  # fmt: skip
    """term J for term [lead·B, ...]: the adjoint convolutions, each but the first followed by ⊙ φ'(h) (broadcast
    over the lead axis)."""
    for i in range(len(weights) - 1, -1, -1):
        term = chain.layers[i].adjoint(term, weights[i], shapes[i])  # a new tensor: scaled in place
        if i:
            term.view(lead, -1, *term.shape[1:]).mul_(derivs[i - 1])
    return term


def _forward_mode(chain: ConvChain, weights: Sequence[Tensor], derivs: Sequence[Tensor], v: Tensor, lead: int,
                  last: bool = True) -> Tuple[List[Tensor], List[Tensor], Optional[Tensor]]:  # fmt: skip
    """z_i = A_i u_{i−1}, u_i = φ'(h_i) ⊙ z_i from u_0 = v [lead·B, ...]; returns (zs, us, J v or None)."""
    zs, us = [], []
    cur = v
    for i in range(len(weights) - 1):
        z = chain.layers[i].apply(cur, weights[i])
        zs.append(z)
        cur = (z.view(lead, -1, *z.shape[1:]) * derivs[i]).reshape(z.shape)
        us.append(cur)
    return zs, us, (chain.layers[-1].apply(cur, weights[-1]) if last else None)


def _dot(a: Tensor, b: Tensor, lead: int) -> Tensor:
    """Σ over each sample's entries of a ⊙ b, summed over the lead axis: [B] (a is overwritten)."""
    return a.mul_(b).reshape(lead, -1, a[0].numel()).sum(-1).sum(0)  # reshape: any memory format


def _value_and_rows(chain: ConvChain, weights: Sequence[Tensor], derivs: Sequence[Tensor], shapes: Sequence,
                    plans: Sequence[SeriesPlan], flat: Tensor, jv: Tensor, n_probes: int
                    ) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """The estimate mean_p Σ_k c_k l_{k−1}·(J v_p) [B] and the Neumann rows Σ_k c'_k l_{k−1} [P·B, ...], with
    l_k = l_{k−1} J (l_0 = v): probes sharing one plan run as one batch."""
    batch = flat.shape[0] // n_probes
    spans = [(plans[0], 0, n_probes)] if _one_plan(plans) else [(p, i, i + 1) for i, p in enumerate(plans)]
    rows = torch.empty_like(flat)
    value = None
    for plan, first, last in spans:
        count = last - first
        lo, hi = first * batch, last * batch
        term = flat[lo:hi]
        weighted = row = None
        for k in range(1, plan.n_terms + 1):
            c, cn = plan.value_coeff(k), plan.neumann_coeff(k)
            weighted = term * c if weighted is None else weighted.add_(term, alpha=c)
            row = term * cn if row is None else row.add_(term, alpha=cn)
            if k < plan.n_terms:
                term = _vjp(chain, weights, derivs, shapes, term, count)
        rows[lo:hi] = row
        per = _dot(weighted, jv[lo:hi], count)
        value = per if value is None else value + per
    assert value is not None
    return (value if n_probes == 1 else value / n_probes), rows


def _series_pairs(chain: ConvChain, weights: Sequence[Tensor], derivs: Sequence[Tensor], shapes: Sequence,
                  plan: SeriesPlan, flat: Tensor, n_probes: int
                  ) -> Tuple[Tensor, List[Tensor], List[Tensor], Tensor, Tensor]:  # fmt: skip
    """For the gradient of the series itself, dT = Σ_{j<n} L_jᵀ dJ r_j with r_j = J^j v and L_j = Σ_i c_{i+j+1} vᵀJ^i
    (chain_neumann's formula): the forward-mode pass from every r_j, j < n. Returns (r, zs, us, value [B], L), the
    pairs stacked j-major on the batch axis ([n·P·B, ...])."""
    n = plan.n_terms
    rs: List[Tensor] = [flat]
    zs: List[List[Tensor]] = [[] for _ in weights[1:]]
    us: List[List[Tensor]] = [[] for _ in weights[1:]]
    jv = None
    for j in range(n):
        z_j, u_j, out = _forward_mode(chain, weights, derivs, rs[j], n_probes, last=j + 1 < n or j == 0)
        for i in range(len(z_j)):
            zs[i].append(z_j[i])
            us[i].append(u_j[i])
        if j + 1 < n:
            rs.append(out)
        if j == 0:
            jv = out
    assert jv is not None
    lefts = [flat]  # l_i = vᵀJ^i, i < n
    for _ in range(1, n):
        lefts.append(_vjp(chain, weights, derivs, shapes, lefts[-1], n_probes))
    weighted = None
    for k in range(1, n + 1):
        c = plan.value_coeff(k)
        weighted = lefts[0] * c if weighted is None else weighted.add_(lefts[k - 1], alpha=c)
    value = _dot(weighted, jv, n_probes)
    rows = []
    for j in range(n):
        row = lefts[0] * plan.value_coeff(j + 1)
        for i in range(1, n - j):
            row.add_(lefts[i], alpha=plan.value_coeff(i + j + 1))
        rows.append(row)
    return (torch.cat(rs), [torch.cat(t) for t in zs], [torch.cat(t) for t in us],
            value if n_probes == 1 else value / n_probes, torch.cat(rows))  # fmt: skip


class _ConvNeumann(torch.autograd.Function):
    """(y = x + g(x), log-det estimate [B]) of a convolutional chain; the estimate's gradient is the Neumann
    gradient, or with through_series the series' own (module doc). Saves x, h_i, a_i, φ'(h_i), the forward-mode z_i,
    u_i, the probes and the Neumann rows (the n·P pairs' r_j, z, u and L_j through the series)."""

    @staticmethod
    def forward(ctx, x: Tensor, probes: Tensor, chain: ConvChain, plans: Sequence[SeriesPlan], through_series: bool,
                *params):  # fmt: skip
        n = len(chain.layers)
        raw, biases, us, vs, raw_betas = (params[:n], params[n : 2 * n], params[2 * n : 3 * n], params[3 * n : 4 * n],
                                          params[4 * n :])  # fmt: skip
        on_host = _host_scalars(x)
        weights, kappas, divisors = [], [], []
        for layer, w, u, v in zip(chain.layers, raw, us, vs):
            if u is None:
                weights.append(w)
                kappas.append(None)
                divisors.append(None)
                continue
            assert layer.norm is not None and layer.norm.coeff is not None
            coeff = layer.norm.coeff
            ratio = torch.vdot(u.reshape(-1), layer.norm.conv.apply(w, v.unsqueeze(0)).reshape(-1)) / coeff
            divisor, kappa = _fold_divisor(ratio, coeff, on_host)
            weights.append(w / divisor)
            kappas.append(kappa)
            divisors.append(divisor)
        betas = _betas(raw_betas, on_host)
        hs, acts, derivs, sigs = [], [], [], []
        a = x
        for i, layer in enumerate(chain.layers):
            layer.check_input(a)
            h = layer.apply(a, weights[i], biases[i])
            if i < n - 1:
                a, d, s = chain.activations[i].first(h, betas[i])
                hs.append(h)
                acts.append(a)
                derivs.append(d)
                sigs.append(s)
        n_probes = probes.shape[0]
        flat = probes.reshape(-1, *x.shape[1:])
        shapes = [x.shape, *(t.shape for t in acts)]
        if through_series:  # the pairs (L_j, J^j v), j < n, of the series' gradient
            flat, zs, u_fwd, value, rows = _series_pairs(chain, weights, derivs, shapes, plans[0], flat, n_probes)
        else:
            zs, u_fwd, jv = _forward_mode(chain, weights, derivs, flat, n_probes)
            assert jv is not None
            value, rows = _value_and_rows(chain, weights, derivs, shapes, plans, flat, jv, n_probes)
        ctx.chain, ctx.n_probes, ctx.on_host = chain, n_probes, on_host
        ctx.lead = rows.shape[0] // x.shape[0]  # P, or n·P pairs through the series
        ctx.has_bias = [b is not None for b in biases]
        ctx.scalars = (kappas, divisors, betas) if on_host else None
        if on_host:
            kappas = divisors = betas = [None] * n
        ctx.plans, ctx.through_series = plans, through_series
        _save_groups(ctx, x=[x], rows=[rows], probes=[flat], weights=weights, us=us, vs=vs, kappas=kappas,
                     divisors=divisors, betas=betas, raw_betas=raw_betas, hs=hs, acts=acts, derivs=derivs, sigs=sigs,
                     zs=zs, u_fwd=u_fwd, raw=raw, biases=biases)  # fmt: skip
        return h.add_(x), value

    @staticmethod
    def backward(ctx, grad_y: Optional[Tensor], grad_value: Optional[Tensor]):
        chain = ctx.chain
        n = len(chain.layers)
        saved = _saved_groups(ctx)
        (x,), (rows,), (flat,) = saved["x"], saved["rows"], saved["probes"]
        weights, us, vs, raw_betas = saved["weights"], saved["us"], saved["vs"], saved["raw_betas"]
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            return _graph_backward(ctx, x, flat, rows, saved["raw"], saved["biases"], us, vs, raw_betas, grad_y,
                                   grad_value)  # fmt: skip
        kappas, divisors, betas = ctx.scalars if ctx.on_host else (saved["kappas"], saved["divisors"], saved["betas"])
        hs, derivs, sigs, zs = saved["hs"], saved["derivs"], saved["sigs"], saved["zs"]
        acts, inputs = [x, *saved["acts"]], [flat, *saved["u_fwd"]]
        p, lead = ctx.n_probes, ctx.lead
        needs = ctx.needs_input_grad

        def by_probe(t: Tensor) -> Tensor:
            return t.view(lead, -1, *t.shape[1:])

        rho = None
        if grad_value is not None:
            scale = grad_value if p == 1 else grad_value / p
            rho = (by_probe(rows) * scale.view(1, -1, *[1] * (x.ndim - 1))).reshape(rows.shape)
        eta = grad_y
        grad_w: List[Optional[Tensor]] = [None] * n
        grad_b: List[Optional[Tensor]] = [None] * n
        grad_raw_beta: List[Optional[Tensor]] = [None] * (n - 1)
        grad_x = None
        for i in range(n - 1, -1, -1):
            layer, f, e = chain.layers[i], None, None
            if eta is not None:
                f, grad_w[i], grad_b[i] = layer.backward(eta, acts[i], weights[i], i > 0 or needs[0], ctx.has_bias[i])
            if rho is not None:
                e, gw, _ = layer.backward(rho, inputs[i], weights[i], i > 0)
                grad_w[i] = gw if grad_w[i] is None else grad_w[i].add_(gw)
            if i == 0:
                if needs[0]:
                    grad_x = f if grad_y is None else (grad_y if f is None else f.add_(grad_y))
                break
            j = i - 1
            ez = None
            if e is not None:
                rho = (by_probe(e) * derivs[j]).reshape(e.shape)
                ez = by_probe(e.mul_(zs[j])).sum(0)
            eta, grad_beta = chain.activations[j].backward(f, ez, hs[j], acts[i], derivs[j], sigs[j], betas[j])
            if grad_beta is not None and raw_betas[j] is not None and needs[_PARAMS + 4 * n + j]:
                grad_raw_beta[j] = _raw_beta_grad(grad_beta, betas[j], raw_betas[j], ctx.on_host)
        for i, layer in enumerate(chain.layers):  # the folded spectral norms: ∂V = (G − ⟨G, W⟩ κ ∂σ̂/∂V) / δ
            if us[i] is None or grad_w[i] is None:
                continue
            g = grad_w[i]
            dsigma = layer.backward(us[i].unsqueeze(0), vs[i].unsqueeze(0), weights[i], False)[1]
            inner = torch.vdot(g.reshape(-1), weights[i].reshape(-1))
            if ctx.on_host:
                grad_w[i] = g.sub_(dsigma, alpha=float(inner) * kappas[i]).div_(divisors[i])
                continue
            coef = inner.mul_(kappas[i] >= 1).div_(layer.norm.coeff)  # ⟨G, W⟩ [σ̂/c ≥ 1] / c
            grad_w[i] = g.sub_(dsigma.mul_(coef)).div_(divisors[i])
        grad_w = [g if needs[_PARAMS + i] else None for i, g in enumerate(grad_w)]
        grad_b = [g if needs[_PARAMS + n + i] else None for i, g in enumerate(grad_b)]
        return (grad_x, None, None, None, None, *grad_w, *grad_b, *([None] * (2 * n)), *grad_raw_beta)


def _vjp_graph(chain: ConvChain, weights: Sequence[Tensor], derivs: Sequence[Tensor], term: Tensor, shape0) -> Tensor:
    """term J for one probe [B, ...], out of place (a graph that is differentiated, or traced)."""
    shapes = (shape0, *(d.shape for d in derivs))
    for i in range(len(weights) - 1, -1, -1):
        term = chain.layers[i].adjoint(term, weights[i], shapes[i])
        if i:
            term = term * derivs[i - 1]
    return term


def _graph_series(chain: ConvChain, weights: Sequence[Tensor], derivs: Sequence[Tensor], plans: Sequence[SeriesPlan],
                  probes: Sequence[Tensor], shape0, rows: bool) -> Tuple[Tensor, List[Tensor]]:  # fmt: skip
    """mean_p Σ_k c_k v_pᵀJ^k v_p [B] and, if `rows`, the Neumann rows Σ_k c'_k v_pᵀJ^{k−1}, with torch's graph of
    whatever carries one (plans' masks honoured: the roulette under torch.compile)."""
    value, found = 0, []
    for plan, v in zip(plans, probes):
        term, weighted, row = v, 0, 0
        for k in range(1, plan.n_terms + 1):
            if rows:
                row = row + plan.term(k, term) * plan.neumann_coeff(k)
            term = _vjp_graph(chain, weights, derivs, term, shape0)
            weighted = weighted + plan.term(k, term) * plan.value_coeff(k)
        value = value + _per_sample(weighted, v)
        found.append(row)
    return value / len(probes), found


def _graph_forward(chain: ConvChain, x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                   raw_betas: Optional[Sequence[Optional[Tensor]]] = None) -> Tuple[Tensor, List[Tensor]]:  # fmt: skip
    """(g(x), φ'(h_i)) with torch's graph; LipSwish reads β = softplus(raw β) through its module, or from
    `raw_betas` where given (a backward's saved ones: under torch.func.functional_call the module holds others)."""
    rules = _rules()
    a, derivs = x, []
    for i, layer in enumerate(chain.layers):
        layer.check_input(a)
        a = layer.apply(a, weights[i], biases[i])
        if i < len(chain.layers) - 1:
            module = chain.raw_beta_modules[i]
            rule = rules[type(module)]
            a, d = rule(a, module if raw_betas is None else with_saved_beta(module, raw_betas[i]))
            derivs.append(d)
    return a, derivs


def _surrogate(chain: ConvChain, weights: Sequence[Tensor], derivs: Sequence[Tensor], rows: Sequence[Tensor],
               probes: Sequence[Tensor]) -> Tensor:  # fmt: skip
    """mean_p r_pᵀ J v_p [B], J v by the forward-mode pass with torch's graph."""
    total = 0
    for r, v in zip(rows, probes):
        jv = _forward_mode(chain, weights, derivs, v, 1)[2]
        assert jv is not None
        total = total + _per_sample(r, jv)
    return total / len(probes)


def conv_series_logdet(chain: ConvChain, x: Tensor, plans: Sequence[SeriesPlan], probes: Sequence[Tensor], *,
                       neumann_grad: bool) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """(g(x), log-det estimate [B]) of a convolutional chain with torch's graph and no autograd.grad, so that
    torch.compile traces it (fullgraph): the series by transposed convolutions, the Neumann gradient as the gradient
    of the surrogate mean_p rᵀ J v with the rows held constant, or the series itself differentiated. The same
    estimator and gradients as the closed form (and as kexue_fast.flows.logdet.series_logdet)."""
    weights = [layer.layer.weight for layer in chain.layers]  # through the parametrizations
    gx, derivs = _graph_forward(chain, x, weights, [layer.layer.bias for layer in chain.layers])
    need_grad = torch.is_grad_enabled() and gx.requires_grad
    through_series = need_grad and not neumann_grad
    if through_series:
        return gx, _graph_series(chain, weights, derivs, plans, probes, x.shape, rows=False)[0]
    value, rows = _graph_series(chain, [w.detach() for w in weights], [d.detach() for d in derivs], plans, probes,
                                x.shape, rows=need_grad)  # fmt: skip
    if not need_grad:
        return gx.detach(), value.detach()
    surrogate = _surrogate(chain, weights, derivs, [r.detach() for r in rows], probes)
    return gx, value_with_gradient_of(value.detach(), surrogate)


def _graph_backward(ctx, x, flat, rows, raw, biases, us, vs, raw_betas, grad_y, grad_value):
    """The same gradients from torch's graph of y and of the surrogate mean_p rᵀ J v (or of the series itself, with
    through_series), rebuilt from the saved raw weights, u, v and probes, for backward(create_graph=True): then
    higher-order derivatives exist."""
    chain = ctx.chain
    n = len(chain.layers)
    p, batch = ctx.n_probes, x.shape[0]
    weights = []
    for layer, w, u, v in zip(chain.layers, raw, us, vs):
        if u is None:
            weights.append(w)
            continue
        sigma = torch.vdot(u.reshape(-1), layer.norm.conv.apply(w, v.unsqueeze(0)).reshape(-1))
        weights.append(w / (sigma / layer.norm.coeff).clamp_min(1.0))
    gx, derivs = _graph_forward(chain, x, weights, biases, raw_betas)
    outs, seeds = [], []
    if grad_y is not None:
        outs.append(x + gx)
        seeds.append(grad_y)
    if grad_value is not None:
        probes = list(flat[: p * batch].reshape(p, *x.shape).unbind(0))
        if ctx.through_series:
            outs.append(_graph_series(chain, weights, derivs, ctx.plans, probes, x.shape, rows=False)[0])
        else:
            outs.append(_surrogate(chain, weights, derivs, list(rows.reshape(p, *x.shape).unbind(0)), probes))
        seeds.append(grad_value)
    return _graph_grads(ctx, n, x, raw, biases, raw_betas, outs, seeds)


def conv_neumann_logdet(chain: ConvChain, x: Tensor, plans: Sequence[SeriesPlan], probes: Sequence[Tensor],
                        through_series: bool = False) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """(y = x + g(x), log-det estimate [B]) of a convolutional chain, with the Neumann gradient in closed form, or
    with through_series=True the series' own gradient (the probes must share one unmasked plan: _one_plan)."""
    if through_series and not _one_plan(plans):
        raise ValueError("the closed-form series gradient needs every probe to share one unmasked plan")
    raw, us, vs = zip(*(layer.tensors() for layer in chain.layers))
    # One snapshot of every u, v: the power iteration rewrites them in place, possibly before this step's backward.
    vectors = [t for t in us + vs if t is not None]
    if vectors:
        parts = iter(torch.cat([t.reshape(-1) for t in vectors]).split([t.numel() for t in vectors]))
        us, vs = ([next(parts).view(t.shape) if t is not None else None for t in group] for group in (us, vs))
    biases = [layer.layer.bias for layer in chain.layers]
    raw_betas = [m.raw_beta if act.kind == "lipswish" else None
                 for m, act in zip(chain.raw_beta_modules, chain.activations)]  # fmt: skip
    stacked = probes[0].unsqueeze(0) if len(probes) == 1 else torch.stack(list(probes))
    return _ConvNeumann.apply(x, stacked, chain, plans, through_series, *raw, *biases, *us, *vs, *raw_betas)
