"""`som_regularizer`: the Self-Orthogonality regularizer of one or many layer outputs in one call (formula and
paper: kexue_fast.ortho.reference).

Route per layer (both exact): when b ≥ k, everything follows from the k×k Gram G = ZᵀZ of Z = tanh(γY): Θ = D⁻¹GD⁻¹ with
D = diag(max(√G_ii, eps)), and the off-diagonal sums are taken on Θ directly (O(k²), no cancellation). G comes from the
fused Triton kernels on CUDA (kernels/som.py: all such layers in one launch per group of one row layout, tile width and
block size, Y read in place, Z never written; backward ∂R/∂Y = γ(1 − Z²) ⊙ (Z(Ḡ + Ḡᵀ)) in as many more), from the C++
core on CPU (which also forms R and A = γ(Ḡ + Ḡᵀ) from it: _CppPenalty, one C++ call forward, one per layer
backward), or from torch. When b < k, the b×b form is cheaper: Σ_{i≠j}Θ_ij = ‖Ẑ1‖² − Σ_i Θ_ii and Σ_{i≠j}Θ_ij² =
‖ẐẐᵀ‖_F² − Σ_i Θ_ii² (O(b²k), torch).
The Triton path is one autograd Function in eager mode (_TritonPenalty) and, under torch.compile, two torch.library
custom ops, opaque there: kexue_fast::som_penalty (the Gram kernels, a sum over row chunks, and one program per layer
for R and the backward's A) and kexue_fast::som_gram_backward; both run the same launches.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch
from .._autograd import first_order, no_autocast, transformed
from .._layout import memory_order
from . import reference, workspace

_DOUBLE_BACKWARD = {
    "op": "som_regularizer (a layer with rows ≥ channels)",
    "instead": "under torch.func transforms som_regularizer runs torch ops alone, differentiable to any order, as "
    "is kexue_fast.ortho.reference.som_cheap",
}  # first_order's message

OP = "som_regularizer"
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_dispatch.register_op(
    OP, {"triton": _FLOATS, "cpp": _FLOATS, "torch": _FLOATS},
    auto_when={"cpp": lambda: _auto_condition()},
    # 3.3 and 3.4 refuse float64 dots; 3.0 and 3.1's compilers abort (an LLVM assertion: the process dies) on the
    # backward's tf32x3 dots of bfloat16 inputs for sm_90 (tests/test_kernels_compile.py under each version)
    triton_needs={torch.float64: ((3, 5), "float64 tl.dot"), torch.bfloat16: ((3, 2), "bfloat16 tf32x3 tl.dot")},
)  # fmt: skip

# `auto` on CUDA sends layers wider than this to the torch path. On an H200 at 97d765a (python -m kexue_fast.bench
# --device cuda --suite ortho --full, benchmarks/results/ortho-cuda.md) the kernels (tf32x3 Gram dots since 3b63a80)
# took one [32768, 256] layer's forward + backward in 0.653 ms against 1.343 on the torch path; on an H100 at 1889232,
# with IEEE FMA dots, 2.65 against 1.32 (the limit was 128 then). Wider layers are not measured: the bench's CUDA
# formula rows [16384, 512] and [8192, 1024] are there for the next GPU run to move this limit.
TRITON_AUTO_MAX_CHANNELS = 256

# The C++ route's threads (cpp_threads): as many as torch runs, on torch's own OpenMP team where the core finds one
# loaded (_core.omp_team(): the team's workers spin after each torch op, so they take the C++ work at once); one, the
# calling thread, where it does not: threads of its own beside torch's spinning workers contended for the cores (in a
# CNN step with torch on two threads, python -m kexue_fast.benchmarks.cpp_threads on a 2-core AVX2 VM at c1c75d0: one
# C++ thread +20.0% against two +26.7%; on the team at d9c578d, 2-core AVX-512 VM,
# benchmarks/results/cpp-threads-cpu.md: two +17.0% against one +27.3%). CPP_THREADS, where set, overrides.
# `auto` takes the C++ route while torch runs on at most CPP_MAX_TORCH_THREADS threads (use_cpp): more are not
# measured on such a machine, so `auto` leaves them to torch.
CPP_THREADS: Optional[int] = None
CPP_MAX_TORCH_THREADS = 2

# The C++ route keeps Z = tanh(γY) from the forward for the backward (a buffer of Y's size per layer, its rows one
# 64-byte line longer where they fill a multiple of 1 KiB (_kept_z), Y's dtype or float32, from
# kexue_fast.ortho.workspace: kept between steps, saved in place of Y) instead of recomputing it there:
# the forward stores each chunk's Z as it computes it (past the caches), the backward reads it in place under AVX-512
# (elsewhere copies it where it computed it).
# False: Z recomputed, no buffer. In benchmarks/ortho.py's CPU step the C++ calls took 6.30 / 6.13 ms a step so,
# against 6.68 / 6.61 with Z recomputed (two runs of som_profile --cpp-split --recompute-z at b2cfc07: the forward's
# stores cost ~0.2-0.3 ms, the backward saves ~0.7).
KEEP_Z = True


def cpp_threads() -> int:
    """Threads for the C++ core's calls: CPP_THREADS where set; else torch.get_num_threads() where the core runs on
    the process's OpenMP team (torch's), else 1."""
    if CPP_THREADS is not None:
        return CPP_THREADS
    return torch.get_num_threads() if _cpp_core().omp_team() else 1


def use_cpp() -> bool:
    """Whether `auto` takes the C++ route in this process now: while torch runs on at most CPP_MAX_TORCH_THREADS."""
    return torch.get_num_threads() <= CPP_MAX_TORCH_THREADS


def _auto_condition() -> Tuple[bool, str]:
    return use_cpp(), (f"only while torch runs on at most {CPP_MAX_TORCH_THREADS} threads (now "
                       f"{torch.get_num_threads()}; som.use_cpp)")  # fmt: skip


Layout = Tuple[int, int, int]
_TINY64 = float(torch.finfo(torch.float64).tiny)
ChannelDim = Union[int, Sequence[int]]


def check_hyperparameters(gamma: float, lambda1: float, lambda2: float, eps: float) -> None:
    """γ > 0, λ₁ ≥ 0, λ₂ ≥ 0, eps > 0, all finite real numbers (ValueError naming the first that is not)."""
    for name, value, positive in (("gamma", gamma, True), ("lambda1", lambda1, False), ("lambda2", lambda2, False),
                                  ("eps", eps, True)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}")
        if (value <= 0) if positive else (value < 0):
            raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    if eps * eps < _TINY64:  # a dead unit's column would then be scaled by 1/sqrt(0): inf·0 = NaN
        raise ValueError(f"eps must be >= {math.sqrt(_TINY64):.4g} (eps² must not underflow in float64), got {eps!r}")


def _layout(y: Tensor, dim: int) -> Layout:
    shape = y.shape
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])


def _prepare(ys, channel_dim) -> Tuple[List[Tensor], List[int]]:
    if isinstance(ys, Tensor):
        ys = [ys]
    elif isinstance(ys, (list, tuple)):
        ys = list(ys)
    else:
        raise TypeError(f"y must be a tensor or a list/tuple of tensors, got {type(ys).__name__}")
    if not ys:
        raise ValueError("y is an empty list: pass at least one layer output")
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, (int, list, tuple)):
        raise TypeError(f"channel_dim must be an int or one int per layer, got {channel_dim!r}")
    dims = [channel_dim] * len(ys) if isinstance(channel_dim, int) else list(channel_dim)
    if len(dims) != len(ys):
        raise ValueError(f"channel_dim has {len(dims)} entries for {len(ys)} layer outputs")
    out_dims = []
    for i, (y, dim) in enumerate(zip(ys, dims)):
        if not isinstance(y, Tensor):
            raise TypeError(f"y[{i}] must be a torch.Tensor, got {type(y).__name__}")
        if y.dtype not in _FLOATS:
            raise TypeError(f"y[{i}] must be float32, float64, float16 or bfloat16, got {y.dtype}")
        if y.ndim < 2:
            raise ValueError(f"y[{i}] must have a sample axis and a channel axis (ndim >= 2), got {tuple(y.shape)}")
        if isinstance(dim, bool) or not isinstance(dim, int) or not -y.ndim <= dim < y.ndim:
            raise ValueError(f"channel_dim for y[{i}] must be an int in [{-y.ndim}, {y.ndim}), got {dim!r}")
        dim %= y.ndim
        if y.numel() == 0:
            raise ValueError(f"y[{i}] is empty (shape {tuple(y.shape)})")
        if y.device != ys[0].device:
            raise ValueError(f"every layer output must be on one device, got {ys[0].device} and {y.device} (y[{i}])")
        out_dims.append(dim)
    views = [_in_memory_order(y, dim) for y, dim in zip(ys, out_dims)]
    return [v for v, _ in views], [d for _, d in views]


def _in_memory_order(y: Tensor, dim: int) -> Tuple[Tensor, int]:
    """(y, dim) where y is contiguous or not dense; else y's axes permuted into the order of its strides (a
    contiguous view: channels_last and channels_last_3d maps, transposed matrices) and the channel axis's place there.
    R reads Y as rows [b, k] in any order of the rows, so every backend then reads Y in place (layout (N·H·W, C, 1)
    for a channels_last map) instead of a contiguous copy, and ∂R/∂Y comes back in Y's own memory format."""
    order = memory_order(y)
    return (y, dim) if order is None else (y.permute(order), order.index(dim))


