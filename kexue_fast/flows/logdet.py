"""Log-determinant estimators for y = x + g(x): truncated series, Russian roulette, exact; Neumann gradients.

The value returned is always a real estimate of log|det(I + J_g)| per sample (unbiased for "roulette"); when the
gradient comes from the Neumann series it is attached to that value (value + surrogate − surrogate.detach()), never
returned in its place. Formulas: kexue_fast.flows.reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._autograd import first_order, transformed
from .._state import State, capture, replaying
from ..nn.spectral_norm import power_iteration_frozen, power_iteration_is_frozen

_DOUBLE_BACKWARD = {
    "op": "InvertibleResBlock's memory-efficient Neumann gradient",
    "instead": "memory_efficient=False supports it",
}  # first_order's message

EXACT_MAX_DIM = 256  # "exact" builds the d×d Jacobian with d vector–Jacobian products: beyond this, use a series.


@dataclass(frozen=True)
class SeriesPlan:
    """Terms k = 1..len(inv_prob): value term (−1)^{k+1} vᵀJ^k v / (k P_k); Neumann term (−1)^{k+1} vᵀJ^{k−1} / P_k.

    `mask` (a device tensor [n_terms] of 0/1) switches terms off without a host sync: the roulette under
    torch.compile computes a fixed maximum of terms and masks those beyond the sampled length."""

    inv_prob: Tuple[float, ...]  # 1 / P_k
    mask: Optional[Tensor] = None

    @property
    def n_terms(self) -> int:
        return len(self.inv_prob)

    def value_coeff(self, k: int) -> float:
        return (-1) ** (k + 1) * self.inv_prob[k - 1] / k

    def neumann_coeff(self, k: int) -> float:
        return (-1) ** (k + 1) * self.inv_prob[k - 1]

    def term(self, k: int, w: Tensor) -> Tensor:
        """w, or w masked off when term k is beyond the sampled length."""
        return w if self.mask is None else w * self.mask[k - 1]


def truncated_plan(n_terms: int) -> SeriesPlan:
    return SeriesPlan((1.0,) * n_terms)


def tail_survival(kind: str, p: float, j: int) -> float:
    """P(N ≥ j) for the roulette length N: Geom(p) on {1, 2, ...} or Poisson(λ = 1/p) on {0, 1, ...}."""
    if j <= 0:
        return 1.0
    if kind == "geometric":
        return (1.0 - p) ** (j - 1)
    # P(N ≥ j) = P(j, λ), the regularized lower incomplete gamma (λ**i / i! overflowed floats for small p)
    lam = torch.tensor(1.0 / p, dtype=torch.float64)
    return max(float(torch.special.gammainc(torch.tensor(float(j), dtype=torch.float64), lam)), 1e-300)


def sample_roulette_length(kind: str, p: float, generator: Optional[torch.Generator] = None) -> int:
    """N on the host (a CPU generator: no device sync)."""
    if kind == "geometric":
        return int(torch.empty(1).geometric_(p, generator=generator).item())
    return int(torch.poisson(torch.tensor([1.0 / p]), generator=generator).item())


def roulette_plan(n_exact: int, kind: str, p: float, generator: Optional[torch.Generator] = None) -> SeriesPlan:
    n = sample_roulette_length(kind, p, generator)
    return SeriesPlan(tuple(1.0 / tail_survival(kind, p, k - n_exact) for k in range(1, n_exact + n + 1)))


def roulette_plan_on_device(n_exact: int, kind: str, p: float, max_terms: int, like: Tensor) -> SeriesPlan:
    """The same estimator with N sampled on the device and capped at `max_terms` (no host sync; compile- and
    CUDA-graph-friendly). Capping N at M leaves the truncated series of n_exact + M terms: a bias of the order of
    the tail Σ_{k>n_exact+M} Lip^k / k."""
    if kind == "geometric":
        n = torch.empty(1, dtype=like.dtype, device=like.device).geometric_(p)
    else:
        n = torch.poisson(torch.full((1,), 1.0 / p, dtype=like.dtype, device=like.device))
    k = torch.arange(1, n_exact + max_terms + 1, dtype=like.dtype, device=like.device)
    mask = (k <= n_exact + n).to(like.dtype)
    # capped at the dtype's largest value: weights past the sampled length are masked anyway, and 1/P(N ≥ k) overflows
    # float32 for p ≥ ~0.94 at k = 32 (a length that likely has probability < 1e-38)
    top = torch.finfo(like.dtype).max
    inv_prob = tuple(min(1.0 / tail_survival(kind, p, j - n_exact), top) for j in range(1, n_exact + max_terms + 1))
    return SeriesPlan(inv_prob, mask)


def draw_probe(like: Tensor, kind: str, generator: Optional[torch.Generator] = None) -> Tensor:
    """A Hutchinson probe in `like`'s shape (and memory format), its values drawn in the shape's (logical) order: the
    same probe for a channels_last or transposed x as for its contiguous copy (the *_like forms fill memory order)."""
    if generator is None and like.is_contiguous():  # the *_like forms also trace with symbolic (dynamic) shapes
        if kind == "gaussian":
            return torch.randn_like(like)
        return torch.randint_like(like, 0, 2) * 2 - 1
    if kind == "gaussian":
        probe = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    else:
        probe = torch.randint(0, 2, like.shape, dtype=like.dtype, device=like.device, generator=generator) * 2 - 1
    return probe if like.is_contiguous() else torch.empty_like(like).copy_(probe)


def draw_probes(like: Tensor, kind: str, n: int) -> Tensor:
    """n probes like `like` from one random draw ([n, *like.shape]; see InvertibleResBlock._probes)."""
    out = like.new_empty((n, *like.shape))
    if kind == "gaussian":
        return out.normal_()
    return out.bernoulli_(0.5).mul_(2).sub_(1)


def _per_sample(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(1)


class _NeumannLogdet(torch.autograd.Function):
    """Memory-efficient Neumann gradient. Saves x, the Neumann rows w_p = Σ_k c_k v_pᵀJ^{k−1} and the probes v_p
    (O(P·B·d), whatever the number of terms); backward recomputes g once and differentiates
    Σ_b ḡ_b · mean_p (w_pᵀ J v_p)_b, so each sample is weighted by its *own* upstream gradient ḡ_b.

    The recomputation replays the forward exactly: from g's buffers and the random generators as they were before
    it (kexue_fast._state: the same Dropout masks, the same power-iteration step of torch's or kexue_fast's spectral
    norms, whatever ran between forward and backward), on copies that are discarded afterwards, so g's state is
    left as the forward left it."""

    @staticmethod
    def forward(ctx, value: Tensor, x: Tensor, w: Tensor, v: Tensor, g: Callable, state: State, frozen: bool,
                *params: Tensor) -> Tensor:  # fmt: skip
        ctx.g, ctx.state, ctx.frozen = g, state, frozen
        ctx.save_for_backward(x, w, v, *params)
        return value.clone()

    @staticmethod
    @first_order(**_DOUBLE_BACKWARD)
    def backward(ctx, grad_out: Tensor):
        x, w, v, *params = ctx.saved_tensors
        trainable = [p for p in params if p.requires_grad]
        g = _with_parameters(ctx.g, params)
        with torch.enable_grad(), replaying(ctx.state), power_iteration_frozen(ctx.frozen):
            xr = x.detach().requires_grad_()
            gr = g(xr)
            surrogate = 0
            for wp, vp in zip(w, v):
                (u,) = torch.autograd.grad(gr, xr, wp, retain_graph=True, create_graph=True)
                surrogate = surrogate + _per_sample(u, vp)
            surrogate = surrogate / w.shape[0]
            grads = torch.autograd.grad(surrogate, [xr, *trainable], grad_out, allow_unused=True)
        it = iter(grads[1:])
        grad_params = [next(it) if p.requires_grad else None for p in params]
        return (None, grads[0] if ctx.needs_input_grad[1] else None, None, None, None, None, None, *grad_params)


def _with_parameters(g: Callable, params: Sequence[Tensor]) -> Callable:
    """g, or where the forward ran g on other parameters than the module now holds (torch.func.functional_call swaps
    them in for the call alone), g called on those: a backward that recomputes g must differentiate what the forward
    ran."""
    own = _parameters(g)
    if len(own) == len(params) and all(a is b for a, b in zip(own, params)):
        return g
    names = [name for name, _ in g.named_parameters()]  # type: ignore[union-attr]
    swapped = dict(zip(names, params))
    return lambda inp: torch.func.functional_call(g, swapped, (inp,))


class _ValueWithGradientOf(torch.autograd.Function):
    """Returns `value` bit for bit and routes its gradient to `surrogate` (value + s − s.detach() would round).
    Written with setup_context (and a generated vmap rule) so that torch.func transforms can run it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, surrogate: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, grad


