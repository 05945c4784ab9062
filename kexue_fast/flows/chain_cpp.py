"""The dense chain's closed-form training step on the C++ core (csrc/flows/dense_chain.cpp): the CPU backend.

The same estimator and gradients as kexue_fast.flows.chain_neumann (whose module doc gives the formulas), in one
C++ call per forward and one per backward instead of ~80 torch operators a step: for the probes' series
(c_k = (−1)^{k+1} / (k P(N ≥ k)) per probe's plan),
    y = x + g(x),  logdet ≈ mean_p Σ_k c_k v_pᵀ J^k v_p,
and as gradient the Neumann gradient of Residual Flows (one pair (ℓ_p, v_p) per probe) or, with through_series, the
series' own (n pairs (L_j, J^j v) per probe). Float32 and float64 on C-contiguous CPU tensors. It runs on the
calling thread (THREADS): beside torch's OpenMP workers, which keep spinning after each parallel op, extra threads
of its own contended for the cores and ran slower than one (`python -m kexue_fast.benchmarks.cpp_threads`); so with
several torch threads `auto` gives large steps to torch's multithreaded products instead (use_cpp). Under
backward(create_graph=True) the gradients come from torch's graph, as in chain_neumann.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .chain import DenseChain
from .chain_neumann import _PARAMS, _graph_backward, _save_groups, _saved_groups, _Spec
from .logdet import SeriesPlan

_KINDS = {"lipswish": 0, "elu": 1, "tanh": 2, "leaky": 3}
THREADS = 1  # threads of the C++ calls (rows split deterministically for a given count); see the module doc
# With T > 1 torch threads, `auto` takes the C++ block for steps of at most this many multiply-adds per product set
# (B · Σ_i out_i·in_i) times T: on 2 threads the single-threaded block was faster than torch's closed form up to
# D = 32, H = 128, B = 1024 (8.4M) and slower at D = 64, H = 512, B = 512 (33.6M) (benchmarks/cpp_threads.py).
MULTITHREAD_WORK = 1 << 24


def auto_condition() -> Tuple[bool, str]:
    """For `python -m kexue_fast.info` (OpSpec.auto_when): auto takes the C++ block for dense chains on [B, D],
    with several torch threads only for small steps."""
    text = "for dense chains on [B, D]"
    if torch.get_num_threads() > 1:
        text += (f"; with {torch.get_num_threads()} torch threads only for steps of B·Σ out·in·threads <= "
                 f"{MULTITHREAD_WORK} (chain_cpp.use_cpp), larger ones on torch")  # fmt: skip
    return True, text


def use_cpp(chain: DenseChain, batch: int) -> bool:
    """Whether `auto` runs this step on the C++ block: always on one torch thread, else for small steps only."""
    threads = torch.get_num_threads()
    if threads <= 1:
        return True
    work = batch * sum(lin.in_features * lin.out_features for lin in chain.linears)
    return work * threads <= MULTITHREAD_WORK


def _padded(plans: Sequence[SeriesPlan], through_series: bool) -> List[List[float]]:
    """Each probe's 1/P(N ≥ k); through the series all padded with zeros to the longest (terms with a zero weight
    add nothing to the value or to the rows L_j, so the estimator and its gradient are unchanged)."""
    if any(p.mask is not None for p in plans):
        raise ValueError("masked series plans (the roulette under torch.compile) have no C++ path")
    inv = [list(p.inv_prob) for p in plans]
    if through_series:
        longest = max(1, *(len(i) for i in inv))  # all-empty plans (a Poisson length of 0): one zero term
        inv = [i + [0.0] * (longest - len(i)) for i in inv]
    return inv


def _softplus(raw: Tensor) -> float:
    """β = softplus(raw β) as torch computes it (linear above 20)."""
    r = float(raw)
    return r if r > 20 else math.log1p(math.exp(r))


def _np(t: Optional[Tensor]):
    return None if t is None else t.detach().numpy()


def _np_input(t: Optional[Tensor]):
    return None if t is None else t.detach().contiguous().numpy()


def _layout(spec: _Spec, batch: int, dim: int, lead: int, through_series: bool) -> Dict[str, List[Tuple[int, tuple]]]:
    """The workspace's layout (csrc/flows/dense_chain.hpp): name -> [(offset, shape)], and "size" -> [(total, ())].
    Cached per spec and shape."""
    key = (batch, dim, lead, through_series)
    cache = spec.__dict__.setdefault("_cpp_layouts", {})
    if key in cache:
        return cache[key]
    if len(cache) >= 64:  # batch sizes that keep changing: do not grow without bound
        cache.clear()
    layout: Dict[str, List[Tuple[int, tuple]]] = {}
    at = 0

    def take(name: str, shape: tuple) -> None:
        nonlocal at
        layout.setdefault(name, []).append((at, shape))
        at += math.prod(shape)

    take("rows", (lead, batch, dim))
    if through_series:
        take("right", (lead, batch, dim))
    for lin, act in zip(spec.linears[:-1], spec.activations):
        hidden = lin.layer.out_features
        for name in ("h", "a", "d") + (("s",) if act.kind == "lipswish" else ()):
            take(name, (batch, hidden))
        take("z", (lead, batch, hidden))
        take("uf", (lead, batch, hidden))
    for lin in spec.linears:
        out, inp = lin.layer.out_features, lin.layer.in_features
        take("weight", (out, inp))
        if lin.norm is not None:
            take("u", (out,))
            take("v", (inp,))
    layout["size"] = [(at, ())]
    cache[key] = layout
    return layout


def _view(workspace: Tensor, layout, name: str) -> List[Tensor]:
    return [workspace[at : at + math.prod(shape)].view(shape) for at, shape in layout.get(name, [])]


class _ChainCpp(torch.autograd.Function):
    """chain_neumann._ChainNeumann's inputs and outputs, computed by kexue_fast._core.dense_chain_forward/backward.
    Saves x, the probes and one workspace (O(B·(d + Σ hidden)) per probe, n times that through the series)."""

    @staticmethod
    def forward(ctx, x: Tensor, probes: Tensor, spec: _Spec, plans: Sequence[SeriesPlan], through_series: bool,
                *params):  # fmt: skip
        from .. import _core

        n = len(spec.linears)
        raw, biases, us, vs, raw_betas = (params[:n], params[n : 2 * n], params[2 * n : 3 * n], params[3 * n : 4 * n],
                                          params[4 * n :])  # fmt: skip
        x = x.contiguous()
        probes = probes.contiguous()
        dtype = x.dtype
        for name, group in (("weight", raw), ("bias", biases), ("u", us), ("v", vs)):
            for t in group:
                if t is not None and t.dtype != dtype:
                    raise TypeError(f"g's {name} is {t.dtype}, but x is {dtype}: the C++ block needs one dtype")
        raw = [w.contiguous() for w in raw]
        # inputs the core reads only: contiguous copies where strided (a state_dict loaded with assign=True)
        layers = [(w.detach().numpy(), _np_input(b), _np_input(u), _np_input(v),
                   c if c is not None else 1.0) for w, b, u, v, c in zip(raw, biases, us, vs, spec.coeffs)]  # fmt: skip
        betas = [_softplus(r) if r is not None else 1.0 for r in raw_betas]
        acts = [(_KINDS[a.kind], a.const, beta) for a, beta in zip(spec.activations, betas)]
        inv_prob = _padded(plans, through_series)
        lead = len(plans) * (len(inv_prob[0]) if through_series else 1)
        batch, dim = x.shape
        layout = _layout(spec, batch, dim, lead, through_series)
        y, value, workspace = x.new_empty((batch, dim)), x.new_empty((batch,)), x.new_empty(layout["size"][0][0])
        divisors, kappas, finite = _core.dense_chain_forward(
            x.detach().numpy(), probes.detach().numpy(), layers, acts, inv_prob, through_series, y.numpy(),
            value.numpy(), workspace.numpy(), THREADS,
        )  # fmt: skip
        if not finite:
            raise ValueError("x contains NaN or Inf")
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.plans, ctx.through_series, ctx.n_probes = spec, plans, through_series, len(plans)
        ctx.layers, ctx.acts, ctx.lead, ctx.layout = layers, acts, lead, layout
        ctx.scalars = (divisors, kappas)
        _save_groups(ctx, x=[x], probes=[probes], workspace=[workspace], raw=raw, biases=biases, raw_betas=raw_betas)
        return y, value

    @staticmethod
    def backward(ctx, grad_y: Optional[Tensor], grad_value: Optional[Tensor]):
        from .. import _core

        spec = ctx.spec
        n = len(spec.linears)
        saved = _saved_groups(ctx)
        (x,), (probes,), (workspace,) = saved["x"], saved["probes"], saved["workspace"]
        raw, biases, raw_betas = saved["raw"], saved["biases"], saved["raw_betas"]
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            layout = ctx.layout
            (rows,) = _view(workspace, layout, "rows")
            right = _view(workspace, layout, "right")[0] if ctx.through_series else probes
            snap_u, snap_v = iter(_view(workspace, layout, "u")), iter(_view(workspace, layout, "v"))
            us = [next(snap_u) if lin.norm is not None else None for lin in spec.linears]
            vs = [next(snap_v) if lin.norm is not None else None for lin in spec.linears]
            return _graph_backward(ctx, x, rows, right, raw, biases, us, vs, raw_betas, grad_y, grad_value)
        divisors, kappas = ctx.scalars
        needs = ctx.needs_input_grad
        grad_x = torch.empty_like(x) if needs[0] else None
        grad_w = [torch.empty_like(w) if needs[_PARAMS + i] else None for i, w in enumerate(raw)]
        grad_b = [x.new_empty(b.shape) if b is not None and needs[_PARAMS + n + i] else None
                  for i, b in enumerate(biases)]  # fmt: skip
        grad_beta = x.new_empty(n - 1) if any(r is not None for r in raw_betas) else None
        dtype = x.dtype
        gy = None if grad_y is None else grad_y.to(dtype).contiguous().numpy()
        gv = None if grad_value is None else grad_value.to(dtype).contiguous().numpy()
        _core.dense_chain_backward(
            _np(x), probes.numpy(), ctx.layers, ctx.acts, ctx.lead, ctx.through_series, workspace.numpy(), divisors,
            kappas, gy, gv, _np(grad_x), [_np(g) for g in grad_w], [_np(g) for g in grad_b], _np(grad_beta),
            THREADS,
        )  # fmt: skip
        betas: List[Optional[Tensor]] = [
            grad_beta[j].reshape(r.shape) if r is not None and needs[_PARAMS + 4 * n + j] else None
            for j, r in enumerate(raw_betas)
        ]
        return (grad_x, None, None, None, None, *grad_w, *grad_b, *([None] * (2 * n)), *betas)


def chain_logdet_cpp(chain: DenseChain, x: Tensor, plans: Sequence[SeriesPlan], probes: Sequence[Tensor],
                     through_series: bool = False) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """(y = x + g(x), log-det estimate [B]) of a DenseChain by the C++ core: chain_neumann_logdet's estimator and
    gradients (the Neumann gradient, or with through_series the series' own), for eager (unmasked) plans; x is
    [B, D], float32 or float64, on the CPU."""
    from .chain_neumann import _chain_inputs

    through_series = through_series and torch.is_grad_enabled()  # without a backward, the value is all there is
    spec, params, stacked = _chain_inputs(chain, probes, snapshot=False)  # the C++ forward snapshots u, v itself
    # contiguous before the Function, so that what it saves is what backward(create_graph=True) differentiates by
    n = len(spec.linears)
    params[:n] = [w.contiguous() for w in params[:n]]
    return _ChainCpp.apply(x.contiguous(), stacked, spec, plans, through_series, *params)
