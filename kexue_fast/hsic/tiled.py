"""Exact HSIC statistics in one streaming pass over upper-triangle tiles of the Gram matrices (O(n·d) memory).

The pass accumulates, in float64:  S_kl = Σ_{i≠j} K_ij L_ij,  S_kk = Σ_{i≠j} K_ij²,  S_ll = Σ_{i≠j} L_ij²,  the
off-diagonal row sums r^K_i = Σ_{j≠i} K_ij, r^L_i, and the diagonals K_ii, L_ii; every estimator is then O(n)
algebra on these (kexue_fast.hsic.estimators). Backward recomputes the tiles (flash-attention style): with
a = ∂out/∂S_kl, b = ∂out/∂S_kk, c = ∂out/∂S_ll, u = ∂out/∂r^K (from autograd on the O(n) algebra),
    ∂out/∂K_ij = a L_ij + 2b K_ij + u_i   (i ≠ j, entries counted in both orders),
and ∂K_ij/∂x_i is the kernel's derivative; the saved state is the inputs and O(n) vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._autograd import first_order

_DOUBLE_BACKWARD = {
    "op": "hsic / cka / bottleneck_loss (tiles of a non-linear kernel, or of a linear one with d > n)",
    "instead": "kexue_fast.hsic.reference's n × n forms (gram, hsic_biased, hsic_unbiased) support it",
}  # first_order's message

TILE = 512


@dataclass(frozen=True)
class KernelSpec:
    """A kernel and its bandwidth σ (None for linear / delta)."""

    name: str
    sigma: Optional[float] = None


def kernel_tile(a: Tensor, b: Tensor, spec: KernelSpec) -> Tensor:
    """k(a_i, b_j) for a [..., p, d], b [..., q, d] -> [..., p, q] (delta: integer labels [..., p], [..., q])."""
    if spec.name == "delta":
        return (a[..., :, None] == b[..., None, :]).to(torch.float64)
    if spec.name == "linear":
        return a @ b.transpose(-1, -2)
    s = spec.sigma
    if spec.name == "laplace":  # √ of the expansion below turns its cancellation into d ~ 3e-4·‖a‖ for duplicates
        return torch.exp(-differences_distance(a, b) / s)
    sq = (a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :] - 2 * (a @ b.transpose(-1, -2))
    sq = sq.clamp_min(0)
    if spec.name == "gaussian":
        return torch.exp(sq * (-0.5 / (s * s)))
    if spec.name == "imq":
        return torch.rsqrt(1 + sq / (s * s))
    raise ValueError(f"unknown kernel {spec.name!r}")


def differences_distance(a: Tensor, b: Tensor) -> Tensor:
    """‖a_i − b_j‖ [..., p, q] from the differences (exact 0 for equal rows, no cancellation for near ones), not from
    ‖a‖² + ‖b‖² − 2a·b: laplace's kernel takes its square root and its gradient divides by it."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def kernel_diagonal(x: Tensor, spec: KernelSpec) -> Tensor:
    if spec.name == "linear":
        return (x * x).sum(1)
    return torch.ones(x.shape[0], dtype=x.dtype if x.is_floating_point() else torch.float64, device=x.device)


def _radial_weight(a: Tensor, b: Tensor, k: Tensor, spec: KernelSpec) -> Tensor:
    """φ_ij with ∂k(a_i, b_j)/∂a_i = φ_ij (a_i − b_j) for the radial kernels."""
    s = spec.sigma
    if spec.name == "gaussian":
        return -k / (s * s)
    if spec.name == "imq":
        return -(k**3) / (s * s)
    # laplace: ∂ exp(−d/σ)/∂a = −k/(σ d)·(a − b); 0 at d = 0 (a subgradient); d from the differences (the expansion
    # lost pairs 1e-7 apart at scale 8 even in float64: tests/test_hsic.py::test_laplace_gradient_of_coincident_pairs)
    d = differences_distance(a, b)
    return torch.where(d > 0, -k / (s * d.clamp_min(torch.finfo(d.dtype).tiny)), torch.zeros_like(k))


def _blocks(n: int, tile: int):
    starts = list(range(0, n, tile))
    for bi, i0 in enumerate(starts):
        for j0 in starts[bi:]:
            yield i0, min(i0 + tile, n), j0, min(j0 + tile, n)


