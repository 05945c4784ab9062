"""Triton kernels for the Self-Orthogonality regularizer, grouped over every hooked layer, never writing Z or Ẑ.

Each layer output is read in place as a contiguous [N, C, S] array: row r = (n, s) of the b = N·S rows, channel
c < k = C (S = 1 for a [b, k] output, S = H·W for an NCHW convolution's). Rows are taken in blocks of BR that coalesce,
by one of three modes fixed per launch (a compile-time constant): DENSE (S == 1), BR samples, contiguous along
channels; SPATIAL (S >= 16), BR consecutive positions of one sample (a block never straddles two samples), handled
as transposed [channels, positions] tiles, contiguous along their last axis; STRIDED (1 < S < 16), BR consecutive
rows, contiguous along neither. Z = tanh(γY) lives only in registers, recomputed wherever it is needed. Layers are
launched in groups of one mode and one tile width: a layer that fits one tile is computed at its own width (16 to
64), the others at the widest layer's, BC.

Forward, `_som_gram_kernel`:  G = ZᵀZ [k, k]. Programs are (layer, tile pair ti ≤ tj, chunk of row blocks) from a
work table; a diagonal tile loads and tanh's each element once. Each program writes its partial tile to its own
BC×BC slot (zero-padded when narrower), and the caller adds the chunks in float64 in a fixed order (deterministic: no
atomics). Then `_som_finish_kernel`, one program per layer in float64: the column normalization is exact algebra on
G (Θ = D⁻¹GD⁻¹, D = diag(max(√G_ii, eps))), giving R and the backward's A = Ḡ + Ḡᵀ (Ḡ = ∂R/∂G at a unit upstream
gradient).
Backward, `_som_grad_kernel`:  ∂R/∂Y = γ(1 − Z²) ⊙ (Z A), A scaled per layer by ∂L/∂R read on the device;
programs are (layer, row block, column block), decoded from the program id by each layer's first program (no
per-block table: building one cost O(b) host work per call). Z's block is loaded once when every layer of the launch
fits one tile, else recomputed for the K loop and for the epilogue.

tanh is built from exp (libdevice is unavailable in the interpreter): an odd Taylor polynomial for |x| < 0.3 (11
terms, ≤ 1 ulp in float64) and (1 − e^{−2|x|})/(1 + e^{−2|x|}) above. No autograd and no dispatch here: see
kexue_fast.ortho.som.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _launch

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}  # fmt: skip
SUPPORTED_DTYPES = tuple(_TL_DTYPES)
Layout = Tuple[int, int, int]  # (N, C, S)
# how a layer's rows are blocked (see _block): S == 1, S >= 16 (a block within one sample), 1 < S < 16
DENSE: tl.constexpr = tl.constexpr(0)
SPATIAL: tl.constexpr = tl.constexpr(1)
STRIDED: tl.constexpr = tl.constexpr(2)


@triton.jit
def _tanh(x, ACC: tl.constexpr):
    a = tl.abs(x)
    x2 = a * a
    # tanh(a) = a Σ_n c_n a^{2n}, c_n = 2^{2n+2}(2^{2n+2} − 1) B_{2n+2} / (2n+2)!, on |a| < 0.3: 11 terms reach a
    # float64 ulp; float32 needs 6 (the 7th term is below 2e-9 relative there)
    if ACC == tl.float64:
        p = x2 * 9.691537956929451e-05 - 0.00023912911424355248
        p = p * x2 + 0.000590027440945586
        p = p * x2 - 0.0014558343870513183
        p = p * x2 + 0.003592128036572481
        p = p * x2 - 0.008863235529902197
    else:
        p = tl.full(x2.shape, -0.008863235529902197, x2.dtype)
    p = p * x2 + 0.021869488536155203
    p = p * x2 - 0.05396825396825397
    p = p * x2 + 0.13333333333333333
    p = p * x2 - 0.3333333333333333
    p = p * x2 + 1.0
    t = tl.exp(-2.0 * a)
    r = tl.where(a < 0.3, a * p, (1.0 - t) / (1.0 + t))
    return tl.where(x < 0, -r, r)


@triton.jit
def _row_blocks(N, S, BR: tl.constexpr, MODE: tl.constexpr):
    """Row blocks of a layer: BR positions of one sample in SPATIAL mode (see _spatial_block), else BR rows."""
    if MODE == SPATIAL:
        return N * tl.cdiv(S, BR)
    else:
        return tl.cdiv(N * S, BR)


@triton.jit
def _dense_block(q, cols, N, C, BR: tl.constexpr):
    """Offsets and mask of row block q of a [N, C] layer (S == 1): BR samples, contiguous along channels."""
    rows = q * BR + tl.arange(0, BR)  # int64: N, C and S come from an int64 table
    return rows[:, None] * C + cols[None, :], (rows[:, None] < N) & (cols[None, :] < C)


@triton.jit
def _spatial_block_t(q, cols, N, C, S, BR: tl.constexpr):
    """Offsets and mask of row block q of an [N, C, S] layer (S >= 16), TRANSPOSED: [BC channels, BR positions],
    the positions BR consecutive s of one sample n (blocks never straddle samples). Each channel's run is contiguous
    along the last axis, the layout Triton loads, stores and feeds to dots best."""
    nsb = tl.cdiv(S, BR)
    n = q // nsb
    s = (q - n * nsb) * BR + tl.arange(0, BR)
    offs = cols[:, None] * S + (n * C * S + s)[None, :]
    inside = (s < S) & (s * 0 + n < N)  # n < N as a block (the interpreter refuses a scalar's in masks)
    return offs, (cols[:, None] < C) & inside[None, :]


@triton.jit
def _load_zt(y, q, cols, N, C, S, gamma, ACC: tl.constexpr, BR: tl.constexpr):
    """tanh(γY)ᵀ on row block q and channels cols of a SPATIAL layer: [BC, BR] as ACC, zero outside the layer."""
    offs, mask = _spatial_block_t(q, cols, N, C, S, BR)
    x = tl.load(y + offs, mask=mask, other=0.0)
    return _tanh(x.to(ACC) * gamma, ACC)


@triton.jit
def _strided_block(q, cols, N, C, S, BR: tl.constexpr):
    """Offsets and mask of row block q of an [N, C, S] layer with 1 < S < 16: BR consecutive rows r = (n, s), which
    may straddle samples; contiguous along neither axis, but no row is wasted."""
    rows = q * BR + tl.arange(0, BR)
    n = rows // S
    offs = (n * C * S + (rows - n * S))[:, None] + cols[None, :] * S
    return offs, (rows[:, None] < N * S) & (cols[None, :] < C)


@triton.jit
def _block(q, cols, N, C, S, BR: tl.constexpr, MODE: tl.constexpr):
    """[BR, BC] offsets and mask of a DENSE or STRIDED layer's row block (SPATIAL ones go through _spatial_block_t).
    A compile-time choice: with a runtime branch on S, the fp32 Gram kernel took ptxas 35 s instead of 5 (two load
    layouts), and the loads had to sit inside the branches to keep their contiguity known."""
    if MODE == DENSE:
        return _dense_block(q, cols, N, C, BR)
    else:
        return _strided_block(q, cols, N, C, S, BR)


@triton.jit
def _load_z(y, q, cols, N, C, S, gamma, ACC: tl.constexpr, BR: tl.constexpr, MODE: tl.constexpr):
    """tanh(γY) on row block q and columns cols as ACC, zero outside the layer."""
    offs, mask = _block(q, cols, N, C, S, BR, MODE)
    x = tl.load(y + offs, mask=mask, other=0.0)
    return _tanh(x.to(ACC) * gamma, ACC)


@triton.jit
def _load_raw(y, q, cols, N, C, S, BR: tl.constexpr, MODE: tl.constexpr):
    """Row block q of Y as stored, zero outside the layer: [BC, BR] (transposed) for SPATIAL layers, else [BR, BC]."""
    if MODE == SPATIAL:
        offs, mask = _spatial_block_t(q, cols, N, C, S, BR)
    else:
        offs, mask = _block(q, cols, N, C, S, BR, MODE)
    return tl.load(y + offs, mask=mask, other=0.0)


@triton.jit
def _som_gram_kernel(
    y_ptrs, meta_ptr, work_ptr, part_ptr, gamma_arg: tl.float64, R,
    DTYPE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
    BCS: tl.constexpr, MODE: tl.constexpr, DIAG: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """BC: the tile width computed; BCS >= BC: the width of the slots written (a single-tile layer narrower than the
    widest is computed at its own width, its slot padded with zeros). DIAG: every pair of the launch is a diagonal
    tile (each layer within one tile), compiled without the loop's runtime branch and its second load. PREFETCH
    (with DIAG): the row loop keeps the next block's load in flight in registers (GRAM_PREFETCH)."""
    gamma = tl.full([], gamma_arg, ACC)  # passed as fp64 (an unannotated Python float would be fp32), computed in ACC
    pid = tl.program_id(0)
    w = pid // R
    chunk = pid - w * R
    layer = tl.load(work_ptr + w * 4)
    ti = tl.load(work_ptr + w * 4 + 1)
    tj = tl.load(work_ptr + w * 4 + 2)
    slot = tl.load(work_ptr + w * 4 + 3)  # the pair's index among every layer's pairs, in both launches
    # tl.constexpr(...).value: Triton 3.0 and 3.1's pointer_type does not unwrap a constexpr dtype
    y = tl.load(y_ptrs + layer).to(tl.pointer_type(tl.constexpr(DTYPE).value))
    N = tl.load(meta_ptr + layer * 3)
    C = tl.load(meta_ptr + layer * 3 + 1)
    S = tl.load(meta_ptr + layer * 3 + 2)
    nb = _row_blocks(N, S, BR, MODE)
    per_chunk = tl.cdiv(nb, R)
    q0 = chunk * per_chunk
    q1 = tl.minimum(q0 + per_chunk, nb)
    ci = ti * BC + tl.arange(0, BC)
    cj = tj * BC + tl.arange(0, BC)
    acc = tl.zeros([BC, BC], dtype=ACC)
    # a diagonal tile loads and tanh's each element once
    if DIAG and PREFETCH:  # the next block's raw Y is loaded before this block's tanh and dot use theirs
        x = _load_raw(y, q0, ci, N, C, S, BR, MODE)
        for q in range(q0, q1):
            x_next = _load_raw(y, tl.where(q + 1 < q1, q + 1, nb), ci, N, C, S, BR, MODE)  # nb: masked out
            z = _tanh(x.to(ACC) * gamma, ACC)
            if MODE == SPATIAL:
                acc += tl.dot(z, tl.trans(z), input_precision=PREC)
            else:
                acc += tl.dot(tl.trans(z), z, input_precision=PREC)
            x = x_next
    elif MODE == SPATIAL:  # Zᵀ tiles [BC, BR]: G += ZaᵀZb = dot(Zaᵀ, (Zbᵀ)ᵀ), both operands contiguous along BR
        for q in range(q0, q1):
            za = _load_zt(y, q, ci, N, C, S, gamma, ACC, BR)
            if DIAG:
                zb = za
            elif ti == tj:
                zb = za
            else:
                zb = _load_zt(y, q, cj, N, C, S, gamma, ACC, BR)
            acc += tl.dot(za, tl.trans(zb), input_precision=PREC)
    else:
        for q in range(q0, q1):
            za = _load_z(y, q, ci, N, C, S, gamma, ACC, BR, MODE)
            if DIAG:
                zb = za
            elif ti == tj:
                zb = za
            else:
                zb = _load_z(y, q, cj, N, C, S, gamma, ACC, BR, MODE)
            acc += tl.dot(tl.trans(za), zb, input_precision=PREC)
    t = tl.arange(0, BC)
    base = part_ptr + (slot * R + chunk) * BCS * BCS
    tl.store(base + t[:, None] * BCS + t[None, :], acc)
    if BC < BCS:
        u = tl.arange(0, BCS)
        pad = (u[:, None] >= BC) | (u[None, :] >= BC)
        tl.store(base + u[:, None] * BCS + u[None, :], tl.zeros([BCS, BCS], dtype=ACC), mask=pad)