def _as_rows(y: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Y as [b, k] in `dtype` (b = every axis but the channel axis)."""
    return y.movedim(dim, -1).reshape(-1, y.shape[dim]).to(dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _masks(device: torch.device, ks: Tuple[int, ...], kp: int) -> Tuple[Tensor, Tensor]:
    """(valid channels [L, KP], valid off-diagonal pairs [L, KP, KP]) for the zero-padded Grams; cached, since
    building them from host data would copy host memory to the device on every call."""
    idx = torch.arange(kp, device=device)
    valid = idx[None, :] < torch.tensor(ks, device=device)[:, None]
    pairs = valid[:, :, None] & valid[:, None, :] & (idx[:, None] != idx[None, :])
    return valid, pairs


def gram_penalty(g: Tensor, ks: Sequence[int], lambda1: float, lambda2: float, eps: float) -> Tensor:
    """R_ℓ [L] from zero-padded Grams G_ℓ = ZᵀZ (g: [L, KP, KP]; layer ℓ uses the leading ks[ℓ] channels).
    Θ = G_ij / (max(√G_ii, eps) max(√G_jj, eps)); off-diagonal sums taken on Θ directly. One autograd node with the
    closed-form gradient (_GramPenalty): a dozen batched ops each way, whatever the number of layers. Under
    torch.compile, autograd through the same ops instead (compiled, their count costs nothing; and inductor in torch
    2.13 miscompiled the gradient of this Function fed by _Grams, to values ~1e37)."""
    if torch.compiler.is_compiling():
        return _penalty_of(_theta(g, tuple(ks), eps)[0], lambda1, lambda2)[0]
    return _GramPenalty.apply(g, tuple(ks), float(lambda1), float(lambda2), float(eps))


def _penalty_of(theta: Tensor, lambda1: float, lambda2: float) -> Tuple[Tensor, Tensor]:
    """(R = λ₁s₁² + λ₂s₂ per layer, s₁) from Θ [L, KP, KP] with zeros off the valid off-diagonal pairs."""
    s1 = theta.sum((1, 2))
    return lambda1 * s1 * s1 + lambda2 * (theta * theta).sum((1, 2)), s1


def _theta(g: Tensor, ks: Tuple[int, ...], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(Θ with zeros off the valid off-diagonal pairs, d = diag(D⁻¹) with zeros on padding, G_ii ≥ eps²)."""
    valid, pairs = _masks(g.device, ks, g.shape[-1])
    diag = g.diagonal(dim1=-2, dim2=-1)
    inv = torch.where(valid, diag.clamp_min(eps * eps).rsqrt(), 0.0)
    return torch.where(pairs, g * inv[:, :, None] * inv[:, None, :], 0.0), inv, diag >= eps * eps


class _GramPenalty(torch.autograd.Function):
    """R_ℓ = λ₁ s₁² + λ₂ s₂ with s₁ = Σ_{i≠j} Θ_ij, s₂ = Σ_{i≠j} Θ_ij², Θ = D⁻¹GD⁻¹, D_ii = max(√G_ii, eps).

    Backward, with M = P ⊙ (2λ₁s₁ + 2λ₂Θ) (P: the valid off-diagonal pairs) = ∂R/∂Θ and d = diag(D⁻¹):
    ∂R/∂G = M ⊙ ddᵀ − ½ diag(d² ⊙ Σ_j (M_ij Θ_ij + M_ji Θ_ji)), the diagonal term only where G_ii ≥ eps² (clamp_min's
    gradient); both orders of the pairs, since G need not be exactly symmetric (a float32 product's)."""

    @staticmethod
    def forward(ctx, g: Tensor, ks: Tuple[int, ...], lambda1: float, lambda2: float, eps: float) -> Tensor:
        theta, inv, unclamped = _theta(g, ks, eps)
        r, s1 = _penalty_of(theta, lambda1, lambda2)
        ctx.save_for_backward(theta, inv, s1, unclamped)
        ctx.lambdas = (lambda1, lambda2)
        ctx.ks = ks
        return r

    @staticmethod
    @first_order(**_DOUBLE_BACKWARD)
    def backward(ctx, grad: Tensor):
        theta, inv, s1, unclamped = ctx.saved_tensors
        lambda1, lambda2 = ctx.lambdas
        _, pairs = _masks(theta.device, ctx.ks, theta.shape[-1])
        m = torch.where(pairs, (2 * lambda1 * s1)[:, None, None] + (2 * lambda2) * theta, 0.0)
        m *= grad[:, None, None]
        mt = m * theta
        # rows and columns both: a Gram from a float32 product need not be exactly symmetric
        diag = torch.where(unclamped, (-0.5 * inv * inv) * (mt.sum(-1) + mt.sum(-2)), 0.0)
        out = m.mul_(inv[:, :, None]).mul_(inv[:, None, :])
        out.diagonal(dim1=-2, dim2=-1).copy_(diag)  # M's diagonal is 0 (P excludes it)
        return out, None, None, None, None


def rows_penalty(y: Tensor, gamma: float, lambda1: float, lambda2: float, eps: float) -> Tensor:
    """R of y [b, k] with b < k through ‖Ẑ1‖² and ‖ẐẐᵀ‖_F (O(b²k))."""
    z = _tanh(y, gamma)
    norms = torch.linalg.vector_norm(z, dim=0)
    if _inexact_columns(norms * norms, y).numel():  # b < k: few rows, so redo them all
        z = _tanh(y, gamma, exact=True)
        norms = torch.linalg.vector_norm(z, dim=0)
    zh = z / norms.clamp_min(eps)
    d = (zh * zh).sum(0)
    s1 = (zh.sum(1) ** 2).sum() - d.sum()
    h = zh @ zh.T
    s2 = (h * h).sum() - (d * d).sum()
    return lambda1 * s1 * s1 + lambda2 * s2


def _triples(flat: Sequence[int]) -> Tuple[Layout, ...]:
    return tuple((flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3))


def _triton_penalty_impl(
    ys: List[Tensor], layouts: List[int], gamma: float, lambda1: float, lambda2: float, eps: float
) -> Tuple[Tensor, Tensor]:
    """(R [L], A [L, KP, KP]) float64 of every layer by the fused kernels: A = Ḡ + Ḡᵀ at a unit upstream gradient,
    for the backward; layouts: (N, C, S) per layer, flat."""
    from ..kernels import som as kernels

    return kernels.penalty(ys, _triples(layouts), gamma, lambda1, lambda2, eps)


def _triton_gram_backward_impl(ys: List[Tensor], layouts: List[int], gamma: float, a: Tensor, scale: Tensor) -> Tensor:
    """∂R/∂Y of every layer packed flat, for A_ℓ = scale_ℓ · a_ℓ (a: [L, KP, KP], scale: [L])."""
    from ..kernels import som as kernels

    return kernels.gram_backward(ys, _triples(layouts), gamma, a, scale)


# Opaque nodes under torch.compile (fake-tensor impls below); the backward op returns one flat buffer because a
# custom op's outputs may not alias each other, and autograd splits it into per-layer views.
_triton_penalty = torch.library.custom_op("kexue_fast::som_penalty", mutates_args=())(_triton_penalty_impl)
_triton_gram_backward = torch.library.custom_op("kexue_fast::som_gram_backward", mutates_args=())(
    _triton_gram_backward_impl
)


@_triton_penalty.register_fake
def _(ys, layouts, gamma, lambda1, lambda2, eps):
    from ..kernels.som import tile_width

    max_c = max(_triples(layouts), key=lambda t: t[1])[1]
    kp = -(-max_c // tile_width(max_c)) * tile_width(max_c)
    return ys[0].new_empty((len(ys),), dtype=torch.float64), ys[0].new_empty((len(ys), kp, kp), dtype=torch.float64)


@_triton_gram_backward.register_fake
def _(ys, layouts, gamma, a, scale):
    return ys[0].new_empty(sum(y.numel() for y in ys))


def _penalty_setup_context(ctx, inputs, output) -> None:
    ys, layouts, gamma = inputs[:3]
    ctx.layouts, ctx.gamma = layouts, gamma
    ctx.save_for_backward(*ys, output[1])
    ctx.set_materialize_grads(False)  # A is never differentiated: no [L, KP, KP] of zeros for its gradient


def _penalty_backward(ctx, grad: Optional[Tensor], _grad_a: Optional[Tensor]):
    *ys, a = ctx.saved_tensors
    if grad is None:
        return [None] * len(ys), None, None, None, None, None
    flat = _triton_gram_backward(list(ys), ctx.layouts, ctx.gamma, a, grad)  # one launch: A_ℓ = (∂L/∂R_ℓ)·a_ℓ
    return _unpack(flat, ys), None, None, None, None, None


def _unpack(flat: Tensor, ys: Sequence[Tensor]) -> List[Tensor]:
    """The backward kernels' flat output as one gradient view per layer, in each Y's shape."""
    return [g.view(y.shape) for g, y in zip(flat.split([y.numel() for y in ys]), ys)]


_triton_penalty.register_autograd(_penalty_backward, setup_context=_penalty_setup_context)


class _TritonPenalty(torch.autograd.Function):
    """(gamma, lambda1, lambda2, eps, layouts, *ys) -> R [L] by the fused kernels (computed in float64, returned in
    the output dtype: float64 for float64 layers, else float32, with no cast launch), outside torch.compile: the
    same launches as the custom ops above without their Python dispatch and autograd wrapper. On the 2-core CPU VM with
    the launches as no-ops (benchmarks/som_profile.py --host-overhead --route triton at 45e4e0c) the custom ops' route
    took 652 µs forward and 1222 µs forward + backward, this one 368 and 705 µs; on a lent H200 machine, whose host
    bounds the step, the CNN step with SOM took 6.89 ms through the custom ops (som_profile at d00a56c) and 4.25 ms
    through this Function (60a352b), the step without SOM 3.46 ms (som_profile --sweep at d00a56c)."""

    @staticmethod
    def forward(ctx, gamma: float, lambda1: float, lambda2: float, eps: float, layouts: Tuple[Layout, ...],
                *ys: Tensor) -> Tensor:  # fmt: skip
        from ..kernels import som as kernels

        r, a = kernels.penalty(ys, layouts, gamma, lambda1, lambda2, eps, out_dtype=_out_dtype(ys))
        ctx.gamma, ctx.layouts = gamma, layouts
        ctx.save_for_backward(*ys, a)
        ctx.set_materialize_grads(False)  # no gradient for R: no backward pass at all
        return r

    @staticmethod
    @first_order(**_DOUBLE_BACKWARD)
    def backward(ctx, grad: Optional[Tensor]):
        from ..kernels import som as kernels

        *ys, a = ctx.saved_tensors
        if grad is None:
            return (None,) * (5 + len(ys))
        flat = kernels.gram_backward(ys, ctx.layouts, ctx.gamma, a, grad)  # one launch per group: A_ℓ = (∂L/∂R_ℓ)·a_ℓ
        grads = [g if need else None for g, need in zip(_unpack(flat, ys), ctx.needs_input_grad[5:])]
        return (None, None, None, None, None, *grads)


@functools.lru_cache(maxsize=8)
def _one(dtype: torch.dtype) -> Tensor:
    return torch.ones((), dtype=dtype, device="cpu")  # CPU whatever torch's default device (it is cached)


def _tanh(y: Tensor, gamma: float, exact: bool = False) -> Tensor:
    """tanh(γy); on CPU below float64 (unless exact, or under torch.compile, which fuses tanh itself) as 2σ(2γy) − 1:
    torch's CPU tanh is several times slower than this form, whose absolute error is ≤ 2 ulp(1). That is a relative
    error of up to ~2.4e-7/rms in a column of Z of that rms, which Θ's normalization exposes: callers redo columns too
    small for it with exact=True (_inexact_columns)."""
    if y.device.type == "cpu" and y.dtype != torch.float64 and not exact and not torch.compiler.is_compiling():
        if torch.is_grad_enabled() and y.requires_grad:
            return 2 * torch.sigmoid(y * (2 * gamma)) - 1
        s = (y * (2 * gamma)).sigmoid_()  # one buffer: fresh CPU pages are costly to touch
        return s.lerp_(_one(s.dtype).expand_as(s), -1.0)  # s − (1 − s) = 2s − 1 in one pass
    return torch.tanh(y * gamma)


# Columns of Z whose rms is below this are redone with the exact tanh on the CPU (see _tanh): the sigmoid form's error
# then stays below ~5e-7 of each column's norm, near float32's own (R sums those columns' products, which can cancel:
# with 2.4e-3, the value before, float32 layers of small activations had R far beyond 2× the direct float32 formula's
# error: tests/test_self_orthogonality.py::test_float32_error_across_activation_scales fails there). Zero columns count
# (the sigmoid form rounds |γy| < ~3e-8 to 0). Layers of small activations (|γy| ≲ 0.6) pay the exact tanh on top of
# the sigmoid form.
SIGMOID_MIN_RMS = 0.5


def _inexact_columns(squared_norms: Tensor, y: Tensor) -> Tensor:
    """Indices of the columns (squared norms ‖z_j‖², [k]) of _tanh's sigmoid form of y with rms(z_j) <
    SIGMOID_MIN_RMS, which exact=True should redo (none where the sigmoid form did not run)."""
    if y.device.type != "cpu" or y.dtype == torch.float64 or torch.compiler.is_compiling():
        return squared_norms.new_empty(0, dtype=torch.long)
    rows = y.numel() // squared_norms.numel()
    return (squared_norms < rows * SIGMOID_MIN_RMS**2).nonzero().flatten()


def _sample_gram(za: Tensor, zb: Tensor) -> Tensor:
    """Σ_i za_i zb_iᵀ [ca, cb] for za [n, ca, s], zb [n, cb, s]: per-sample products summed (torch.bmm), or, where
    those n·ca·cb products would outweigh twice the inputs (2s(ca + cb) ≤ ca·cb: s ≤ c/4 for a Gram), one product of
    the channel-major copies [c, n·s]. For a float [512, 512, 4] the batched form made 537 MB of products (and was
    several times slower in an ad hoc timing of both forms on one thread; no figure claimed)."""
    n, ca, s = za.shape
    cb = zb.shape[1]
    if s == 1:
        return za[:, :, 0].T @ zb[:, :, 0]
    if 2 * s * (ca + cb) <= ca * cb:
        return za.transpose(0, 1).reshape(ca, n * s) @ zb.transpose(0, 1).reshape(cb, n * s).T
    return torch.bmm(za, zb.mT).sum(0)


def _torch_gram(y: Tensor, layout: Layout, gamma: float) -> Tuple[Tensor, Tensor]:
    """(G = ZᵀZ in the work dtype [c, c], Z [n, c, s]) of Z = tanh(γY), Y read as [N, C, S] in place (no
    channel-last copy)."""
    n, c, s = layout
    rows = y.reshape(n, c, s).to(_work_dtype(y.dtype))
    z = _tanh(rows, gamma)
    g = _sample_gram(z, z)
    small = _inexact_columns(g.diagonal(), y)
    if small.numel():  # redo those channels exactly, and their rows and columns of G
        z[:, small] = _tanh(rows[:, small], gamma, exact=True)
        zs = z[:, small]
        cross = _sample_gram(zs, z)
        g[small] = cross
        g[:, small] = cross.T
    return g, z


def _torch_gram_backward(z: Tensor, a: Tensor, out: Tensor) -> None:
    """out (any shape of z's n·c·s elements, contiguous) = (Z A) ⊙ (1 − Z²), one matmul and an in-place pass. Sizes
    come from z itself: under torch.compile with a dynamic batch, sizes kept on ctx cannot be passed to view."""
    w = out.view(z.shape)
    with no_autocast(z.device.type):
        if z.shape[2] == 1:
            torch.mm(z[:, :, 0], a, out=w[:, :, 0])
        else:
            torch.matmul(a, z, out=w)
    torch.ops.aten.tanh_backward.grad_input(w, z, grad_input=w)  # w (1 − z²), into w: no new buffer


_CORE = None


def _cpp_core():
    """The C++ extension, imported where the C++ path first runs (the torch path works without it) and kept: an import
    statement here ran importlib's Python on every call (each forward, backward and tap hook)."""
    global _CORE
    if _CORE is None:
        from .. import _core

        _CORE = _core
    return _CORE


class _Grams(torch.autograd.Function):
    """(gamma, layouts, *ys) -> the zero-padded float64 Grams [L, KP, KP], G_ℓ = Z_ℓᵀZ_ℓ, Z = tanh(γY), every layer
    in one autograd node, by torch ops (Z saved); backward ∂R/∂Y_ℓ = (Z_ℓ A_ℓ) ⊙ (1 − Z_ℓ²) with A = γ(Ḡ + Ḡᵀ)."""

    @staticmethod
    def forward(ctx, gamma: float, layouts: Tuple[Layout, ...], *ys: Tensor) -> Tensor:
        kp = max(c for _, c, _ in layouts)
        out = ys[0].new_zeros((len(ys), kp, kp), dtype=torch.float64)
        saved = []
        for i, (y, (n, c, s)) in enumerate(zip(ys, layouts)):
            g, z = _torch_gram(y, (n, c, s), gamma)
            saved.append(z)
            out[i, :c, :c] = g
        ctx.gamma, ctx.layouts = gamma, layouts
        ctx.y_meta = [(y.shape, y.dtype) for y in ys]
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @first_order(**_DOUBLE_BACKWARD)
    def backward(ctx, grad: Tensor):
        saved = ctx.saved_tensors
        a_all = (grad + grad.mT) * ctx.gamma
        grads: List[Optional[Tensor]] = []
        for i, (z, (_, c, _), (shape, dtype)) in enumerate(zip(saved, ctx.layouts, ctx.y_meta)):
            if not ctx.needs_input_grad[2 + i]:
                grads.append(None)
                continue
            work = _work_dtype(dtype)
            dy = _grad_buffer(shape, work, z.device)
            _torch_gram_backward(z, a_all[i, :c, :c].to(work), dy)
            grads.append(dy.to(dtype))
        return (None, None, *grads)


def _grad_buffer(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """∂R/∂Y in Y's shape. On the CPU an alias of a kept buffer (fresh pages cost page faults; see workspace; not
    traceable: a lock): autograd adds it into the model's own gradient of Y in place when that one arrives first, as
    SelfOrthogonality's recorded aliases arrange, and sums out of place otherwise. Elsewhere a new tensor, returned as
    is (not a view), which autograd can also add into in place."""
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return workspace.grad_buffer(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


class _TapSlot:
    """One tapped layer output's share of a _CppPenalty backward: set by that backward (`pending`: the C++ call's source
    tensor, held while its address is used, and arguments, the upstream weight of R_ℓ among them) where the alias's hook
    will run in the same backward, then taken by the hook, which adds ∂R/∂Y into the model's own gradient of the alias
    in one C++ pass (read, add, write back) instead of autograd's separate ∂R/∂Y buffer and sum. `ran`: the hook ran
    before the penalty's backward (autograd's order otherwise: then the penalty computes ∂R/∂Y itself). The penalty's
    node keeps (slot, the alias's node) pairs; a slot holds no node (the alias's node holds the slot, as its hook: a
    reference back would be a cycle through C++ that the garbage collector cannot see). `strides`: the tap's, where
    the penalty reads Y in another axis order than its shape's (_in_memory_order: a channels_last map), whose memory
    order the gradient must then have too; None where Y is read as contiguous."""

    def __init__(self, tap: Tensor, strides: Optional[Tuple[int, ...]] = None) -> None:
        self.pending: Optional[tuple] = None
        self.ran = False
        self.strides = strides
        tap.register_hook(self)

    def __call__(self, grad: Optional[Tensor]) -> Optional[Tensor]:
        refs = sys.getrefcount(grad)  # first: where _calibrate_grad_uses's probe counts too
        self.ran = True
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if grad is None:
            raise RuntimeError(
                "SelfOrthogonality: the model's gradient of a hooked layer's output is undefined in a backward that "
                "runs through it (a consumer whose backward returns None for it, such as a custom autograd.Function), "
                "so the regularizer's gradient cannot be added there: pass taps=False to SelfOrthogonality"
            )
        _, head, tail = pending  # the source tensor held with its address, som_gram_backward_at's other arguments
        dtype = torch.float64 if head[1] else torch.float32  # taps are made for those alone
        if _own_gradient(grad, refs, dtype, self.strides):
            out = grad
        elif self.strides is None:
            out = grad.to(dtype, memory_format=torch.contiguous_format, copy=True)
        else:  # in Y's memory order, which the C++ call's layout describes
            out = torch.empty_strided(grad.shape, self.strides, dtype=dtype).copy_(grad)
        _cpp_core().som_gram_backward_at(*head, out.data_ptr(), *tail)
        return None if out is grad else out


def _kept_z(core, shape: torch.Size, n: int, c: int, s: int, dtype: torch.dtype) -> Tensor:
    """A kept buffer for the forward's Z of a Y of `shape` read as [n, c, s]: Y's shape, or [n, c, ld] where the core
    pads Z's rows (som_z_stride: rows of a multiple of 1 KiB would share a few L1 sets in the backward's tiles)."""
    ld = core.som_z_stride(s, dtype.itemsize)
    return workspace.grad_buffer(shape if ld == s else (n, c, ld), dtype)


def _backward_source(t: Tensor, gamma: float, from_z: bool, layout: Layout, a0: int, dtype: torch.dtype
                     ) -> Tuple[Tensor, tuple]:  # fmt: skip
    """(what the C++ backward reads, som_gram_backward_at's arguments before dy) for t = Y or the forward's Z (from_z:
    then of `dtype`, laid out as _kept_z's) and A₀ at address a0: the first to be held alive while the call runs, since
    the call takes addresses (no numpy view per call in the tap hooks)."""
    y = t if from_z else _flat(t, dtype)
    return y, (y.data_ptr(), dtype is torch.float64, *layout, gamma, a0)


def _flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t's values contiguous in `dtype` (float32/64), detached: t itself where it already is, else a converted copy;
    checked by attributes, not by torch ops, since this runs per layer in every training step (SelfOrthogonality's
    host time)."""
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def _will_run(node) -> bool:
    """Whether autograd runs `node` in the backward now running (False where torch cannot say)."""
    will = getattr(torch._C, "_will_engine_execute_node", None)
    return will is not None and bool(will(node))


def _check_taken(slots: Sequence[_TapSlot]) -> None:
    missed = [slot for slot in slots if slot.pending is not None]
    for slot in missed:
        slot.pending = None
    if missed:
        raise RuntimeError(
            "SelfOrthogonality: a tapped layer's gradient hook did not run in a backward that autograd said would run "
            "it, so the regularizer's gradient of that layer was not added; SelfOrthogonality(..., taps=False) "
            "avoids taps"
        )


_GRAD_USES: Optional[Tuple[int, int]] = None


def _own_gradient(grad: Tensor, refs: int, dtype: torch.dtype, strides: Optional[Tuple[int, ...]] = None) -> bool:
    """Whether a tap's hook may add into `grad` in place: contiguous (or of `strides`, where given), of `dtype`, not a
    view, and referenced (by C++ and by Python: `refs`, sys.getrefcount at the hook's start) only as any gradient
    handed to a tensor hook is, not also kept by another hook, say (_calibrate_grad_uses)."""
    laid_out = grad.is_contiguous() if strides is None else grad.stride() == strides
    return (grad.dtype == dtype and laid_out and grad._base is None and not grad.requires_grad
            and (grad._use_count(), refs) == _GRAD_USES)  # fmt: skip


class _Probe:
    def __init__(self) -> None:
        self.seen: List[Tuple[int, int]] = []

    def __call__(self, grad: Tensor) -> None:
        refs = sys.getrefcount(grad)  # first, as in _TapSlot.__call__
        self.seen.append((grad._use_count(), refs))


def _calibrate_grad_uses() -> None:
    """_GRAD_USES: (use count, Python reference count) of a gradient that a tensor hook receives and nothing else
    holds, from a small graph (once; with gradients enabled, before any backward that needs it)."""
    global _GRAD_USES
    if _GRAD_USES is None:
        probe = _Probe()
        with torch.enable_grad():
            w = torch.zeros(2, requires_grad=True)
            tap = (w * 2).view_as(w)
            tap.register_hook(probe)
            (tap * 3).sum().backward()
        _GRAD_USES = probe.seen[0]


def cpp_route_takes(y: Tensor, channel_dim: int, backend: Optional[str],
                    route: Optional[Callable[[torch.dtype], bool]] = None) -> bool:  # fmt: skip
    """Whether som_regularizer(y, channel_dim=..., backend=backend) would run y on the C++ core now (a float32 or
    float64 CPU tensor with rows ≥ channels, the C++ route chosen), outside torch.compile and saved-tensor hooks
    (non-reentrant checkpointing installs them): where SelfOrthogonality taps a layer's output. `route`: the backend
    choice for y's dtype, where the caller has it (SelfOrthogonality's, once per forward pass), else cpp_route's.
    Cheapest checks first: this runs in every hooked layer's forward hook."""
    if not y.is_cpu or y.dtype not in _CPP_DTYPES:  # is_cpu, dim(), size(d): no torch.device or torch.Size built
        return False
    ndim = y.dim()
    if ndim < 2 or not -ndim <= channel_dim < ndim:
        return False
    c = y.size(channel_dim)
    numel = y.numel()
    if numel == 0 or numel < c * c:  # rows n·s = numel / c at least c
        return False
    if torch.compiler.is_compiling() or not _no_saved_tensor_hooks():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(y):  # a torch.func transform's: som_regularizer's graph route
        return False
    return route(y.dtype) if route is not None else cpp_route(y.dtype, backend)


_CPP_DTYPES = (torch.float32, torch.float64)
_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _no_saved_tensor_hooks() -> bool:
    """False under saved-tensor hooks (non-reentrant checkpointing installs them), or where torch cannot say."""
    return _TOP_HOOKS is not None and _TOP_HOOKS(False) is None


_CPU = torch.device("cpu")
_ROUTES: dict = {}


def cpp_route(dtype: torch.dtype, backend: Optional[str]) -> bool:
    """Whether _choose sends CPU layers of `dtype` (float32/64) to the C++ core now, outside torch.compile: memoized
    on all that the choice reads for CPU tensors (the backend argument, KEXUE_FAST_BACKEND, TRITON_INTERPRET, torch's
    thread count against CPP_MAX_TORCH_THREADS), since SelfOrthogonality asks per hooked layer in every step."""
    key = (dtype, backend, os.environ.get(_dispatch.ENV_VAR), os.environ.get("TRITON_INTERPRET"),
           torch.get_num_threads(), CPP_MAX_TORCH_THREADS)  # fmt: skip
    route = _ROUTES.get(key)
    if route is None:
        route = _ROUTES[key] = _choose(_CPU, [dtype], backend)[0][dtype] == "cpp"
    return route


def taps_hold(dtypes: Sequence[torch.dtype], backend: Optional[str]) -> bool:
    """At loss(), for outputs tapped in the forward (each a float32/64 CPU tensor with rows ≥ channels: fixed facts
    that cpp_route_takes checked then): whether the C++ route still takes them now (not compiling, no saved-tensor
    hooks, the backend choice unchanged)."""
    if torch.compiler.is_compiling() or not _no_saved_tensor_hooks():
        return False
    return all(cpp_route(dt, backend) for dt in set(dtypes))


def tapped_penalty(ys: Sequence[Tensor], taps: Sequence[Tensor], channel_dim: Sequence[int], *, gamma: float,
                   lambda1: float, lambda2: float, eps: float, total: bool = False) -> Tensor:  # fmt: skip
    """R per layer [L] on the C++ core, as som_regularizer(ys, ..., reduction="none", backend="cpp"), or with total
    their sum (a 0-dim tensor, summed in float64: no sum op and node after it), for outputs Y whose layers returned an
    alias `taps[i]` to their consumers (OutputRecorder.taps): where the backward also runs through the alias, ∂R/∂Y is
    added into the model's own gradient there (_TapSlot), else returned for Y."""
    check_hyperparameters(gamma, lambda1, lambda2, eps)
    _calibrate_grad_uses()
    given = list(ys)
    ys, dims = _prepare(given, list(channel_dim))
    layouts = tuple(_layout(t, d) for t, d in zip(ys, dims))
    # a Y read in another axis order (_in_memory_order) is read in its own memory order: the tap's gradient too
    strides = [None if y is v else y.stride() for y, v in zip(given, ys)]
    slots = tuple((_TapSlot(t, st), t.grad_fn) if y.requires_grad and t.grad_fn is not None and torch.is_grad_enabled()
                  else None for y, t, st in zip(ys, taps, strides))  # fmt: skip
    gamma, lambda1, lambda2, eps = float(gamma), float(lambda1), float(lambda2), float(eps)
    # no torch op here that autocast would change (no no_autocast context: its host time), R already in its dtype
    return _CppPenalty.apply(gamma, lambda1, lambda2, eps, layouts, slots, bool(total), *ys)


_CPP_ARGS = 7  # _CppPenalty's arguments before the layer outputs


class _CppPenalty(torch.autograd.Function):
    """(gamma, lambda1, lambda2, eps, layouts, slots, total, *ys) -> R [L] (total: their sum, 0-dim) on the C++ core
    (csrc/ortho/som_gram.cpp; computed in float64, returned in the layers' result dtype: float64 if any is, else
    float32), slots: per layer None or a tap's (_TapSlot, the tap's node), whose hook then adds ∂R/∂Y where the
    backward runs through the tap; one autograd node, one C++ call forward for every layer (som_penalties_at) and one
    per layer backward (som_gram_backward_at; both by address): forward the Gram (each Y read as [N, C, S] in place,
    each sample's Z computed in cache), R and A₀ = γ(Ḡ + Ḡᵀ) at a unit upstream gradient (float64 [c, c]), and where a
    backward will need it Z itself (KEEP_Z: into a kept buffer, saved instead of Y); backward ∂R/∂Y = (Z A) ⊙ (1 − Z²)
    with A = (∂L/∂R_ℓ)·A₀ from the saved Z (KEEP_Z = False: Y saved, Z recomputed)."""

    @staticmethod
    def forward(ctx, gamma: float, lambda1: float, lambda2: float, eps: float, layouts: Tuple[Layout, ...],
                slots: Tuple[Optional[tuple], ...], total: bool, *ys: Tensor) -> Tensor:  # fmt: skip
        core = _cpp_core()
        threads = cpp_threads()
        needs = ctx.needs_input_grad[_CPP_ARGS:]
        # A₀ of every layer that a backward needs in one float64 buffer (kept alive by ctx), passed by address
        a0 = torch.empty(sum(c * c for (_, c, _), needed in zip(layouts, needs) if needed), dtype=torch.float64,
                         device="cpu")  # fmt: skip
        at, itemsize = a0.data_ptr(), a0.element_size()
        calls, a0_at, saved, from_z, inputs = [], [], [], [], []
        for y, (n, c, s), needed in zip(ys, layouts, needs):
            work = _work_dtype(y.dtype)  # half in float32, as on torch
            z = _kept_z(core, y.shape, n, c, s, work) if needed and KEEP_Z else None
            flat = _flat(y, work)  # alive through the call (`inputs`): passed by address
            calls.append((flat.data_ptr(), work is torch.float64, n, c, s, gamma, lambda1, lambda2, eps,
                          at if needed else 0, threads, 0 if z is None else z.data_ptr()))  # fmt: skip
            a0_at.append(at if needed else 0)
            at += itemsize * c * c if needed else 0
            saved.append(y if z is None else z)
            from_z.append(z is not None)
            inputs.append(flat)
        ctx.gamma, ctx.layouts, ctx.a0, ctx.a0_at, ctx.slots = gamma, layouts, a0, a0_at, slots
        ctx.dtypes, ctx.shapes, ctx.from_z = tuple(y.dtype for y in ys), tuple(y.shape for y in ys), from_z
        ctx.save_for_backward(*saved)  # Z too: autograd's check that nothing wrote into it before the backward
        # in the layers' result dtype (computed in float64): the callers' .to() is then no op and no autograd node;
        # with total, the C++ call writes the sum there itself (no sum op, no numpy)
        out = torch.empty(() if total else len(ys), dtype=_out_dtype(ys), device="cpu")
        # All of the Python side first, then every layer in one C++ call (som_penalties_at): each layer's work streams
        # its output through the caches, and Python run between two layers' calls ran from cold caches
        core.som_penalties_at(calls, out.data_ptr(), out.dtype is torch.float64, total)
        return out

    @staticmethod
    @first_order(**_DOUBLE_BACKWARD)
    def backward(ctx, grad: Tensor):
        threads = cpp_threads()
        scales = [grad.item()] * len(ctx.layouts) if grad.dim() == 0 else grad.tolist()
        grads: List[Optional[Tensor]] = []
        deferred: List[_TapSlot] = []
        for i, (t, layout, a0, tap) in enumerate(zip(ctx.saved_tensors, ctx.layouts, ctx.a0_at, ctx.slots)):
            if not ctx.needs_input_grad[_CPP_ARGS + i]:
                grads.append(None)
                continue
            work, from_z = _work_dtype(ctx.dtypes[i]), ctx.from_z[i]
            source, head = _backward_source(t, ctx.gamma, from_z, layout, a0, work)  # Y, or the forward's Z
            slot, node = tap if tap is not None else (None, None)
            if slot is not None and not slot.ran and _will_run(node):
                slot.pending = (source, head, (threads, scales[i], True, from_z))  # the tap's hook adds ∂R/∂Y
                deferred.append(slot)
                grads.append(None)
                continue
            dy = _grad_buffer(ctx.shapes[i], work, t.device)  # contiguous
            # a zero weight too (no zeros shortcut): 0·∂R/∂Y, NaN where Y has one, as on the torch path
            _cpp_core().som_gram_backward_at(*head, dy.data_ptr(), threads, scales[i], False, from_z)
            grads.append(dy.to(ctx.dtypes[i]))
        if deferred:  # at the end of this backward: each deferred ∂R/∂Y was added by its tap's hook, or loudly not
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_check_taken, deferred))
        return (*(None,) * _CPP_ARGS, *grads)


def som_regularizer(
    y: Union[Tensor, Sequence[Tensor]],
    *,
    gamma: float = 10.0,
    lambda1: float = 100.0,
    lambda2: float = 1.0,
    channel_dim: ChannelDim = 1,
    eps: float = 1e-12,
    reduction: str = "sum",
    backend: str = "auto",
) -> Tensor:
    """The SOM regularizer R = λ₁(Σ_{i≠j}Θ_ij)² + λ₂Σ_{i≠j}Θ_ij², Θ = ẐᵀẐ, Ẑ = column-normalized tanh(γY).

    y: one layer output or a list of them (grouped: the same launches for all with backend="triton"). Each is read as Y
    [b, k] with k = its size along channel_dim (an int for all, or one per layer; default 1: [b, k] outputs and NCHW
    convolutions; use -1 for channels-last outputs such as nn.Linear's on [B, T, k]) and b = the product of the other
    axes. reduction: "sum" (a scalar) or "none" (R per layer, [L]). Result float64 for float64 inputs, else float32
    (half inputs are computed in float32). backend: "auto" (the C++ core for float32/float64 CPU tensors when torch runs
    on at most CPP_MAX_TORCH_THREADS threads, on cpp_threads() threads; the Triton kernels for CUDA layers of at most
    TRITON_AUTO_MAX_CHANNELS channels; torch elsewhere), "cpp" (csrc/ortho/som_gram.cpp: tanh and the Gram's upper
    triangle in one pass over Y, Z never stored, then R and the backward's A in the same call; the backward in one more
    pass), "triton" (kernels/som.py, CUDA: one launch per group of layers sharing a row layout, tile width and block
    size, then a chunk sum and one finishing launch forward, the same per-group launches backward; Z never written),
    "torch". Inputs laid out densely in another axis order (channels_last maps, transposes) are read in place in that
    order, as rows [N·H·W, C] for a channels_last map, and get ∂R/∂Y in their own memory format; other non-contiguous
    inputs (slices, expanded tensors) are copied for the C++ and Triton kernels. Layers with fewer rows than channels
    (b < k) take the b×b form in torch on every backend; under torch.compile the C++ core gives way to the torch path
    (it is not traceable); under torch.func transforms (grad, vmap, jacrev, hessian) every backend gives way to torch
    ops alone (graph_penalty), differentiable to any order. Eager double backward (create_graph=True) through layers
    with b ≥ k raises (use torch.func there). The Triton backend saves Y for its backward (the torch path and the C++
    one, som.KEEP_Z, save Z): modifying Y in place before backward then raises autograd's in-place error (as for any op
    that saves its input); use backend="torch" or "cpp" there. On the CPU the backward's ∂R/∂Y buffers and the C++
    route's Z are kept for the next call (fresh pages cost page faults; kexue_fast.ortho.workspace: at most
    workspace.MAX_BYTES, workspace.release() frees them), and handed out again only once no alias of them is alive.
    Formula, paper and identities: kexue_fast.ortho.reference; a column with ‖tanh(γy_j)‖ < eps is scaled by 1/eps (as
    torch's F.normalize).
    """
    check_hyperparameters(gamma, lambda1, lambda2, eps)
    if reduction not in ("sum", "none"):
        raise ValueError(f'reduction must be "sum" or "none", got {reduction!r}')
    ys, dims = _prepare(y, channel_dim)
    gamma, lambda1, lambda2, eps = float(gamma), float(lambda1), float(lambda2), float(eps)
    if transformed(*ys):
        per_layer = torch.stack([graph_penalty(t, d, gamma, lambda1, lambda2, eps).to(_out_dtype(ys))
                                 for t, d in zip(ys, dims)])  # fmt: skip
        return per_layer.sum() if reduction == "sum" else per_layer
    device = ys[0].device
    layouts = [_layout(t, d) for t, d in zip(ys, dims)]
    chosen, requested = _choose(device, [t.dtype for t in ys], backend)
    with no_autocast(device.type):  # the Grams stay float32/64 under mixed precision
        per_layer = _per_layer(ys, dims, layouts, chosen, gamma, lambda1, lambda2, eps, auto=requested == "auto")
    return per_layer.sum() if reduction == "sum" else per_layer


def graph_penalty(y: Tensor, dim: int, gamma: float, lambda1: float, lambda2: float, eps: float) -> Tensor:
    """R of one layer output by torch ops alone (kexue_fast.ortho.reference.som_cheap, in the work dtype, with the
    exact tanh): what som_regularizer runs under torch.func transforms, whatever the backend; autograd and the
    transforms differentiate it to any order. O(bk·min(b, k)) like the other routes, with Ẑ [b, k] kept for autograd."""
    rows = y.movedim(dim, -1).reshape(-1, y.shape[dim]).to(_work_dtype(y.dtype))
    return reference.som_cheap(rows, gamma, lambda1, lambda2, eps).to(torch.float64 if y.dtype == torch.float64
                                                                      else torch.float32)  # fmt: skip


def _choose(device: torch.device, dtypes: Sequence[torch.dtype], backend: Optional[str]) -> Tuple[dict, str]:
    """({dtype: the backend som_regularizer runs layers of that dtype on}, the requested backend): the dispatcher's
    choice, then the C++ core given up under torch.compile (not traceable; an explicit request for it raises) and by
    `auto` while torch runs on more than CPP_MAX_TORCH_THREADS threads."""
    chosen = {dt: _dispatch.choose(OP, device, dt, backend) for dt in dict.fromkeys(dtypes)}
    requested = _dispatch.requested_backend(backend)
    if torch.compiler.is_compiling() and "cpp" in chosen.values():  # the C++ core is not traceable
        if requested == "cpp":
            raise NotImplementedError(
                "backend='cpp' (or KEXUE_FAST_BACKEND='cpp') cannot run som_regularizer under torch.compile (the C++ "
                "core is not traceable): use 'auto' or 'torch' there"
            )
        chosen = {dt: "torch" if name == "cpp" else name for dt, name in chosen.items()}
    elif requested == "auto" and not use_cpp():
        chosen = {dt: "torch" if name == "cpp" else name for dt, name in chosen.items()}
    return chosen, requested


def _per_layer(ys, dims, layouts, chosen, gamma: float, lambda1: float, lambda2: float, eps: float,
               auto: bool = False) -> Tensor:  # fmt: skip
    values: List[Optional[Tensor]] = [None] * len(ys)
    groups: dict = {}
    for i, (t, (n, c, s)) in enumerate(zip(ys, layouts)):
        if n * s < c:
            values[i] = rows_penalty(_as_rows(t, dims[i], _work_dtype(t.dtype)), gamma, lambda1, lambda2, eps)
        else:
            name = chosen[t.dtype]
            if name == "triton" and auto and c > TRITON_AUTO_MAX_CHANNELS:
                name = "torch"
            groups.setdefault((name, t.dtype), []).append(i)
    for (name, _), idx in groups.items():
        if name == "triton":
            inputs = [ys[i].contiguous() for i in idx]
            if torch.compiler.is_compiling():  # opaque custom ops for the compiler
                flat_layouts = [v for i in idx for v in layouts[i]]
                penalties = _triton_penalty(inputs, flat_layouts, gamma, lambda1, lambda2, eps)[0]
            else:
                group = tuple(layouts[i] for i in idx)
                penalties = _TritonPenalty.apply(gamma, lambda1, lambda2, eps, group, *inputs)
        elif name == "cpp":
            group = tuple(layouts[i] for i in idx)
            penalties = _CppPenalty.apply(gamma, lambda1, lambda2, eps, group, (None,) * len(idx), False,
                                          *[ys[i] for i in idx])  # fmt: skip
        else:
            grams = _Grams.apply(gamma, tuple(layouts[i] for i in idx), *[ys[i] for i in idx])
            penalties = gram_penalty(grams, [layouts[i][1] for i in idx], lambda1, lambda2, eps)
        if len(idx) == len(ys):  # one group, in order: R per layer as it comes (no per-layer select and stack)
            return penalties.to(_out_dtype(ys))
        for j, i in enumerate(idx):
            values[i] = penalties[j]
    return torch.stack([v.to(_out_dtype(ys)) for v in values])  # type: ignore[union-attr]


def _out_dtype(ys: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ys) else torch.float32
