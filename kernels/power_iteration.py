"""Triton kernels for batched power iteration over a list of matrices of different shapes.

One launch of `_power_iteration_step_kernel` advances every matrix by one iteration. Programs are (matrix, row block)
pairs from a work table; each matrix is reached through a table of data pointers (grouped-GEMM style), so the
weights are read in place, never packed. Per program, with v = v_in / ‖v_in‖:

    t[rows] = W[rows, :] · v            (written to u, raw)
    v_acc  += W[rows, :]ᵀ · t[rows]      (atomic; the block of W is re-read from L1/L2, not HBM)

so an iteration reads W once from memory. v_acc is one of three rotating buffers: while one is read and one
accumulated, the third is zeroed for the next launch, so no memset launch is needed. `_power_iteration_finalize_kernel`
turns raw (t, Wᵀt) into unit u, v and σ̂ = ‖Wᵀu‖ exactly as torch's spectral_norm defines them.

No autograd and no dispatch here: see kexue_fast.spectral.power_iteration.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _power_iteration_step_kernel(
    w_ptrs, u_ptrs, rows_ptr, cols_ptr, v_off_ptr, work_mat_ptr, work_row_ptr,
    v_in, v_acc, v_clear, tiny,
    DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    g = tl.load(work_mat_ptr + pid)
    r0 = tl.load(work_row_ptr + pid)
    m = tl.load(rows_ptr + g)
    n = tl.load(cols_ptr + g)
    vo = tl.load(v_off_ptr + g)
    # tl.constexpr(...).value: Triton 3.0 and 3.1's pointer_type does not unwrap a constexpr dtype
    w = tl.load(w_ptrs + g).to(tl.pointer_type(tl.constexpr(DTYPE).value))
    u = tl.load(u_ptrs + g).to(tl.pointer_type(tl.constexpr(DTYPE).value))
    offs_n = tl.arange(0, BLOCK_N)
    rows = r0 + tl.arange(0, BLOCK_M)
    row_mask = rows < m

    # v_in is the previous step's Wᵀt, of norm ~σ²: its squares (~σ⁴) in float64, which float32 overflowed for
    # σ > 4e9 (v = 0 and σ̂ = 0 from there on); normalized exactly (a floor at the dtype's tiny, not eps), as the
    # reference's v = Wᵀu/‖Wᵀu‖ is unit whenever σ ≥ eps; an eps floor shrank v by σ²/eps a step for σ < 1e-6
    sq = tl.zeros([BLOCK_N], dtype=tl.float64)
    for j0 in range(0, n, BLOCK_N):
        x = tl.load(v_in + vo + j0 + offs_n, mask=j0 + offs_n < n, other=0.0).to(tl.float64)
        sq += x * x
    inv_norm = (1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), tiny)).to(DTYPE)

    t = tl.zeros([BLOCK_M], dtype=DTYPE)
    for j0 in range(0, n, BLOCK_N):
        cols = j0 + offs_n
        col_mask = cols < n
        tile = tl.load(w + rows[:, None] * n + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        x = tl.load(v_in + vo + cols, mask=col_mask, other=0.0) * inv_norm
        t += tl.sum(tile * x[None, :], axis=1)
    tl.store(u + rows, t, mask=row_mask)

    for j0 in range(0, n, BLOCK_N):
        cols = j0 + offs_n
        col_mask = cols < n
        tile = tl.load(w + rows[:, None] * n + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        tl.atomic_add(v_acc + vo + cols, tl.sum(tile * t[:, None], axis=0), mask=col_mask)

    if r0 == 0:
        for j0 in range(0, n, BLOCK_N):
            tl.store(v_clear + vo + j0 + offs_n, tl.zeros([BLOCK_N], dtype=DTYPE), mask=j0 + offs_n < n)


@triton.jit
def _power_iteration_finalize_kernel(
    u_ptrs, v_ptrs, rows_ptr, cols_ptr, v_off_ptr, v_acc, v_prev, sigma_ptr, eps: tl.float64, tiny,
    DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # a float64 argument (a plain Python float would arrive as float32), rounded once to DTYPE; tl.full is exact in
    # the interpreter too, where eps stays a Python float (tl.cast would round it through float32 there)
    eps = tl.full([], eps, DTYPE)
    g = tl.program_id(0)
    m = tl.load(rows_ptr + g)
    n = tl.load(cols_ptr + g)
    vo = tl.load(v_off_ptr + g)
    u = tl.load(u_ptrs + g).to(tl.pointer_type(tl.constexpr(DTYPE).value))
    v = tl.load(v_ptrs + g).to(tl.pointer_type(tl.constexpr(DTYPE).value))
    offs = tl.arange(0, BLOCK)

    sq = tl.zeros([BLOCK], dtype=DTYPE)
    for i0 in range(0, m, BLOCK):
        x = tl.load(u + i0 + offs, mask=i0 + offs < m, other=0.0)
        sq += x * x
    inv_t = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), eps)
    for i0 in range(0, m, BLOCK):
        mask = i0 + offs < m
        tl.store(u + i0 + offs, tl.load(u + i0 + offs, mask=mask, other=0.0) * inv_t, mask=mask)

    sq = tl.zeros([BLOCK], dtype=DTYPE)
    for j0 in range(0, n, BLOCK):
        x = tl.load(v_acc + vo + j0 + offs, mask=j0 + offs < n, other=0.0) * inv_t
        sq += x * x
    sigma = tl.sqrt(tl.sum(sq, axis=0))
    tl.store(sigma_ptr + g, sigma)
    scale = inv_t / tl.maximum(sigma, eps)
    # Wv = 0 (a zero weight: a zero-initialized layer): v is kept, the call's v_init made unit, as the reference's
    # unit_or_keep (with W fixed during a call, Wv = 0 at one step means at every step); a zero v here would give
    # σ̂ = 0 at every later call, whatever the weight became
    sq = tl.zeros([BLOCK], dtype=DTYPE)
    for j0 in range(0, n, BLOCK):
        x = tl.load(v_prev + vo + j0 + offs, mask=j0 + offs < n, other=0.0)
        sq += x * x
    keep = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), tiny)
    for j0 in range(0, n, BLOCK):
        mask = j0 + offs < n
        new = tl.load(v_acc + vo + j0 + offs, mask=mask, other=0.0) * scale
        old = tl.load(v_prev + vo + j0 + offs, mask=mask, other=0.0) * keep
        tl.store(v + j0 + offs, tl.where(sigma > 0, new, old), mask=mask)


_TINY = torch.finfo(torch.float32).tiny  # the step kernel's normalization floor (a float32 kernel scalar)

# Tables depend only on shapes and data pointers, so steady-state calls (the same layers every training step) reuse
# them from this cache instead of copying host memory to the device, which would synchronize.
_TABLE_CACHE: OrderedDict[tuple, Tuple[Tensor, ...]] = OrderedDict()
_TABLE_CACHE_SIZE = 64


def _tables(weights: Sequence[Tensor], us: Sequence[Tensor], vs: Sequence[Tensor], block_m: int):
    device = weights[0].device
    shapes = tuple(w.shape for w in weights)
    key = (device, block_m, shapes, tuple(w.data_ptr() for w in weights), tuple(u.data_ptr() for u in us),
           tuple(v.data_ptr() for v in vs))  # fmt: skip
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    rows = [s[0] for s in shapes]
    cols = [s[1] for s in shapes]
    v_off, total = [], 0
    for c in cols:
        v_off.append(total)
        total += c
    work_mat, work_row = [], []
    for g, m in enumerate(rows):
        for r0 in range(0, m, block_m):
            work_mat.append(g)
            work_row.append(r0)
    host = torch.tensor(
        [*[w.data_ptr() for w in weights], *[u.data_ptr() for u in us], *[v.data_ptr() for v in vs],
         *rows, *cols, *v_off, *work_mat, *work_row],
        dtype=torch.int64,
    )  # fmt: skip
    dev = host.to(device)
    count, work = len(weights), len(work_mat)
    parts = dev.split([count] * 6 + [work, work])
    entry = (*parts, total, max(cols), max(rows))
    _TABLE_CACHE[key] = entry
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return entry


def _block_rows(device: torch.device, max_cols: int, itemsize: int) -> int:
    """Rows per program. The fused kernel re-reads its BLOCK_M × n tile for Wᵀt; that second read must hit L2, so
    the tiles of all concurrently running programs (~one per SM) should fit in half of L2. Fewer rows per program
    mean more atomic adds into v, so take the largest block that fits."""
    if device.type != "cuda":
        return 16
    props = torch.cuda.get_device_properties(device)
    budget = props.L2_cache_size // 2
    for block_m in (32, 16, 8):
        if block_m * max_cols * itemsize * props.multi_processor_count <= budget:
            return block_m
    return 4


def _check(name: str, tensors: Sequence[Tensor], ndim: int, dtype: torch.dtype, device: torch.device) -> None:
    for i, t in enumerate(tensors):
        if t.ndim != ndim or not t.is_contiguous() or t.dtype != dtype or t.device != device:
            raise ValueError(f"{name}[{i}] must be a contiguous {ndim}-D {dtype} tensor on {device}")


def power_iteration(
    weights: Sequence[Tensor],
    u_out: Sequence[Tensor],
    v_out: Sequence[Tensor],
    v_init: Sequence[Tensor],
    n_iters: int,
    tol: Optional[float] = None,
    eps: float = 1e-12,
) -> Tensor:
    """Runs the iteration for every matrix; writes unit u_out[i], v_out[i] in place and returns σ̂ [L].

    weights[i]: contiguous [m_i, n_i]; u_out[i]: [m_i]; v_out[i], v_init[i]: [n_i] (v_init may alias v_out).
    One step launch per iteration plus one finalize launch; with `tol`, σ̂ is checked after each iteration (a
    host sync) and the loop stops once max_i |Δσ̂_i| / σ̂_i ≤ tol.
    """
    w0 = weights[0]
    dtype, device = w0.dtype, w0.device
    if dtype not in _TL_DTYPES:
        raise ValueError(f"the triton power iteration supports float32 and float64, not {dtype}")
    _check("weights", weights, 2, dtype, device)
    _check("u_out", u_out, 1, dtype, device)
    _check("v_out", v_out, 1, dtype, device)
    block_m = _block_rows(device, max(w.shape[1] for w in weights), weights[0].element_size())
    (w_ptrs, u_ptrs, v_ptrs, rows, cols, v_off, work_mat, work_row, total, max_n, max_m) = _tables(
        weights, u_out, v_out, block_m
    )
    block_n = max(16, min(128, triton.next_power_of_2(max_n)))
    block_f = max(16, min(1024, triton.next_power_of_2(max(max_n, max_m))))
    scratch = torch.zeros((4, total), dtype=dtype, device=device)  # three rotating vectors and v_init kept
    torch.cat([v.reshape(-1) for v in v_init], out=scratch[0])
    scratch[3].copy_(scratch[0])
    sigma = torch.empty(len(weights), dtype=dtype, device=device)
    tl_dtype = _TL_DTYPES[dtype]
    previous = None
    for k in range(n_iters):
        _power_iteration_step_kernel[(work_mat.numel(),)](
            w_ptrs, u_ptrs, rows, cols, v_off, work_mat, work_row,
            scratch[k % 3], scratch[(k + 1) % 3], scratch[(k + 2) % 3], _TINY,
            DTYPE=tl_dtype, BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
        last = k == n_iters - 1
        if last or tol is not None:
            _power_iteration_finalize_kernel[(len(weights),)](
                u_ptrs, v_ptrs, rows, cols, v_off, scratch[(k + 1) % 3], scratch[3], sigma, eps, _TINY,
                DTYPE=tl_dtype, BLOCK=block_f,
            )  # fmt: skip
        if tol is not None and not last:
            current = sigma.clone()
            if previous is not None and bool(((current - previous).abs() <= tol * current).all()):
                break
            previous = current
            # Finalize normalized v_out; the next step reads the raw accumulator, which is unchanged.
    return sigma


def bytes_moved(shapes: List[Tuple[int, int]], itemsize: int, n_iters: int) -> int:
    """Compulsory HBM traffic of `n_iters` iterations: W once per iteration, plus the vectors."""
    w = sum(m * n for m, n in shapes)
    vec = sum(m + 3 * n for m, n in shapes)
    return itemsize * n_iters * (w + vec)