@triton.jit
def _grad_locate(meta_ptr, L, pid):
    """(N, C, S, gradient offset, program index within its layer, layer) of backward program pid (int64)."""
    row = 0  # this launch's layers, one meta row each: (N, C, S, gradient offset, first program, layer)
    for g in range(1, L):  # the last row whose first program is at or before pid (starts ascend)
        row += (tl.load(meta_ptr + g * 6 + 4) <= pid).to(tl.int32)
    N = tl.load(meta_ptr + row * 6)
    C = tl.load(meta_ptr + row * 6 + 1)
    S = tl.load(meta_ptr + row * 6 + 2)
    out = tl.load(meta_ptr + row * 6 + 3)
    local = pid - tl.load(meta_ptr + row * 6 + 4)
    layer = tl.load(meta_ptr + row * 6 + 5)
    return N, C, S, out, local, layer


@triton.jit
def _grad_one_tile(x, y_ptrs, meta_ptr, a_ptr, scale_ptr, scale_stride, dy_ptr, gamma, KP, L, pid, DTYPE: tl.constexpr,
                   ACC: tl.constexpr, PREC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, SCALED: tl.constexpr,
                   MODE: tl.constexpr):  # fmt: skip
    """∂R/∂Y of the block of program pid, every layer of the launch within one tile, from x, its Y as stored
    (_load_raw): one block per program index, cols = the layer's channels."""
    N, C, S, out, q, layer = _grad_locate(meta_ptr, L, pid)
    cols = tl.arange(0, BC)
    a_base = a_ptr + layer * KP * KP
    scale = tl.load(scale_ptr + layer * scale_stride).to(a_ptr.dtype.element_ty) if SCALED else 1.0
    zc = _tanh(x.to(ACC) * gamma, ACC)
    if MODE == SPATIAL:
        a = tl.load(a_base + cols[None, :] * KP + cols[:, None])
        acc = tl.dot((a * scale).to(ACC), zc, input_precision=PREC)
        offs, mask = _spatial_block_t(q, cols, N, C, S, BR)
    else:
        a = tl.load(a_base + cols[:, None] * KP + cols[None, :])
        acc = tl.dot(zc, (a * scale).to(ACC), input_precision=PREC)
        offs, mask = _block(q, cols, N, C, S, BR, MODE)
    grad = gamma * (1.0 - zc * zc) * acc
    tl.store(dy_ptr + out + offs, grad.to(DTYPE), mask=mask)