class _ValueWithGradientOfJvp(_ValueWithGradientOf):
    """The same with forward mode (torch.func.jacfwd, hessian): the value's tangent is the surrogate's, as its
    gradient is. Apart because dynamo cannot trace a Function with a custom jvp (under torch.compile the other)."""

    @staticmethod
    def jvp(ctx, value_tangent: Optional[Tensor], surrogate_tangent: Optional[Tensor]) -> Optional[Tensor]:
        return surrogate_tangent


def value_with_gradient_of(value: Tensor, surrogate: Tensor) -> Tensor:
    """`value` bit for bit, its gradient (and tangent, outside torch.compile) routed to `surrogate`."""
    if torch.compiler.is_compiling():
        return _ValueWithGradientOf.apply(value, surrogate)
    return _ValueWithGradientOfJvp.apply(value, surrogate)


def _parameters(g: Callable) -> List[Tensor]:
    return list(g.parameters()) if isinstance(g, nn.Module) else []


def _needs_grad(g: Callable, x: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in _parameters(g)))


def _forward_graph(g: Callable, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(x as the graph's input, g(x)) with a graph even under no_grad, for the vector–Jacobian products."""
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_()
        return xg, g(xg)


def series_logdet(
    g: Callable,
    x: Tensor,
    plans: Sequence[SeriesPlan],
    probes: Sequence[Tensor],
    *,
    neumann_grad: bool,
    memory_efficient: bool,
) -> Tuple[Tensor, Tensor]:
    """(g(x), log-det estimate [B]) averaged over (plan, probe) pairs, with the gradient chosen by the flags.

    Without gradients, or with neumann_grad, the vector–Jacobian products run without a graph; with
    neumann_grad=False the series itself is differentiated (memory grows with the number of terms)."""
    if transformed(x, *_parameters(g)):
        raise NotImplementedError(
            "InvertibleResBlock's series log-det of this g (not a plain dense or convolutional chain, or with hooks) "
            "takes its vector-Jacobian products by torch.autograd.grad, which cannot run under torch.func transforms "
            "(grad, vmap, jacrev...): use logdet='exact' there, or a plain chain g (Linear/Conv layers and "
            "LipSwish/ELU/Tanh/LeakyReLU, no hooks)"
        )
    need_grad = _needs_grad(g, x)
    replay = need_grad and neumann_grad and memory_efficient  # backward recomputes g: from this moment's state
    state = capture(g, x.device) if replay else None
    frozen = power_iteration_is_frozen()
    xg, gx = _forward_graph(g, x)
    graph_series = need_grad and not neumann_grad
    values, rows = [], []
    for plan, v in zip(plans, probes):
        w = v
        value = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        row = torch.zeros_like(v)
        for k in range(1, plan.n_terms + 1):
            row = row + plan.neumann_coeff(k) * plan.term(k, w)
            (w,) = torch.autograd.grad(gx, xg, w, retain_graph=True, create_graph=graph_series)
            value = value + plan.value_coeff(k) * _per_sample(plan.term(k, w), v)
        values.append(value)
        rows.append(row)
    value = torch.stack(values).mean(0)
    if not need_grad:
        return gx.detach(), value.detach()
    if graph_series:
        return gx, value
    value = value.detach()
    if memory_efficient:
        params = _parameters(g)
        rows_t, probes_t = torch.stack(rows).detach(), torch.stack(list(probes))
        return gx, _NeumannLogdet.apply(value, x, rows_t, probes_t, g, state, frozen, *params)
    surrogate = 0
    for row, v in zip(rows, probes):
        (u,) = torch.autograd.grad(gx, xg, row.detach(), retain_graph=True, create_graph=True)
        surrogate = surrogate + _per_sample(u, v)
    return gx, value_with_gradient_of(value, surrogate / len(probes))


def exact_logdet(g: Callable, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(g(x), log|det(I + J_g(x))| [B]) by slogdet of the full Jacobian; differentiable. d ≤ EXACT_MAX_DIM."""
    d = x[0].numel()
    if d > EXACT_MAX_DIM:
        raise ValueError(
            f'logdet="exact" builds the {d}×{d} Jacobian per sample; it is limited to d <= {EXACT_MAX_DIM}. '
            'Use logdet="series" or "roulette" for larger inputs'
        )
    if torch._C._functorch.maybe_current_level() is not None:
        return _exact_logdet_func(g, x)
    need_grad = _needs_grad(g, x)
    xg, gx = _forward_graph(g, x)
    with torch.enable_grad():  # the Jacobian needs g's graph even when the caller runs under no_grad
        out = gx.reshape(x.shape[0], -1)
        rows = []
        for i in range(d):
            onehot = torch.zeros_like(out)
            onehot[:, i] = 1
            (row,) = torch.autograd.grad(out, xg, onehot, retain_graph=True, create_graph=need_grad)
            rows.append(row.reshape(x.shape[0], -1))
    jac = torch.stack(rows, dim=1)
    logdet = _logabsdet_of_identity_plus(jac)
    if not need_grad:
        return gx.detach(), logdet
    return gx, logdet


def _logabsdet_of_identity_plus(jac: Tensor) -> Tensor:
    """log|det(I + J)| [B] for J [B, d, d], in float32 at least (no half-precision slogdet)."""
    work = torch.float32 if jac.dtype in (torch.float16, torch.bfloat16) else jac.dtype
    eye = torch.eye(jac.shape[-1], dtype=work, device=jac.device)
    return torch.linalg.slogdet(eye + jac.to(work)).logabsdet.to(jac.dtype)


def _exact_logdet_func(g: Callable, x: Tensor) -> Tuple[Tensor, Tensor]:
    """exact_logdet inside a torch.func transform (grad, vmap, jacrev), where torch.autograd.grad and requires_grad_
    are refused: the per-sample Jacobian by vmap(jacrev(g)), with the power iterations frozen for that recomputation
    (g(x) itself ran first, as the autograd form's does)."""
    gx = g(x)
    d = x[0].numel()

    def one(sample: Tensor) -> Tensor:
        return g(sample.unsqueeze(0)).reshape(-1)

    with power_iteration_frozen(True):
        jac = torch.func.vmap(torch.func.jacrev(one))(x).reshape(x.shape[0], d, d)
    return gx, _logabsdet_of_identity_plus(jac)