@torch.no_grad()
def streaming_stats(x: Tensor, y: Tensor, kx: KernelSpec, ky: KernelSpec, tile: int = TILE):
    """(S_kl, S_kk, S_ll, r^K [n], r^L [n], diag K [n], diag L [n]), float64, by upper-triangle tiles."""
    n = x.shape[0]
    f64 = dict(dtype=torch.float64, device=x.device)
    s_kl = torch.zeros((), **f64)
    s_kk = torch.zeros((), **f64)
    s_ll = torch.zeros((), **f64)
    rk = torch.zeros(n, **f64)
    rl = torch.zeros(n, **f64)
    for i0, i1, j0, j1 in _blocks(n, tile):
        k = kernel_tile(x[i0:i1], x[j0:j1], kx).to(torch.float64)
        lm = kernel_tile(y[i0:i1], y[j0:j1], ky).to(torch.float64)
        if i0 == j0:  # diagonal block: drop i == j
            k = k.clone()
            lm = lm.clone()
            k.fill_diagonal_(0)
            lm.fill_diagonal_(0)
            weight = 1.0
        else:  # off-diagonal block stands for itself and its transpose
            weight = 2.0
            rk[j0:j1] += k.sum(0)
            rl[j0:j1] += lm.sum(0)
        rk[i0:i1] += k.sum(1)
        rl[i0:i1] += lm.sum(1)
        s_kl += weight * (k * lm).sum()
        s_kk += weight * (k * k).sum()
        s_ll += weight * (lm * lm).sum()
    return s_kl, s_kk, s_ll, rk, rl, kernel_diagonal(x, kx).double(), kernel_diagonal(y, ky).double()


_KERNEL_CODES = {"gaussian": 0, "laplace": 1, "imq": 2, "linear": 3, "delta": 4}


def _cpp_arrays(x: Tensor, y: Tensor, kx: KernelSpec, ky: KernelSpec):
    """x, y as C-contiguous NumPy arrays for the C++ core: float32 when every floating input is float32 (kernel values
    then computed in float32, as the torch tiles are), else float64; labels of a delta kernel as their class index,
    exact in either."""
    floats = [t.dtype for t in (x, y) if t.is_floating_point()]
    dtype = torch.float32 if floats and all(d == torch.float32 for d in floats) else torch.float64

    def as_array(t: Tensor, spec: KernelSpec):
        t = t.detach()
        if spec.name == "delta":
            t = torch.unique(t, return_inverse=True)[1]
        t = t.to(dtype)
        return (t[:, None] if t.ndim == 1 else t).contiguous().cpu().numpy()

    return as_array(x, kx), as_array(y, ky)


@torch.no_grad()
def cpp_stats(x: Tensor, y: Tensor, kx: KernelSpec, ky: KernelSpec):
    """The same statistics from the C++ core (csrc/hsic): pairs i < j by row blocks, threads with a deterministic
    reduction, sums in float64."""
    from .. import _core

    s_kl, s_kk, s_ll, rk, rl = _core.hsic_stats(
        *_cpp_arrays(x, y, kx, ky),
        _KERNEL_CODES[kx.name],
        kx.sigma or 0.0,
        _KERNEL_CODES[ky.name],
        ky.sigma or 0.0,
        n_threads=torch.get_num_threads(),
    )
    f64 = dict(dtype=torch.float64, device=x.device)
    return (torch.tensor(s_kl, **f64), torch.tensor(s_kk, **f64), torch.tensor(s_ll, **f64),
            torch.from_numpy(rk).to(x.device), torch.from_numpy(rl).to(x.device),
            kernel_diagonal(x, kx).double(), kernel_diagonal(y, ky).double())  # fmt: skip