@triton.jit
def _raw_of(y_ptrs, meta_ptr, L, pid, DTYPE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, MODE: tl.constexpr):
    """Y as stored on the block of one-tile program pid (zero past the launch's last program: its q is past the
    last layer's blocks, so masked)."""
    N, C, S, _out, q, layer = _grad_locate(meta_ptr, L, pid)
    y = tl.load(y_ptrs + layer).to(tl.pointer_type(tl.constexpr(DTYPE).value))
    return _load_raw(y, q, tl.arange(0, BC), N, C, S, BR, MODE)


@triton.jit
def _som_grad_kernel(
    y_ptrs, meta_ptr, a_ptr, scale_ptr, dy_ptr, gamma_arg: tl.float64, KP, L, TOTAL, SCALE_STRIDE,
    DTYPE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
    SCALED: tl.constexpr, ONE_TILE: tl.constexpr, MODE: tl.constexpr, PERSIST: tl.constexpr,
):  # fmt: skip
    """TOTAL: the launch's block programs; SCALE_STRIDE: the scale's stride (0 for an expanded scalar gradient, read
    in place). PERSIST (with ONE_TILE): a grid smaller than TOTAL, each program taking
    blocks pid, pid + grid, ... with the next block's load in flight while it computes this one (GRAD_PERSIST)."""
    gamma = tl.full([], gamma_arg, ACC)
    pid = tl.program_id(0).to(tl.int64)
    if PERSIST:
        step = tl.num_programs(0).to(tl.int64)
        x = _raw_of(y_ptrs, meta_ptr, L, pid, DTYPE, BR, BC, MODE)
        for p in range(pid, TOTAL, step):
            x_next = _raw_of(y_ptrs, meta_ptr, L, p + step, DTYPE, BR, BC, MODE)
            _grad_one_tile(x, y_ptrs, meta_ptr, a_ptr, scale_ptr, SCALE_STRIDE, dy_ptr, gamma, KP, L, p, DTYPE, ACC,
                           PREC, BR, BC, SCALED, MODE)  # fmt: skip
            x = x_next
    elif ONE_TILE:  # Z's block is both the dot's input and the epilogue's
        x = _raw_of(y_ptrs, meta_ptr, L, pid, DTYPE, BR, BC, MODE)
        _grad_one_tile(x, y_ptrs, meta_ptr, a_ptr, scale_ptr, SCALE_STRIDE, dy_ptr, gamma, KP, L, pid, DTYPE, ACC,
                       PREC, BR, BC, SCALED, MODE)  # fmt: skip
    else:
        N, C, S, out, local, layer = _grad_locate(meta_ptr, L, pid)
        y = tl.load(y_ptrs + layer).to(tl.pointer_type(tl.constexpr(DTYPE).value))
        n_cb = tl.cdiv(C, BC)
        q = local // n_cb
        cb = local - q * n_cb
        cols = cb * BC + tl.arange(0, BC)
        a_base = a_ptr + layer * KP * KP
        # A_ℓ = scale_ℓ · a_ℓ, taken in a's precision (scale is float32 or float64: cast here, not by a launch)
        scale = tl.load(scale_ptr + layer * SCALE_STRIDE).to(a_ptr.dtype.element_ty) if SCALED else 1.0
        # A is zero-padded to [KP, KP], KP a multiple of the widest tile; Z's block is recomputed for the epilogue
        if MODE == SPATIAL:  # transposed: ∂Yᵀ[cols, rows] = Σ_k A[k, cols] Zᵀ[k, rows], tiles contiguous along rows
            acc = tl.zeros([BC, BR], dtype=ACC)
            for k0 in range(0, C, BC):
                ks = k0 + tl.arange(0, BC)
                z = _load_zt(y, q, ks, N, C, S, gamma, ACC, BR)
                a = tl.load(a_base + ks[None, :] * KP + cols[:, None])
                acc += tl.dot((a * scale).to(ACC), z, input_precision=PREC)
            zc = _load_zt(y, q, cols, N, C, S, gamma, ACC, BR)
            grad = gamma * (1.0 - zc * zc) * acc
            offs, mask = _spatial_block_t(q, cols, N, C, S, BR)
            tl.store(dy_ptr + out + offs, grad.to(DTYPE), mask=mask)
        else:
            acc = tl.zeros([BR, BC], dtype=ACC)
            for k0 in range(0, C, BC):
                ks = k0 + tl.arange(0, BC)
                z = _load_z(y, q, ks, N, C, S, gamma, ACC, BR, MODE)
                a = tl.load(a_base + ks[:, None] * KP + cols[None, :])
                acc += tl.dot(z, (a * scale).to(ACC), input_precision=PREC)
            zc = _load_z(y, q, cols, N, C, S, gamma, ACC, BR, MODE)
            grad = gamma * (1.0 - zc * zc) * acc
            offs, mask = _block(q, cols, N, C, S, BR, MODE)
            tl.store(dy_ptr + out + offs, grad.to(DTYPE), mask=mask)


