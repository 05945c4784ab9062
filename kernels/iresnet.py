"""Triton kernel for the dense residual branch of an invertible block, fused:

    h = (x W₁ᵀ)·t₁ + b₁,   a = φ(h),   y = x + (a W₂ᵀ)·t₂ + b₂,   d = φ'(h)

with t_i = 1 / max(1, σ̂_i / c) the spectral-norm scales applied in the GEMM epilogues (W/σ is never materialized)
and d, the activation derivatives, written for the log-det series: every vector–Jacobian product wᵀJ =
((w W₂)·t₂ ⊙ d) W₁·t₁ reuses them instead of re-running the forward. One program owns BLOCK_B rows and loops over
the hidden width in BLOCK_H chunks, so h never leaves registers. φ: 0 = LipSwish(β), 1 = ELU(α), 2 = tanh.

No autograd and no dispatch here: see kexue_fast.flows.fused.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ACTIVATIONS = {"lipswish": 0, "elu": 1, "tanh": 2}
SUPPORTED_DTYPES = (torch.float32,)


@triton.jit
def _dense_residual_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, scale_ptr, param_ptr, y_ptr, a_ptr, d_ptr,
    B, D, H,
    ACT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # int64: rows·H reaches 2³¹ at B·H = 2³¹
    cols_d = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    d_ok = cols_d < D
    x = tl.load(x_ptr + rows[:, None] * D + cols_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    t1 = tl.load(scale_ptr)
    t2 = tl.load(scale_ptr + 1)
    param = tl.load(param_ptr)  # β of LipSwish or α of ELU, read on the device: no host sync
    out = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = cols_h < H
        w1 = tl.load(w1_ptr + cols_h[:, None] * D + cols_d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        b1 = tl.load(b1_ptr + cols_h, mask=h_ok, other=0.0)
        h = tl.dot(x, tl.trans(w1), input_precision="ieee") * t1 + b1[None, :]
        if ACT == 0:
            s = tl.sigmoid(param * h)
            hs = h * s
            a = hs / 1.1
            d = (s + param * (hs - hs * s)) / 1.1
        elif ACT == 1:
            neg = param * (tl.exp(tl.minimum(h, 0.0)) - 1.0)
            a = tl.where(h > 0, h, neg)
            d = tl.where(h > 0, 1.0, neg + param)
        else:
            e = tl.exp(-2.0 * tl.abs(h))
            t = (1.0 - e) / (1.0 + e)
            a = tl.where(h >= 0, t, -t)
            d = 1.0 - a * a
        a = tl.where(h_ok[None, :], a, 0.0)
        store_mask = row_ok[:, None] & h_ok[None, :]
        tl.store(a_ptr + rows[:, None] * H + cols_h[None, :], a, mask=store_mask)
        tl.store(d_ptr + rows[:, None] * H + cols_h[None, :], d, mask=store_mask)
        w2 = tl.load(w2_ptr + cols_d[:, None] * H + cols_h[None, :], mask=d_ok[:, None] & h_ok[None, :], other=0.0)
        out += tl.dot(a, tl.trans(w2), input_precision="ieee")
    b2 = tl.load(b2_ptr + cols_d, mask=d_ok, other=0.0)
    y = x + out * t2 + b2[None, :]
    tl.store(y_ptr + rows[:, None] * D + cols_d[None, :], y, mask=row_ok[:, None] & d_ok[None, :])


def dense_residual_forward(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, scales: Tensor, activation: str, param: Tensor
):
    """(y [B, D], a = φ(h) [B, H], d = φ'(h) [B, H]) for raw weights w1 [H, D], w2 [D, H], scales [2] = (t₁, t₂)
    and param [1] (LipSwish β or ELU α; ignored by tanh).

    All contiguous float32 on one device; D ≤ 128 (the D-wide tiles of x and y live in registers)."""
    for name, t in (("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("scales", scales), ("param", param)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the fused dense residual kernel supports float32, got {name} of dtype {t.dtype}")
        if not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{name} must be contiguous and on {x.device}")
    batch, dim = x.shape
    hidden = w1.shape[0]
    if w1.shape != (hidden, dim) or w2.shape != (dim, hidden) or b1.shape != (hidden,) or b2.shape != (dim,):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if dim > 128:
        raise ValueError(f"the fused dense residual kernel keeps rows of width D <= 128 in registers, got D={dim}")
    y = torch.empty_like(x)
    a = torch.empty((batch, hidden), dtype=x.dtype, device=x.device)
    d = torch.empty_like(a)
    block_d = max(16, triton.next_power_of_2(dim))
    block_b = 32 if block_d <= 64 else 16
    grid = (triton.cdiv(batch, block_b),)
    _dense_residual_fwd_kernel[grid](
        x, w1, b1, w2, b2, scales, param, y, a, d, batch, dim, hidden,
        ACT=ACTIVATIONS[activation], BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_H=32,
    )  # fmt: skip
    return y, a, d
