"""`power_iteration`: σ̂ ≈ ‖W‖₂ for a batch or a list of matrices in one call.

See kexue_fast.spectral.reference for the iteration and its paper; this module validates, dispatches
(triton on CUDA, C++ on CPU, torch otherwise) and registers the op with torch.library (fake tensor impl for
torch.compile, gradient ∂σ̂/∂W = u vᵀ).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch
from .._autograd import transformed
from . import _validate, reference
from ._validate import check_matrix, check_n_iters, check_positive

OP = "power_iteration"
_dispatch.register_op(
    OP,
    {
        "triton": (torch.float32, torch.float64),
        "cpp": (torch.float32, torch.float64),
        "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    },
)

Weights = Union[Tensor, Sequence[Tensor]]
Vectors = Union[Tensor, Sequence[Tensor], None]


def run_backend(
    backend: str,
    weights: List[Tensor],
    v_init: List[Tensor],
    u_out: List[Tensor],
    v_out: List[Tensor],
    n_iters: int,
    tol: Optional[float],
    eps: float,
) -> Tensor:
    """Runs one chosen backend on validated matrices; writes u_out/v_out in place and returns σ̂ [L].

    The matrices must be contiguous (C++ and triton read them in place); v_init may alias v_out.
    """
    if backend == "cpp":
        from .. import _core

        for src, dst in zip(v_init, v_out):
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
        sigma, _ = _core.power_iteration(
            [w.detach().numpy() for w in weights],
            [u.detach().numpy() for u in u_out],
            [v.detach().numpy() for v in v_out],
            n_iters,
            -1.0 if tol is None else tol,
            eps,
            torch.get_num_threads(),
        )
        return torch.from_numpy(sigma)
    if backend == "triton":
        from ..kernels import power_iteration as kernel

        return kernel.power_iteration(weights, u_out, v_out, v_init, n_iters, tol, eps)
    sigma, us, vs = reference.power_iteration(weights, v_init, n_iters, tol, eps)
    for dst, src in zip(u_out, us):
        dst.copy_(src)
    for dst, src in zip(v_out, vs):
        dst.copy_(src)
    return sigma


def _power_iteration_impl(
    weights: List[Tensor], v: List[Tensor], n_iters: int, tol: Optional[float], eps: float, backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    """σ̂ [L] and u, v packed flat [Σm], [Σn]: the body of the registered op."""
    first = weights[0]
    u_flat = first.new_empty(sum(w.shape[0] for w in weights))
    v_flat = first.new_empty(sum(w.shape[1] for w in weights))
    u_out = list(u_flat.split([w.shape[0] for w in weights]))
    v_out = list(v_flat.split([w.shape[1] for w in weights]))
    dense = [w.contiguous() for w in weights]
    sigma = run_backend(backend, dense, v, u_out, v_out, n_iters, tol, eps).to(first.device)
    return sigma, u_flat, v_flat


# One opaque node under torch.compile, with a fake-tensor impl and a registered gradient. Eager calls skip its dispatch
# machinery and autograd wrapper: the same body directly without a gradient, through _PowerIteration with one. On the
# 2-core CPU VM (python -m kexue_fast.benchmarks.spectral_host at eb0dc2e) a forward + backward of 8 matrices 64 × 32
# took 603 µs through the Function and 882 µs through the op; of 2 matrices, 410 against 635 µs.
_power_iteration_op = torch.library.custom_op("kexue_fast::power_iteration", mutates_args=())(_power_iteration_impl)


@_power_iteration_op.register_fake
def _(weights, v, n_iters, tol, eps, backend):
    first = weights[0]
    return (
        first.new_empty(len(weights)),
        first.new_empty(sum(w.shape[0] for w in weights)),
        first.new_empty(sum(w.shape[1] for w in weights)),
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.rows = [w.shape[0] for w in inputs[0]]
    ctx.cols = [w.shape[1] for w in inputs[0]]
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_sigma, grad_u, grad_v):
    """∂σ̂_i/∂W_i = u_i v_iᵀ with u, v held constant (as torch's spectral_norm differentiates σ = uᵀWv)."""
    u, v = ctx.saved_tensors
    none = [None] * len(ctx.rows)  # the gradient's structure must mirror the inputs': one entry per list item
    if grad_sigma is None:
        return none, none, None, None, None, None
    grads = [g * torch.outer(ui, vi) for g, ui, vi in zip(grad_sigma.unbind(0), u.split(ctx.rows), v.split(ctx.cols))]
    return grads, none, None, None, None, None


_power_iteration_op.register_autograd(_backward, setup_context=_setup_context)


class _PowerIteration(torch.autograd.Function):
    """The registered op's body and gradient as an autograd Function, for eager calls that need a gradient:
    (n_iters, tol, eps, backend, L, *weights, *v) -> (σ̂ [L], u flat, v flat). As on the op, u and v are outputs of
    the node whose gradients are ignored (held constant: ∂σ̂/∂W = u vᵀ)."""

    @staticmethod
    def forward(ctx, n_iters: int, tol: Optional[float], eps: float, backend: str, n: int, *tensors: Tensor):
        weights, v = list(tensors[:n]), list(tensors[n:])
        sigma, u_flat, v_flat = _power_iteration_impl(weights, v, n_iters, tol, eps, backend)
        _setup_context(ctx, (weights,), (sigma, u_flat, v_flat))
        ctx.set_materialize_grads(False)
        return sigma, u_flat, v_flat

    @staticmethod
    def backward(ctx, grad_sigma: Optional[Tensor], _grad_u: Optional[Tensor], _grad_v: Optional[Tensor]):
        grads = _backward(ctx, grad_sigma, None, None)[0]
        return (None,) * 5 + tuple(grads) + (None,) * len(ctx.rows)


def _as_matrices(weights: Weights) -> Tuple[List[Tensor], str]:
    if isinstance(weights, Tensor):
        if weights.ndim == 3:
            if weights.shape[0] == 0:
                raise ValueError("weights must hold at least one matrix, got shape [0, m, n]")
            return [check_matrix(w, "weights") for w in weights.unbind(0)], "batched"
        if weights.ndim == 2:
            return [check_matrix(weights, "weights")], "single"
        raise ValueError(
            f"weights must be a matrix [m, n], a batch [B, m, n] or a list of matrices; got a {weights.ndim}-D "
            f"tensor of shape {tuple(weights.shape)}"
        )
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a Tensor or a list of 2-D Tensors, got {type(weights).__name__}")
    if len(weights) == 0:
        raise ValueError("weights must hold at least one matrix, got an empty list")
    mats = [check_matrix(w, f"weights[{i}]") for i, w in enumerate(weights)]
    first = mats[0]
    for i, w in enumerate(mats):
        if w.device != first.device or w.dtype != first.dtype:
            raise ValueError(
                f"weights[{i}] is {w.dtype} on {w.device} but weights[0] is {first.dtype} on {first.device}: "
                "a list must share one device and dtype (group it, as kexue_fast.nn.update_spectral_norms does)"
            )
    return mats, "list"


def _vectors(vectors: Vectors, form: str, mats: List[Tensor], dim: int, name: str) -> Optional[List[Tensor]]:
    if vectors is None:
        return None
    sizes = [w.shape[dim] for w in mats]
    if form == "list":
        if not isinstance(vectors, (list, tuple)) or len(vectors) != len(mats):
            raise TypeError(f"{name} must be a list of {len(mats)} vectors, like weights")
        vecs = list(vectors)
    elif form == "batched":
        if not isinstance(vectors, Tensor) or vectors.shape != (len(mats), sizes[0]):
            raise ValueError(f"{name} must be a tensor of shape {(len(mats), sizes[0])}")
        vecs = list(vectors.unbind(0))
    else:
        if not isinstance(vectors, Tensor) or vectors.shape != (sizes[0],):
            raise ValueError(f"{name} must be a tensor of shape {(sizes[0],)}")
        vecs = [vectors]
    for i, (vec, size) in enumerate(zip(vecs, sizes)):
        if not isinstance(vec, Tensor) or vec.shape != (size,):
            raise ValueError(f"{name}[{i}] must be a vector of length {size}")
        if vec.dtype != mats[i].dtype or vec.device != mats[i].device:
            raise ValueError(f"{name}[{i}] must have the dtype and device of its weight ({mats[i].dtype}, "
                             f"{mats[i].device})")  # fmt: skip
    return [vec.detach() for vec in vecs]


def check_sigma(weight: Tensor, sigma: float, where: str) -> None:
    """Why a σ̂ read on the host is NaN, Inf or 0 when that is an error: a non-finite weight, or a finite one whose
    ‖W v‖² overflows its dtype (σ ≳ 1.8e19 in float32): the C++ core's σ̂ then comes out Inf, the torch path's
    u = Wv/‖Wv‖ = Wv/Inf = 0 and σ̂ = 0. A 0 from a finite weight that does not overflow is the iteration's own
    (a zero weight, or a start vector in its null space)."""
    w = weight.detach()
    _validate.check_finite(w, where)
    frobenius = float(torch.linalg.vector_norm(w.abs().to(torch.float64)))
    largest = torch.finfo(w.dtype.to_real()).max
    if frobenius >= math.sqrt(largest):
        raise ValueError(
            f"{where} has norm {frobenius:.3g} (Frobenius): the power iteration's ‖W v‖² overflows {w.dtype} "
            f"(largest {largest:.3g}); compute in float64"
        )
    if not math.isfinite(sigma):
        raise ValueError(f"σ̂ of {where} came out {sigma} from a finite weight: its start vectors hold NaN or Inf")


def power_iteration(
    weights: Weights,
    *,
    n_iters: int = 1,
    u: Vectors = None,
    v: Vectors = None,
    tol: Optional[float] = None,
    eps: float = 1e-12,
    generator: Optional[torch.Generator] = None,
    check_finite: Optional[bool] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Vectors, Vectors]:
    """Largest singular values σ̂ of many matrices by power iteration, all in one call.

    Per matrix W [m, n] and iteration: u ← Wv/‖Wv‖, v ← Wᵀu/‖Wᵀu‖, σ̂ = uᵀWv = ‖Wᵀu‖ (torch's spectral_norm
    update; Miyato et al. 2018). σ̂ ≤ ‖W‖₂ (a lower bound in exact arithmetic; rounding can put it a few ulps above;
    see `spectral_norm_bound` for a certified upper one).
    Where W v = 0 (a zero matrix) the iteration stops there: σ̂ = 0, u = 0, v kept (not zeroed for good).

    Args:
        weights: a matrix [m, n], a batch [B, m, n], or a list of matrices of different shapes (one device/dtype).
        n_iters: iterations to run (>= 1); with `tol`, the most to run.
        u, v: warm-start vectors shaped like the outputs. `v` is the start vector; if only `u` is given the
            start is v = Wᵀu; with neither, v is drawn from N(0, I) with `generator`.
        tol: stop once |σ̂_k − σ̂_{k−1}| ≤ tol·σ̂_k (checked every iteration: a host sync on GPU), per matrix on
            the C++ and torch backends; on Triton every matrix iterates until the last one meets it (results within
            tol of each other). None runs exactly `n_iters` iterations without any host sync.
        eps: floor of the norms in the normalizations, as in torch.
        check_finite: raise ValueError if a weight or a given u, v holds NaN/Inf, or a weight's ‖W v‖² overflows
            its dtype (‖W‖ ≳ 1.8e19 in float32: σ̂ would come out Inf or 0); detected from σ̂, so costing one host
            read. None checks where it costs no device sync: on CPU always, on CUDA only when `tol` is given.
        backend: "auto" (KEXUE_FAST_BACKEND, else triton on CUDA, C++ on CPU), "triton", "cpp" or "torch".

    Returns:
        (sigma, u, v): for [B, m, n] input: [B], [B, m], [B, n]; for one matrix: [], [m], [n]; for a list:
        sigma [L] and lists of u_i [m_i], v_i [n_i]. u, v are unit vectors to pass back as a warm start.
        sigma is differentiable w.r.t. the weights with ∂σ̂/∂W = u vᵀ.
    """
    mats, form = _as_matrices(weights)
    if transformed(*mats):
        raise NotImplementedError(
            "power_iteration cannot run under torch.func transforms (vmap, grad, jacrev...): its backends read data "
            "pointers and host values, and its autograd.Function has no setup_context. It takes batches itself: pass "
            "a batch [B, m, n] (or a list of matrices) instead of vmapping it; σ̂'s gradient u vᵀ comes "
            "from ordinary autograd"
        )
    n_iters = check_n_iters(n_iters)
    tol = check_positive(tol, "tol", allow_none=True)
    eps = check_positive(eps, "eps")
    first = mats[0]
    chosen = _dispatch.choose(OP, first.device, first.dtype, backend)

    v_init = _vectors(v, form, mats, 1, "v")
    u_init = _vectors(u, form, mats, 0, "u")
    if v_init is None:
        if u_init is not None:
            v_init = [torch.mv(w.detach().mH, ui) for w, ui in zip(mats, u_init)]
        else:
            flat = torch.randn(sum(w.shape[1] for w in mats), dtype=first.dtype, device=first.device,
                               generator=generator)  # fmt: skip
            v_init = list(flat.split([w.shape[1] for w in mats]))

    compiling = torch.compiler.is_compiling()
    may_read = not compiling and (
        check_finite or (check_finite is None and (first.device.type == "cpu" or tol is not None))
    )
    if may_read:  # a NaN start reached the torch path's σ̂ as 0 (u kept at 0), the others' as NaN
        for name, given in (("u", u_init), ("v", v_init if v is not None else None)):
            for i, vec in enumerate(given or ()):
                _validate.check_finite(vec, name if form == "single" else f"{name}[{i}]")
    if v is not None and may_read:  # a zero start stays zero (v is kept where Wv = 0): σ̂ = 0 for good
        zero = next((i for i, vi in enumerate(v_init) if not bool(vi.detach().ne(0).any())), None)
        if zero is not None:
            raise ValueError(f"v{'' if form == 'single' else f'[{zero}]'} must be a non-zero start vector")
    if compiling:
        sigma, u_flat, v_flat = _power_iteration_op(mats, v_init, n_iters, tol, eps, chosen)
    elif torch.is_grad_enabled() and any(w.requires_grad for w in mats):
        sigma, u_flat, v_flat = _PowerIteration.apply(n_iters, tol, eps, chosen, len(mats), *mats, *v_init)
    else:
        sigma, u_flat, v_flat = _power_iteration_impl(mats, v_init, n_iters, tol, eps, chosen)

    if may_read:
        values = sigma.tolist()  # one host read (a sync on CUDA: only where allowed above)
        for i, x in enumerate(values):
            if not math.isfinite(x) or x == 0:
                check_sigma(mats[i], x, "weights" if form == "single" else f"weights[{i}]")

    if form == "single":
        return sigma[0], u_flat, v_flat
    if form == "batched":
        return sigma, u_flat.view(len(mats), -1), v_flat.view(len(mats), -1)
    return sigma, list(u_flat.split([w.shape[0] for w in mats])), list(v_flat.split([w.shape[1] for w in mats]))