@triton.jit
def _inv_diag(tiles_ptr, first, nt, t, C, eps2, BC: tl.constexpr):
    """Tile row block t of the layer: (1/max(√G_ii, eps), 0 outside the layer; G_ii ≥ eps²; i inside the layer)."""
    r = tl.arange(0, BC)
    valid = t * BC + r < C
    slot = first + t * nt - (t * (t - 1)) // 2  # the diagonal tile (t, t) among the layer's pairs i ≤ j
    d = tl.load(tiles_ptr + slot.to(tl.int64) * BC * BC + r * (BC + 1), mask=valid, other=1.0)
    return tl.where(valid, 1.0 / tl.sqrt(tl.maximum(d, eps2)), 0.0), d >= eps2, valid


@triton.jit
def _theta_tile(tiles_ptr, first, nt, ti, tj, inv_i, inv_j, valid_i, valid_j, BC: tl.constexpr):
    """Θ tile (ti, tj): G_ij·d_i·d_j on the layer's off-diagonal pairs, else 0. G comes from the upper tile (min, max),
    transposed below the diagonal; diagonal tiles are symmetrized, so Θ is exactly symmetric."""
    lo = tl.minimum(ti, tj)
    hi = tl.maximum(ti, tj)
    slot = first + lo * nt - (lo * (lo - 1)) // 2 + (hi - lo)
    r = tl.arange(0, BC)
    base = tiles_ptr + slot.to(tl.int64) * BC * BC
    inside = (hi < nt).to(tl.int32)  # the layer's tiles only, as a block mask (the interpreter refuses scalar ones)
    ok = (r[:, None] * 0 + r[None, :] * 0 + inside) != 0
    g = tl.load(base + r[:, None] * BC + r[None, :], mask=ok, other=0.0)
    gt = tl.load(base + r[None, :] * BC + r[:, None], mask=ok, other=0.0)
    g = tl.where(ti < tj, g, tl.where(ti > tj, gt, 0.5 * (g + gt)))
    pair = valid_i[:, None] & valid_j[None, :] & ((ti * BC + r)[:, None] != (tj * BC + r)[None, :])
    return tl.where(pair, g * (inv_i[:, None] * inv_j[None, :]), 0.0), pair  # d_i·d_j first: exactly symmetric