@torch.no_grad()
def cpp_grads(x: Tensor, y: Tensor, kx: KernelSpec, ky: KernelSpec, coefficients, need_x: bool, need_y: bool):
    """(∂out/∂x, ∂out/∂y) from the C++ backward (the Gram rows recomputed; float64), None where not needed.
    coefficients: (a, b_k, b_l, u_k, u_l, diag_k, diag_l) = ∂out/∂(S_kl, S_kk, S_ll, r^K, r^L, diag K, diag L)."""
    from .. import _core

    a, b_k, b_l, u_k, u_l, g_dk, g_dl = coefficients
    gx, gy = _core.hsic_grad(
        *_cpp_arrays(x, y, kx, ky), _KERNEL_CODES[kx.name], kx.sigma or 0.0, _KERNEL_CODES[ky.name], ky.sigma or 0.0,
        float(a), float(b_k), float(b_l), u_k.detach().cpu().numpy(), u_l.detach().cpu().numpy(),
        need_x=need_x, need_y=need_y, n_threads=torch.get_num_threads(),
    )  # fmt: skip
    return _finish_grads((gx, gy), (x, y), (kx, ky), (g_dk, g_dl))


def _triton_inputs(x: Tensor, y: Tensor, kx: KernelSpec, ky: KernelSpec):
    """x, y as contiguous float32 [n, d] for the Triton kernels: gaussian and imq inputs centered first (the kernels
    are translation invariant, and smaller norms mean less cancellation in ‖a‖² + ‖b‖² − 2a·b; laplace's distances
    come from differences, which centering in float32 would only round), labels as float class indices."""

    def prepare(t: Tensor, spec: KernelSpec):
        t = t.detach()
        if spec.name == "delta":
            t = torch.unique(t, return_inverse=True)[1]
        t = t.to(torch.float32)
        t = t[:, None] if t.ndim == 1 else t
        if spec.name in ("gaussian", "imq"):
            t = t - t.mean(0)
        return t.contiguous()

    return prepare(x, kx), prepare(y, ky)


@torch.no_grad()
def triton_stats(x: Tensor, y: Tensor, kx: KernelSpec, ky: KernelSpec):
    """The statistics from the Triton kernel (kernels/hsic.py): float32 tiles, float64 sums, per-row partials added
    here in a fixed order."""
    from ..kernels import hsic as kernels

    rows = kernels.hsic_row_stats(*_triton_inputs(x, y, kx, ky), kx.name, kx.sigma, ky.name, ky.sigma)
    r_k, r_l, s_kl, s_kk, s_ll = rows
    return (s_kl.sum(), s_kk.sum(), s_ll.sum(), r_k, r_l, kernel_diagonal(x, kx).double(),
            kernel_diagonal(y, ky).double())  # fmt: skip


@torch.no_grad()
def triton_grads(x: Tensor, y: Tensor, kx: KernelSpec, ky: KernelSpec, coefficients, need_x: bool, need_y: bool):
    """cpp_grads' counterpart on the Triton backward kernel."""
    from ..kernels import hsic as kernels

    a, b_k, b_l, u_k, u_l, g_dk, g_dl = coefficients
    gx, gy = kernels.hsic_grads(*_triton_inputs(x, y, kx, ky), kx.name, kx.sigma, ky.name, ky.sigma, float(a),
                                float(b_k), float(b_l), u_k, u_l, need_x, need_y)  # fmt: skip
    return _finish_grads((gx, gy), (x, y), (kx, ky), (g_dk, g_dl))


def _finish_grads(grads, inputs, specs, diag_grads):
    """Shape each side's gradient like its input and add the diagonal term of a linear kernel (∂K_ii/∂z_i = 2z_i)."""
    out = []
    for g, z, spec, g_diag in zip(grads, inputs, specs, diag_grads):
        if g is None:
            out.append(None)
            continue
        g = torch.as_tensor(g).to(z.device)
        if z.ndim == 1:
            g = g[:, 0]
        if spec.name == "linear":
            g = g + 2 * g_diag.reshape(-1, *([1] * (z.ndim - 1))) * z.double()
        out.append(g)
    return tuple(out)


def stats_for(backend: str, x: Tensor, y: Tensor, kx: KernelSpec, ky: KernelSpec, tile: int = TILE):
    """The statistics pass on the chosen backend ("triton", "cpp" or "torch")."""
    if backend == "triton":
        return triton_stats(x, y, kx, ky)
    return cpp_stats(x, y, kx, ky) if backend == "cpp" else streaming_stats(x, y, kx, ky, tile)


