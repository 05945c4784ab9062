"""Triton kernels for exact HSIC: the statistics pass and its recompute backward, without an n×n matrix.

Forward, for Gram matrices K_ij = k(x_i, x_j), L_ij = l(y_i, y_j), per row i (pairs j ≠ i):
    r^K_i = Σ_j K_ij,   r^L_i = Σ_j L_ij,   (K∘L)_i = Σ_j K_ij L_ij,   (K∘K)_i,   (L∘L)_i,
so that S_kl = Σ_i (K∘L)_i etc. Backward, with a = ∂out/∂S_kl, b = ∂out/∂S_kk, u = ∂out/∂r^K (and likewise for L):
    ∂out/∂x_i = Σ_{j≠i} m_ij ∂K_ij/∂x_i,   m_ij = 2a L_ij + 4b K_ij + u_i + u_j,
with ∂K_ij/∂x_i = φ_ij (x_i − x_j) (gaussian φ = −K/σ², imq −K³/σ², laplace −K/(σd), 0 at d = 0) or x_j (linear).

Schedule: one program owns BLOCK rows and sweeps every column block, so each row's sums and gradient are complete
in one program — no atomics, a deterministic result, and the partial sums per row are added by the caller in a
fixed order. (This visits each unordered pair twice; the symmetric half-schedule needs cross-program column sums.)
Tile values are float32 (distances by ‖a‖² + ‖b‖² − 2a·b from an IEEE-precision tl.dot; laplace's, whose √ needs
the digits that expansion cancels, from the differences); their products and sums, and the backward's weights, are
float64 — the rounding of torch's float32 tiles summed in float64. Kernel codes: 0 gaussian, 1 laplace, 2 imq,
3 linear, 4 delta (labels as float class indices [n, 1], compared exactly). No autograd and no dispatch here: see
kexue_fast.hsic.tiled.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

KERNEL_CODES = {"gaussian": 0, "laplace": 1, "imq": 2, "linear": 3, "delta": 4}
SUPPORTED_DTYPES = (torch.float32,)
MAX_DIM = 128  # a row block [BLOCK, D] of each input lives in registers


@triton.jit
def _differences_sq(ptr, rows, cols, n, D):
    """‖a_i − b_j‖² of the tile's rows and columns from their differences, column by column (O(D) FMAs a pair, off
    the tensor cores): laplace's √ (and its gradient's 1/d) would expose what ‖a‖² + ‖b‖² − 2a·b cancels: two equal
    rows gave d ~ 3e-4·‖a‖, k = 0.996 for 1."""
    sq = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    for c in range(0, D):
        ac = tl.load(ptr + rows * D + c, mask=rows < n, other=0.0)
        bc = tl.load(ptr + cols * D + c, mask=cols < n, other=0.0)
        diff = ac[:, None] - bc[None, :]
        sq += diff * diff
    return sq


@triton.jit
def _gram_tile(a, b, na, nb, KIND: tl.constexpr, scale, ptr, rows, cols, n, D):
    """k(a_i, b_j) for a [M, D], b [N, D] (zero-padded), squared norms na [M], nb [N] -> ([M, N] values, d² or
    a·b). scale: −1/(2σ²) gaussian, −1/σ laplace, 1/σ² imq. ptr, rows, cols, n, D: the input and the tile's row
    and column indices, from which laplace takes its distances (_differences_sq)."""
    if KIND == 4:  # labels: the one non-padding column, compared exactly
        la = tl.sum(a, axis=1)
        lb = tl.sum(b, axis=1)
        k = tl.where(la[:, None] == lb[None, :], 1.0, 0.0)
        return k, k
    if KIND == 1:
        sq = _differences_sq(ptr, rows, cols, n, D)
    else:
        dot = tl.dot(a, tl.trans(b), input_precision="ieee")
        if KIND == 3:
            return dot, dot
        sq = tl.maximum(na[:, None] + nb[None, :] - 2.0 * dot, 0.0)
    if KIND == 0:
        k = tl.exp(sq * scale)
    elif KIND == 1:
        k = tl.exp(tl.sqrt(sq) * scale)
    else:
        k = 1.0 / tl.sqrt(1.0 + sq * scale)
    return k, sq


@triton.jit
def _load_rows(ptr, rows, n, D, BD: tl.constexpr):
    cols = tl.arange(0, BD)
    z = tl.load(ptr + rows[:, None] * D + cols[None, :], mask=(rows[:, None] < n) & (cols[None, :] < D), other=0.0)
    return z, tl.sum(z * z, axis=1)


@triton.jit
def _hsic_stats_kernel(
    x_ptr, y_ptr, out_ptr, n, DX, DY, scale_x, scale_y,
    KX: tl.constexpr, KY: tl.constexpr, BLOCK: tl.constexpr, BDX: tl.constexpr, BDY: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    xi, nxi = _load_rows(x_ptr, rows, n, DX, BDX)
    yi, nyi = _load_rows(y_ptr, rows, n, DY, BDY)
    r_k = tl.zeros([BLOCK], dtype=tl.float64)
    r_l = tl.zeros([BLOCK], dtype=tl.float64)
    s_kl = tl.zeros([BLOCK], dtype=tl.float64)
    s_kk = tl.zeros([BLOCK], dtype=tl.float64)
    s_ll = tl.zeros([BLOCK], dtype=tl.float64)
    for j0 in range(0, n, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        xj, nxj = _load_rows(x_ptr, cols, n, DX, BDX)
        yj, nyj = _load_rows(y_ptr, cols, n, DY, BDY)
        k, _ = _gram_tile(xi, xj, nxi, nxj, KX, scale_x, x_ptr, rows, cols, n, DX)
        lm, _ = _gram_tile(yi, yj, nyi, nyj, KY, scale_y, y_ptr, rows, cols, n, DY)
        valid = row_ok[:, None] & (cols[None, :] < n) & (rows[:, None] != cols[None, :])
        # float32 values, float64 products and sums: the same rounding as torch's float32 tiles summed in float64
        k = tl.where(valid, k, 0.0).to(tl.float64)
        lm = tl.where(valid, lm, 0.0).to(tl.float64)
        r_k += tl.sum(k, axis=1)
        r_l += tl.sum(lm, axis=1)
        s_kl += tl.sum(k * lm, axis=1)
        s_kk += tl.sum(k * k, axis=1)
        s_ll += tl.sum(lm * lm, axis=1)
    tl.store(out_ptr + 0 * n + rows, r_k, mask=row_ok)
    tl.store(out_ptr + 1 * n + rows, r_l, mask=row_ok)
    tl.store(out_ptr + 2 * n + rows, s_kl, mask=row_ok)
    tl.store(out_ptr + 3 * n + rows, s_kk, mask=row_ok)
    tl.store(out_ptr + 4 * n + rows, s_ll, mask=row_ok)


@triton.jit
def _side_weights(own, other, d2, ui, uj, valid, a, b, KIND: tl.constexpr, inv_s2, inv_s):
    """w_ij = m_ij φ_ij (radial) or m_ij (linear) for one side's tile `own` with the other side's tile `other`."""
    m = 2.0 * a * other + 4.0 * b * own + ui[:, None] + uj[None, :]
    if KIND == 0:
        w = -m * own * inv_s2
    elif KIND == 2:
        w = -m * own * own * own * inv_s2
    elif KIND == 1:
        d = tl.sqrt(d2)
        w = tl.where(d > 0, -m * own * inv_s / tl.maximum(d, 1e-30), 0.0)
    else:
        w = m
    return tl.where(valid, w, 0.0)


@triton.jit
def _hsic_grad_kernel(
    x_ptr, y_ptr, uk_ptr, ul_ptr, coef_ptr, gx_ptr, gy_ptr, n, DX, DY, scale_x, scale_y,
    KX: tl.constexpr, KY: tl.constexpr, NEED_X: tl.constexpr, NEED_Y: tl.constexpr,
    BLOCK: tl.constexpr, BDX: tl.constexpr, BDY: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    # float64 coefficients (a, b_k, b_l, 1/σ_x², 1/σ_x, 1/σ_y², 1/σ_y), read on the device
    a = tl.load(coef_ptr)
    b_k = tl.load(coef_ptr + 1)
    b_l = tl.load(coef_ptr + 2)
    inv_s2_x = tl.load(coef_ptr + 3)
    inv_s_x = tl.load(coef_ptr + 4)
    inv_s2_y = tl.load(coef_ptr + 5)
    inv_s_y = tl.load(coef_ptr + 6)
    xi, nxi = _load_rows(x_ptr, rows, n, DX, BDX)
    yi, nyi = _load_rows(y_ptr, rows, n, DY, BDY)
    uki = tl.load(uk_ptr + rows, mask=row_ok, other=0.0)
    uli = tl.load(ul_ptr + rows, mask=row_ok, other=0.0)
    xi64 = xi.to(tl.float64)
    yi64 = yi.to(tl.float64)
    gx = tl.zeros([BLOCK, BDX], dtype=tl.float64)
    gy = tl.zeros([BLOCK, BDY], dtype=tl.float64)
    for j0 in range(0, n, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        xj, nxj = _load_rows(x_ptr, cols, n, DX, BDX)
        yj, nyj = _load_rows(y_ptr, cols, n, DY, BDY)
        k, dk = _gram_tile(xi, xj, nxi, nxj, KX, scale_x, x_ptr, rows, cols, n, DX)
        lm, dl = _gram_tile(yi, yj, nyi, nyj, KY, scale_y, y_ptr, rows, cols, n, DY)
        valid = row_ok[:, None] & (cols[None, :] < n) & (rows[:, None] != cols[None, :])
        # float32 tile values; weights and their products with the inputs in float64 (as the torch backward)
        k = tl.where(valid, k, 0.0).to(tl.float64)
        lm = tl.where(valid, lm, 0.0).to(tl.float64)
        if NEED_X:
            ukj = tl.load(uk_ptr + cols, mask=cols < n, other=0.0)
            w = _side_weights(k, lm, dk.to(tl.float64), uki, ukj, valid, a, b_k, KX, inv_s2_x, inv_s_x)
            part = tl.dot(w, xj.to(tl.float64))
            if KX != 3:  # Σ_j w_ij (x_i − x_j)
                part = xi64 * tl.sum(w, axis=1)[:, None] - part
            gx += part
        if NEED_Y:
            ulj = tl.load(ul_ptr + cols, mask=cols < n, other=0.0)
            w = _side_weights(lm, k, dl.to(tl.float64), uli, ulj, valid, a, b_l, KY, inv_s2_y, inv_s_y)
            part = tl.dot(w, yj.to(tl.float64))
            if KY != 3:
                part = yi64 * tl.sum(w, axis=1)[:, None] - part
            gy += part
    if NEED_X:
        cx = tl.arange(0, BDX)
        tl.store(gx_ptr + rows[:, None] * DX + cx[None, :], gx, mask=row_ok[:, None] & (cx[None, :] < DX))
    if NEED_Y:
        cy = tl.arange(0, BDY)
        tl.store(gy_ptr + rows[:, None] * DY + cy[None, :], gy, mask=row_ok[:, None] & (cy[None, :] < DY))


def _scales(kind: str, sigma: Optional[float]) -> Tuple[float, float, float]:
    """(tile scale, 1/σ², 1/σ) for one kernel."""
    if kind in ("linear", "delta"):
        return 0.0, 0.0, 0.0
    s = float(sigma)
    scale = {"gaussian": -0.5 / (s * s), "laplace": -1.0 / s, "imq": 1.0 / (s * s)}[kind]
    return scale, 1.0 / (s * s), 1.0 / s


def _check(x: Tensor, y: Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the HSIC Triton kernels support float32 inputs, got {name} of dtype {t.dtype}")
        if t.ndim != 2 or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{name} must be a contiguous [n, d] tensor on {x.device}")
        if t.shape[1] > MAX_DIM:
            raise ValueError(f"the HSIC Triton kernels keep rows of width d <= {MAX_DIM} in registers, got {name} "
                             f"with d={t.shape[1]}")  # fmt: skip
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")


def _config(n: int, dx: int, dy: int) -> Tuple[int, int, int]:
    bdx, bdy = max(16, triton.next_power_of_2(dx)), max(16, triton.next_power_of_2(dy))
    return (64 if max(bdx, bdy) <= 64 else 32), bdx, bdy


def hsic_row_stats(x: Tensor, y: Tensor, kind_x: str, sigma_x: Optional[float], kind_y: str,
                   sigma_y: Optional[float]) -> Tensor:  # fmt: skip
    """[5, n] float64: per row i the off-diagonal sums r^K, r^L, Σ_j K∘L, Σ_j K∘K, Σ_j L∘L. x: [n, dx], y: [n, dy]
    float32 contiguous (delta: float class indices [n, 1])."""
    _check(x, y)
    n = x.shape[0]
    out = torch.empty((5, n), dtype=torch.float64, device=x.device)
    block, bdx, bdy = _config(n, x.shape[1], y.shape[1])
    _hsic_stats_kernel[(triton.cdiv(n, block),)](
        x, y, out, n, x.shape[1], y.shape[1], _scales(kind_x, sigma_x)[0], _scales(kind_y, sigma_y)[0],
        KX=KERNEL_CODES[kind_x], KY=KERNEL_CODES[kind_y], BLOCK=block, BDX=bdx, BDY=bdy,
    )  # fmt: skip
    return out


def hsic_grads(x: Tensor, y: Tensor, kind_x: str, sigma_x: Optional[float], kind_y: str, sigma_y: Optional[float],
               a: float, b_k: float, b_l: float, u_k: Tensor, u_l: Tensor, need_x: bool = True,
               need_y: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """(∂out/∂x, ∂out/∂y) float64 (None where not needed; no gradient for delta labels) from the coefficients
    a, b_k, b_l and u_k, u_l [n]; the diagonal terms of linear kernels are left to the caller."""
    _check(x, y)
    n = x.shape[0]
    need_x = need_x and kind_x != "delta"
    need_y = need_y and kind_y != "delta"
    gx = torch.empty(x.shape, dtype=torch.float64, device=x.device) if need_x else None
    gy = torch.empty(y.shape, dtype=torch.float64, device=x.device) if need_y else None
    sx, sy = _scales(kind_x, sigma_x), _scales(kind_y, sigma_y)
    block, bdx, bdy = _config(n, x.shape[1], y.shape[1])
    u_k = u_k.to(device=x.device, dtype=torch.float64).contiguous()
    u_l = u_l.to(device=x.device, dtype=torch.float64).contiguous()
    coef = torch.tensor([a, b_k, b_l, sx[1], sx[2], sy[1], sy[2]], dtype=torch.float64, device=x.device)
    dummy = torch.empty(1, dtype=torch.float64, device=x.device)  # never written: NEED_X/NEED_Y are constexpr
    _hsic_grad_kernel[(triton.cdiv(n, block),)](
        x, y, u_k, u_l, coef, gx if need_x else dummy, gy if need_y else dummy, n, x.shape[1], y.shape[1],
        sx[0], sy[0],
        KX=KERNEL_CODES[kind_x], KY=KERNEL_CODES[kind_y], NEED_X=need_x, NEED_Y=need_y,
        BLOCK=block, BDX=bdx, BDY=bdy,
    )  # fmt: skip
    return gx, gy