@triton.jit
def _som_finish_kernel(
    tiles_ptr, meta_ptr, r_ptr, b_ptr, KP, NT, lambda1: tl.float64, lambda2: tl.float64, eps2: tl.float64,
    BC: tl.constexpr,
):  # fmt: skip
    """One program per layer, float64: R = λ₁s₁² + λ₂s₂ from the Gram tiles, and A = Ḡ + Ḡᵀ = 2Ḡ for a unit upstream
    gradient (zero-padded to [KP, KP]), Ḡ = ∂R/∂G = M ⊙ ddᵀ − diag(d² ⊙ Σ_j M_ij Θ_ij), M = P ⊙ (2λ₁s₁ + 2λ₂Θ), the
    diagonal term only where G_ii ≥ eps² (kexue_fast.ortho.som._GramPenalty with Θ symmetric)."""
    layer = tl.program_id(0)
    C = tl.load(meta_ptr + layer * 3)
    nt = tl.load(meta_ptr + layer * 3 + 1)
    first = tl.load(meta_ptr + layer * 3 + 2)
    r = tl.arange(0, BC)
    s1 = tl.zeros([BC], dtype=tl.float64)
    s2 = tl.zeros([BC], dtype=tl.float64)
    # d and Θ tiles are recomputed in each pass from the (small) Gram tiles rather than stored: reading back this
    # program's own global writes would need barriers. One name per unused result (not `_`): a loop-carried name
    # must keep its type when compiled, which the interpreter does not check.
    for ti in range(0, nt):
        inv_i, _unclamped_i, valid_i = _inv_diag(tiles_ptr, first, nt, ti, C, eps2, BC)
        for tj in range(0, nt):
            inv_j, _unclamped_j, valid_j = _inv_diag(tiles_ptr, first, nt, tj, C, eps2, BC)
            theta, pair = _theta_tile(tiles_ptr, first, nt, ti, tj, inv_i, inv_j, valid_i, valid_j, BC)
            s1 += tl.sum(theta, 1)
            s2 += tl.sum(theta * theta, 1)
    sum1 = tl.sum(s1, 0)
    # R in r's dtype (float32 for float32 and half layers: no cast launch after this kernel)
    tl.store(r_ptr + layer, (lambda1 * sum1 * sum1 + lambda2 * tl.sum(s2, 0)).to(r_ptr.dtype.element_ty))
    c1 = 2.0 * lambda1 * sum1
    out = b_ptr + layer.to(tl.int64) * KP * KP
    for ti in range(0, NT):  # every tile of the layer's [KP, KP] slab: zeros outside the layer
        inv_i, unclamped, valid_i = _inv_diag(tiles_ptr, first, nt, ti, C, eps2, BC)
        rowsum = tl.zeros([BC], dtype=tl.float64)
        for tj in range(0, nt):
            inv_j, _unclamped_j, valid_j = _inv_diag(tiles_ptr, first, nt, tj, C, eps2, BC)
            theta, pair = _theta_tile(tiles_ptr, first, nt, ti, tj, inv_i, inv_j, valid_i, valid_j, BC)
            rowsum += tl.sum(tl.where(pair, c1 + 2.0 * lambda2 * theta, 0.0) * theta, 1)
        diag = tl.where(unclamped & valid_i, -inv_i * inv_i * rowsum, 0.0)
        for tj in range(0, NT):
            inv_j, _unclamped_j, valid_j = _inv_diag(tiles_ptr, first, nt, tj, C, eps2, BC)
            theta, pair = _theta_tile(tiles_ptr, first, nt, ti, tj, inv_i, inv_j, valid_i, valid_j, BC)
            b = tl.where(pair, c1 + 2.0 * lambda2 * theta, 0.0) * (inv_i[:, None] * inv_j[None, :])
            rows = ti * BC + r
            cols = tj * BC + r
            b = tl.where(rows[:, None] == cols[None, :], diag[:, None], b)
            tl.store(out + rows[:, None] * KP + cols[None, :], 2.0 * b)  # B + Bᵀ: B is symmetric


FINISH_WARPS = 8  # a [64, 64] float64 tile over 4 warps spilled registers (ptxas, sm_90)
# launch settings, module-level so that benchmarks/som_profile.py --sweep can try others
GRAM_WARPS = 4
GRAD_WARPS = 8  # H100, the CNN of benchmarks/ortho.py: 412 us against 687 on 4 (som_profile --sweep, d8a620e)
GRAM_ROWS = 64  # rows per block (BR) of the Gram kernel below float64, at most; float64 takes ROWS_FP64
GRAD_ROWS = 64  # the same for the backward kernel
ROWS_FP64 = 32
GRAM_WAVES = 4  # Gram programs per SM: each tile's rows are split into chunks until the grid has this many
# software-pipelining stages of the Gram kernel's row loop (None: Triton's default, 3 on sm_90): staging the loads
# through shared memory cost more than it hid (H200, tf32x3: 175 us forward on 1 stage against 304 on the default;
# som_profile --sweep at 2f1a310)
GRAM_STAGES: Optional[int] = 1
# the Gram's row loop on diagonal-only launches loads the next block while computing this one (registers, not
# shared memory: the pipeliner's shared-memory staging cost more than it hid, above). H200, the CNN's conv outputs
# (som_profile --sweep at f15a7cc and 3e7c989): forward 175.1 -> 137.6 us and 175.5 -> 154.6 us; Nsight Compute
# (gpu_check.sh's ncu stage, f15a7cc): the 32-channel launch 102 -> 66 us, latency-bound at 8 warps per SM
GRAM_PREFETCH = True
GRAD_STAGES: Optional[int] = None
# backward launches whose layers all fit one tile: 0, one program per row block; n > 0, a grid of n programs per SM,
# each looping over row blocks with the next one's load in flight. H200, the same sweeps: backward 180.8 -> 163.3 us
# and 182.3 -> 164.2 us at 4; Nsight Compute: the 64-channel launch (139 registers a thread: one 8-warp program per
# SM) 80 -> 63 us, the 32-channel one 95 -> 100 us
GRAD_PERSIST = 4
# the dots on NVIDIA GPUs of float32 inputs where torch does not allow TF32 (allow_tf32 gives "tf32"), and of
# float16/bfloat16 inputs always (their Z is float32): "ieee" (FMA, exact float32 products) or "tf32x3" (three TF32
# tensor-core products of hi/lo splits, ~float32 accuracy). ROCm and float64 take "ieee".
# The Gram (K = rows) gains from the tensor cores; the backward's short K = C products do not (H200 at 2f1a310: Gram
# 304 us tf32x3 against 445 IEEE, backward 322 against 211; both within 2x torch's float32 error, the tests' bar)
GRAM_DOTS = "tf32x3"
GRAD_DOTS = "ieee"