def _grad_side(z: Tensor, other: Tensor, spec: KernelSpec, other_spec: KernelSpec, a: Tensor, b: Tensor,
               u: Tensor, grad_diag: Tensor, tile: int) -> Tensor:  # fmt: skip
    """∂out/∂z for one input z (the other enters only through its tiles)."""
    n = z.shape[0]
    zd = z.to(torch.float64)
    grad = torch.zeros_like(zd)
    for i0, i1, j0, j1 in _blocks(n, tile):
        k = kernel_tile(z[i0:i1], z[j0:j1], spec).to(torch.float64)
        lm = kernel_tile(other[i0:i1], other[j0:j1], other_spec).to(torch.float64)
        # G_ij + G_ji for symmetric K, L: 2a L_ij + 4b K_ij + u_i + u_j
        m = 2 * a * lm + 4 * b * k + u[i0:i1, None] + u[None, j0:j1]
        if i0 == j0:
            m = m.clone()
            m.fill_diagonal_(0)
        zi, zj = zd[i0:i1], zd[j0:j1]
        if spec.name == "linear":
            grad[i0:i1] += m @ zj
            if i0 != j0:
                grad[j0:j1] += m.T @ zi
            continue
        w = m * _radial_weight(zi, zj, k, spec)
        grad[i0:i1] += w.sum(1)[:, None] * zi - w @ zj
        if i0 != j0:
            grad[j0:j1] += w.sum(0)[:, None] * zj - w.T @ zi
    if spec.name == "linear":
        grad += 2 * grad_diag[:, None] * zd
    return grad


class StreamingHSIC(torch.autograd.Function):
    """out = estimator(stats(x, y)); backward recomputes tiles (in C++, Triton or torch, as the forward's backend).
    `estimator` maps the stats to a scalar."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, kx: KernelSpec, ky: KernelSpec, estimator, tile: int, backend: str):
        stats = stats_for(backend, x, y, kx, ky, tile)
        ctx.save_for_backward(x, y, *stats)
        ctx.kx, ctx.ky, ctx.estimator, ctx.tile, ctx.backend = kx, ky, estimator, tile, backend
        out_dtype = x.dtype if x.is_floating_point() else (y.dtype if y.is_floating_point() else torch.float64)
        return estimator(*stats).to(out_dtype)  # label vectors on both sides: float64, not the labels' int dtype

    @staticmethod
    @first_order(**_DOUBLE_BACKWARD)
    def backward(ctx, grad_out: Tensor):
        x, y, *stats = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [s.detach().requires_grad_() for s in stats]
            out = ctx.estimator(*leaves)
            grads = torch.autograd.grad(out, leaves, grad_out.to(torch.float64), allow_unused=True)
        g_kl, g_kk, g_ll, g_rk, g_rl, g_dk, g_dl = (
            torch.zeros_like(s) if g is None else g for g, s in zip(grads, stats)
        )
        gx = gy = None
        # laplace's ∂K/∂x carries 1/d, which amplifies any error of d for near pairs (a 1e-3 pair at scale 8: the
        # gradient ~100% off from the Triton tiles' float32 d), so its backward runs the torch tiles, which take d
        # from the differences in float64 (differences_distance)
        laplace = "laplace" in (ctx.kx.name, ctx.ky.name)
        if ctx.backend == "cpp" or (ctx.backend == "triton" and not laplace):
            native = cpp_grads if ctx.backend == "cpp" else triton_grads
            gx, gy = native(x, y, ctx.kx, ctx.ky, (g_kl, g_kk, g_ll, g_rk, g_rl, g_dk, g_dl),
                            ctx.needs_input_grad[0], ctx.needs_input_grad[1])  # fmt: skip
            return (None if gx is None else gx.to(x.dtype), None if gy is None else gy.to(y.dtype),
                    None, None, None, None, None)  # fmt: skip
        if ctx.needs_input_grad[0]:
            gx = _grad_side(x, y, ctx.kx, ctx.ky, g_kl, g_kk, g_rk, g_dk, ctx.tile).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gy = _grad_side(y, x, ctx.ky, ctx.kx, g_kl, g_ll, g_rl, g_dl, ctx.tile).to(y.dtype)
        return gx, gy, None, None, None, None, None