# Tables depend only on shapes and data pointers, launch plans on shapes and the settings they read; steady-state
# training steps (the caching allocator hands the same addresses back) reuse both instead of rebuilding them on the
# host and copying host memory to the device.
_TABLE_CACHE: OrderedDict[tuple, Tuple[Tensor, ...]] = OrderedDict()
_TABLE_CACHE_SIZE = 64


def _cached(key: tuple, build):
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    entry = build()
    _TABLE_CACHE[key] = entry
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return entry


def _to_device(*parts: Sequence[int], device: torch.device) -> Tuple[Tensor, ...]:
    """int64 host lists as device tensors, copied in one transfer, and (last) the host tensor. On CUDA the host side
    is pinned and the copy asynchronous: a copy from pageable memory would wait for the stream, stalling the host in
    every training step whose pointers missed the cache. Callers cache the host tensor with the device ones: never
    freed or rewritten while they are in use, it stays valid for a copy still in flight, or replayed from a CUDA
    graph that captured it."""
    flat = [v for part in parts for v in part]
    host = torch.tensor(flat, dtype=torch.int64, pin_memory=device.type == "cuda")
    return (*host.to(device, non_blocking=True).split([len(part) for part in parts]), host)


def _check(ys: Sequence[Tensor], layouts: Sequence[Layout]) -> None:
    if not ys or len(ys) != len(layouts):
        raise ValueError("som kernels need one (N, C, S) layout per layer output, and at least one layer")
    y0 = ys[0]
    if y0.dtype not in _TL_DTYPES:
        raise TypeError(f"the SOM Triton kernels support {[str(d) for d in _TL_DTYPES]}, got {y0.dtype}")
    for i, (y, (n, c, s)) in enumerate(zip(ys, layouts)):
        if y.dtype != y0.dtype or y.device != y0.device or not y.is_contiguous() or y.numel() != n * c * s:
            raise ValueError(f"ys[{i}] must be a contiguous {y0.dtype} tensor on {y0.device} of {n}·{c}·{s} elements")
        if n * s < 1 or c < 1:
            raise ValueError(f"ys[{i}] has an empty layout (N, C, S) = {(n, c, s)}")


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype, device: torch.device, dots: str) -> str:
    """float32 dots follow torch's matmul setting (tf32 only where torch would use it), else `dots` (GRAM_DOTS or
    GRAD_DOTS) on an NVIDIA GPU; half inputs take `dots` (their operands are float32). The interpreter, ROCm (whose
    Triton backend has no tf32x3) and float64 take IEEE."""
    if dtype == torch.float64 or device.type != "cuda" or torch.version.hip is not None:
        return "ieee"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    if dots not in ("ieee", "tf32x3"):
        raise ValueError(f"kernels.som.GRAM_DOTS and GRAD_DOTS must be 'ieee' or 'tf32x3', got {dots!r}")
    return dots


def _launch_options(num_warps: int, num_stages: Optional[int]) -> dict:
    return {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}


def tile_width(max_c: int) -> int:
    """BC, the Gram tile width: the padded width KP of gram_matrices is the multiple of BC covering max_c."""
    return max(16, min(64, 1 << (max_c - 1).bit_length()))


def _mode(s: int) -> int:
    """The row blocking of a layer with S positions per sample (DENSE, SPATIAL or STRIDED; see _block)."""
    return 0 if s == 1 else 1 if s >= 16 else 2


def _rows_per_block(dtype: torch.dtype, device: torch.device, s: int, rows: int) -> int:
    """BR for a layer with S positions per sample, rows at most below float64 (GRAM_ROWS or GRAD_ROWS). A SPATIAL
    block stays within one sample, so BR is held to S's power of two (at least 16, the dot's minimum) to waste few
    rows."""
    if device.type != "cuda":
        return 16  # interpreter: small blocks keep the numpy emulation quick
    br = ROWS_FP64 if dtype == torch.float64 else rows
    if _mode(s) == 1:
        br = max(16, min(br, 1 << (s - 1).bit_length()))
    return br


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The device's SM count (2 for the interpreter on the CPU: a grid of a few programs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # host arithmetic: triton.cdiv goes through Triton's function wrappers, microseconds a call


def _row_blocks_host(n: int, s: int, br: int) -> int:
    return n * _cdiv(s, br) if _mode(s) == 1 else _cdiv(n * s, br)


def _width(c: int, bc: int) -> int:
    """The tile width a layer of c channels is computed at: its own (a power of two, 16 to 64) when it fits one tile
    of the widest layer's width bc, else bc. A 32-channel layer beside 64-channel ones thus does a quarter of the
    dot work it would at 64."""
    return tile_width(c) if c <= bc else bc


def _groups(layouts: Sequence[Layout], bc: int, dtype: torch.dtype, device: torch.device, rows: int):
    """{(mode, width, BR): the indices of its layers}, in layer order: one launch each."""
    groups: dict = {}
    for g, (_, c, s) in enumerate(layouts):
        groups.setdefault((_mode(s), _width(c, bc), _rows_per_block(dtype, device, s, rows)), []).append(g)
    return groups


def _gram_plan(layouts: Tuple[Layout, ...], dtype: torch.dtype, device: torch.device, chunks: Optional[int]):
    """(BC, tiles per layer side, pairs (layer, ti, tj ≥ ti), {(mode, width, BR): layer indices}, each launch's pairs
    as (layer, ti, tj, index among all pairs), each launch's DIAG, row chunks per pair) of a Gram launch."""
    bc = tile_width(max(c for _, c, _ in layouts))
    nts = [_cdiv(c, bc) for _, c, _ in layouts]
    pairs = [(g, i, j) for g, nt in enumerate(nts) for i in range(nt) for j in range(i, nt)]
    groups = _groups(layouts, bc, dtype, device, GRAM_ROWS)
    max_blocks = max(_row_blocks_host(layouts[g][0], layouts[g][2], br) for (_, _, br), idx in groups.items()
                     for g in idx)  # fmt: skip
    if chunks is None:
        target = GRAM_WAVES * _multiprocessors(device) if device.type == "cuda" else 2
        chunks = _cdiv(target, len(pairs))
    chunks = max(1, min(int(chunks), max_blocks))
    works = {key: [(g, i, j, p) for p, (g, i, j) in enumerate(pairs) if g in idx] for key, idx in groups.items()}
    diag = {key: all(i == j for _, i, j, _ in work) for key, work in works.items()}  # DIAG of each launch
    return bc, nts, pairs, groups, works, diag, chunks


def _gram_tiles(ys: Sequence[Tensor], layouts: Sequence[Layout], gamma: float, chunks: Optional[int]):
    """(the upper tiles of every layer's Gram, summed over the row chunks in float64: [P, BC, BC] in the order of
    pairs; pairs, the (layer, ti, tj ≥ ti) of each; tiles per layer side; BC; the pairs as a device index [3, P]).
    One launch per row-blocking mode, tile width and BR present (see _block, _width, _rows_per_block)."""
    _check(ys, layouts)
    y0 = ys[0]
    device, dtype = y0.device, y0.dtype
    layouts = tuple(tuple(lay) for lay in layouts)
    # everything but the data addresses follows from the shapes and settings: planned once per combination
    plan_key = ("gram plan", device, dtype, layouts, chunks, GRAM_ROWS, ROWS_FP64, GRAM_WAVES)
    bc, nts, pairs, groups, works, diag, chunks = _cached(plan_key, lambda: _gram_plan(layouts, dtype, device, chunks))

    def build():
        ptrs, meta, *work, index, host = _to_device(
            [y.data_ptr() for y in ys], [v for lay in layouts for v in lay],
            *[[v for w in works[key] for v in w] for key in groups], [v for p in zip(*pairs) for v in p],
            device=device,
        )  # fmt: skip
        return ptrs, meta, work, index.view(3, len(pairs)), host

    # the groups are in the key: the same shapes and addresses in another dtype (or GRAM_ROWS) may group differently
    key = ("gram", device, bc, chunks, tuple(groups), tuple(layouts), tuple(y.data_ptr() for y in ys))
    ptrs, meta, work, index, _ = _cached(key, build)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    part = torch.empty((len(pairs) * chunks, bc, bc), dtype=acc, device=device)
    options = _launch_options(GRAM_WARPS, GRAM_STAGES)
    precision = _precision(dtype, device, GRAM_DOTS)
    for group, work_m in zip(groups, work):
        mode, width, br = group
        constexprs = {"DTYPE": _TL_DTYPES[dtype], "ACC": _acc(dtype), "PREC": precision, "BR": br, "BC": width,
                      "BCS": bc, "MODE": mode, "DIAG": diag[group], "PREFETCH": bool(GRAM_PREFETCH)}  # fmt: skip
        _launch.launch(_som_gram_kernel, len(works[group]) * chunks, (ptrs, meta, work_m, part, float(gamma), chunks),
                       constexprs, options)  # fmt: skip
    return part.view(len(pairs), chunks, bc, bc).sum(1, dtype=torch.float64), pairs, nts, bc, index


def gram_matrices(ys: Sequence[Tensor], layouts: Sequence[Layout], gamma: float, chunks: Optional[int] = None):
    """G_ℓ = tanh(γY_ℓ)ᵀ tanh(γY_ℓ) of every layer as one zero-padded float64 [L, KP, KP] tensor (KP ≥ max k,
    a multiple of the tile), and KP. ys[ℓ]: contiguous, shaped anyhow, read as layouts[ℓ] = (N, C, S); one dtype
    and device for all. chunks: row chunks per tile (default: enough programs to fill the GPU)."""
    tiles_sum, _, nts, bc, index = _gram_tiles(ys, layouts, gamma, chunks)
    nt_max = max(nts)
    tiles = torch.zeros((len(ys), nt_max, nt_max, bc, bc), dtype=torch.float64, device=tiles_sum.device)
    g, ti, tj = index
    tiles[g, tj, ti] = tiles_sum.mT  # the lower triangle first: the diagonal tiles are then overwritten as computed
    tiles[g, ti, tj] = tiles_sum
    kp = nt_max * bc
    return tiles.permute(0, 1, 3, 2, 4).reshape(len(ys), kp, kp), kp


def penalty(
    ys: Sequence[Tensor], layouts: Sequence[Layout], gamma: float, lambda1: float, lambda2: float, eps: float,
    chunks: Optional[int] = None, out_dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """(R [L] in out_dtype (float32 or float64), computed in float64; A [L, KP, KP] float64): the SOM regularizer of
    every layer, R = λ₁s₁² + λ₂s₂ on Θ = D⁻¹GD⁻¹ (D_ii = max(√G_ii, eps)), and A = Ḡ + Ḡᵀ for Ḡ = ∂R/∂G at a unit
    upstream gradient (symmetric, zero-padded), so that the backward is gram_backward(ys, layouts, gamma, A,
    scale=∂L/∂R). Launches: the Gram tiles (one per group of layers sharing a row mode, tile width and BR), their sum
    over row chunks, and one program per layer for R and A (KP as in gram_matrices)."""
    tiles_sum, _, nts, bc, _ = _gram_tiles(ys, layouts, gamma, chunks)
    device = tiles_sum.device
    nt_max = max(nts)
    kp = nt_max * bc
    firsts, count = [], 0
    for nt in nts:
        firsts.append(count)
        count += nt * (nt + 1) // 2
    key = ("finish", device, bc, tuple(layouts))
    meta, _ = _cached(key, lambda: _to_device([v for (_, c, _), nt, f in zip(layouts, nts, firsts)
                                                for v in (c, nt, f)], device=device))  # fmt: skip
    if out_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"out_dtype must be torch.float32 or torch.float64, got {out_dtype}")
    r = torch.empty(len(ys), dtype=out_dtype, device=device)
    b = torch.empty((len(ys), kp, kp), dtype=torch.float64, device=device)
    _launch.launch(_som_finish_kernel, len(ys), (tiles_sum, meta, r, b, kp, nt_max, float(lambda1), float(lambda2),
                   float(eps) ** 2), {"BC": bc}, {"num_warps": FINISH_WARPS})  # fmt: skip
    return r, b


def _grad_plan(layouts: Tuple[Layout, ...], bc: int, dtype: torch.dtype, device: torch.device):
    """(elements of all layers, launches) of a backward: one launch per row-blocking mode, tile width and BR, as
    (mode, BR, width, one tile, layers, programs, meta), meta per layer of it (N, C, S, offset of its gradient in the
    flat output, first program, layer): the kernel finds its layer and block from the program id, no per-block
    table."""
    offsets = [0]
    for n, c, s in layouts:
        offsets.append(offsets[-1] + n * c * s)
    launches = []
    for (mode, width, br), idx in _groups(layouts, bc, dtype, device, GRAD_ROWS).items():
        meta, programs = [], 0
        for g in idx:
            n, c, s = layouts[g]
            meta += [n, c, s, offsets[g], programs, g]
            programs += _row_blocks_host(n, s, br) * _cdiv(c, width)
        one_tile = all(layouts[g][1] <= width for g in idx)
        launches.append((mode, br, width, one_tile, len(idx), programs, meta))
    return offsets[-1], launches


def gram_backward(
    ys: Sequence[Tensor], layouts: Sequence[Layout], gamma: float, a: Tensor, scale: Optional[Tensor] = None
) -> Tensor:
    """∂R/∂Y_ℓ = γ(1 − Z_ℓ²) ⊙ (Z_ℓ A_ℓ) for every layer, packed flat (layer ℓ's gradient, in ys[ℓ]'s element
    order and dtype, follows those of the layers before it). a: [L, KP, KP] with A_ℓ = Ḡ_ℓ + Ḡ_ℓᵀ zero-padded (KP as
    returned by gram_matrices), or with scale ([L]) A_ℓ = scale_ℓ · a_ℓ (the product taken in a's precision, then
    rounded to the kernel's)."""
    _check(ys, layouts)
    y0 = ys[0]
    device, dtype = y0.device, y0.dtype
    bc = tile_width(max(c for _, c, _ in layouts))
    kp = a.shape[-1]
    if a.shape != (len(ys), kp, kp) or kp % bc or kp < max(c for _, c, _ in layouts):
        raise ValueError(f"a must be [L, KP, KP] with KP a multiple of {bc} covering every layer, got {tuple(a.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        a = a.to(torch.float64 if dtype == torch.float64 else torch.float32)
    a = a.to(device).contiguous()
    if scale is not None:
        if scale.shape != (len(ys),):
            raise ValueError(f"scale must be [L] = [{len(ys)}], got {tuple(scale.shape)}")
        if scale.dtype not in (torch.float32, torch.float64):
            scale = scale.to(a.dtype)
        scale = scale.to(device)
        if scale.stride(0) != 0:  # an expanded scalar (the gradient of R.sum()) is read in place, with stride 0
            scale = scale.contiguous()
    layouts = tuple(tuple(lay) for lay in layouts)
    plan_key = ("grad plan", device, dtype, layouts, GRAD_ROWS, ROWS_FP64)
    total, launches = _cached(plan_key, lambda: _grad_plan(layouts, bc, dtype, device))
    key = ("grad", device, bc, tuple(lc[:3] for lc in launches), layouts, tuple(y.data_ptr() for y in ys))
    ptrs, *metas, _ = _cached(key, lambda: _to_device([y.data_ptr() for y in ys], *[lc[-1] for lc in launches],
                                                       device=device))  # fmt: skip
    flat = torch.empty(total, dtype=dtype, device=device)
    options = _launch_options(GRAD_WARPS, GRAD_STAGES)
    grid_cap = GRAD_PERSIST * _multiprocessors(device)
    for (mode, br, width, one_tile, n_layers, programs, _), meta_t in zip(launches, metas):
        persist = one_tile and 0 < grid_cap < programs
        constexprs = {"DTYPE": _TL_DTYPES[dtype], "ACC": _acc(dtype), "PREC": _precision(dtype, device, GRAD_DOTS),
                      "BR": br, "BC": width, "SCALED": scale is not None, "ONE_TILE": one_tile, "MODE": mode,
                      "PERSIST": persist}  # fmt: skip
        args = (
            ptrs,
            meta_t,
            a,
            a if scale is None else scale,
            flat,
            float(gamma),
            kp,
            n_layers,
            programs,
            0 if scale is None else scale.stride(0),
        )
        _launch.launch(_som_grad_kernel, grid_cap if persist else programs, args, constexprs, options)
    return flat
