"""Triton kernels of the JoSE mini-batch trainer: tangential hinge steps on gathered rows, then the retraction.

A batch holds B triples of row indices. The step kernels read every row at its batch-start value, evaluate the hinge
(separate: f − h < m with f = uᵀv, h = u'ᵀv; joint: f + g − h − k < m), and atomically add the tangential steps
α c t (kexue_fast/jose/reference.py gives t and c for each vector and rule) into delta buffers shaped like the
tables; the retraction kernel then sets x ← (x + Δx)/‖x + Δx‖ and Δx ← 0 on the touched rows. A row touched by one
triple gets exactly the reference update; rows shared inside a batch get the sum of their steps (Hogwild-like
mini-batch semantics). One program handles BLOCK_T triples × the whole (padded) dimension. No autograd, no dispatch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

RULES = {"paper": 0, "jose_c": 1}
TINY = 1.1754943508222875e-38  # float32 min normal: guards ‖u − u'‖ and ‖v + d‖ against 0


@triton.jit
def _unit_ratio(x, y):
    """x / y clamped to [−1, 1], the range of the paper rule's ratios (kexue_fast.jose.reference._unit_ratio)."""
    return tl.minimum(tl.maximum(x / y, -1.0), 1.0)


@triton.jit
def _scalar(x, ptr):
    # x: a float64 argument (a plain Python float would arrive as float32), rounded once to the compute dtype,
    # float64 for float64 tables and float32 otherwise; tl.full is exact in the interpreter too (tl.cast is not)
    return tl.full([], x, tl.float64 if ptr.dtype.element_ty == tl.float64 else tl.float32)


@triton.jit
def _valid(tmask, ni, cw_ptr, t, HAS_CW: tl.constexpr):
    # a triple whose negative is its centre word does nothing (jose.c skips that sample)
    if HAS_CW:
        return tmask & (ni != tl.load(cw_ptr + t, mask=tmask, other=-1))
    return tmask


@triton.jit
def _rows(ptr, idx, cols, mask2, D):
    return tl.load(ptr + idx[:, None].to(tl.int64) * D + cols[None, :], mask=mask2, other=0.0)


@triton.jit
def _jose_separate_step_kernel(
    u_ptr, v_ptr, du_ptr, dv_ptr, ui_ptr, vi_ptr, ni_ptr, cw_ptr, loss_ptr, n, D, alpha: tl.float64,
    margin: tl.float64,
    RULE: tl.constexpr, MOVE_WORDS: tl.constexpr, HAS_CW: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    alpha, margin = _scalar(alpha, u_ptr), _scalar(margin, u_ptr)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    tmask = t < n
    mask2 = tmask[:, None] & (cols[None, :] < D)
    ui = tl.load(ui_ptr + t, mask=tmask, other=0)
    vi = tl.load(vi_ptr + t, mask=tmask, other=0)
    ni = tl.load(ni_ptr + t, mask=tmask, other=0)
    u = _rows(u_ptr, ui, cols, mask2, D)
    v = _rows(v_ptr, vi, cols, mask2, D)
    un = _rows(u_ptr, ni, cols, mask2, D)
    f = tl.sum(u * v, axis=1)
    h = tl.sum(un * v, axis=1)
    active = _valid(tmask, ni, cw_ptr, t, HAS_CW) & ((f - h) < margin)
    tl.store(loss_ptr + t, tl.where(active, margin - (f - h), 0.0), mask=tmask)
    act2 = mask2 & active[:, None]
    diff = u - un
    if RULE == 1:
        c_v = 1.0 - (f - h)
    else:
        dist = tl.maximum(tl.sqrt(tl.sum(diff * diff, axis=1)), 1.1754943508222875e-38)
        c_v = 1.0 + _unit_ratio(h - f, dist)
    step_v = (alpha * c_v)[:, None] * (diff - (f - h)[:, None] * v)
    tl.atomic_add(dv_ptr + vi[:, None].to(tl.int64) * D + cols[None, :], step_v, mask=act2)
    if MOVE_WORDS:
        step_u = (alpha * (1.0 - f))[:, None] * (v - f[:, None] * u)
        if RULE == 1:
            c_n = 2.0 * h
        else:
            c_n = 1.0 + h
        step_n = (alpha * c_n)[:, None] * (h[:, None] * un - v)
        tl.atomic_add(du_ptr + ui[:, None].to(tl.int64) * D + cols[None, :], step_u, mask=act2)
        tl.atomic_add(du_ptr + ni[:, None].to(tl.int64) * D + cols[None, :], step_n, mask=act2)


@triton.jit
def _jose_joint_step_kernel(
    u_ptr, v_ptr, d_ptr, du_ptr, dv_ptr, dd_ptr, ui_ptr, vi_ptr, di_ptr, ni_ptr, cw_ptr, loss_ptr, n, D,
    alpha: tl.float64, margin: tl.float64,
    RULE: tl.constexpr, MOVE_WORDS: tl.constexpr, HAS_CW: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    alpha, margin = _scalar(alpha, u_ptr), _scalar(margin, u_ptr)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    tmask = t < n
    mask2 = tmask[:, None] & (cols[None, :] < D)
    ui = tl.load(ui_ptr + t, mask=tmask, other=0)
    vi = tl.load(vi_ptr + t, mask=tmask, other=0)
    di = tl.load(di_ptr + t, mask=tmask, other=0)
    ni = tl.load(ni_ptr + t, mask=tmask, other=0)
    u = _rows(u_ptr, ui, cols, mask2, D)
    v = _rows(v_ptr, vi, cols, mask2, D)
    d = _rows(d_ptr, di, cols, mask2, D)
    un = _rows(u_ptr, ni, cols, mask2, D)
    f = tl.sum(u * v, axis=1)
    g = tl.sum(u * d, axis=1)
    h = tl.sum(un * v, axis=1)
    k = tl.sum(un * d, axis=1)
    gap = f + g - h - k
    active = _valid(tmask, ni, cw_ptr, t, HAS_CW) & (gap < margin)
    tl.store(loss_ptr + t, tl.where(active, margin - gap, 0.0), mask=tmask)
    act2 = mask2 & active[:, None]
    diff = u - un
    if RULE == 1:
        c_d = 1.0 - (g - k)
    else:
        dist = tl.maximum(tl.sqrt(tl.sum(diff * diff, axis=1)), 1.1754943508222875e-38)
        c_d = 1.0 + _unit_ratio(k - g, dist)
    step_d = (alpha * c_d)[:, None] * (diff - (g - k)[:, None] * d)
    tl.atomic_add(dd_ptr + di[:, None].to(tl.int64) * D + cols[None, :], step_d, mask=act2)
    if MOVE_WORDS:
        s = v + d
        s_norm = tl.maximum(tl.sqrt(tl.sum(s * s, axis=1)), 1.1754943508222875e-38)
        step_u = (alpha * (1.0 - _unit_ratio(f + g, s_norm)))[:, None] * (s - (f + g)[:, None] * u)
        if RULE == 1:
            c_n = 2.0 * _unit_ratio(h + k, s_norm)
            c_v = 1.0 - (f - h)
        else:
            c_n = 1.0 + _unit_ratio(h + k, s_norm)
            c_v = 1.0 + _unit_ratio(h - f, tl.maximum(tl.sqrt(tl.sum(diff * diff, axis=1)), 1.1754943508222875e-38))
        step_n = (alpha * c_n)[:, None] * ((h + k)[:, None] * un - s)
        step_v = (alpha * c_v)[:, None] * (diff - (f - h)[:, None] * v)
        tl.atomic_add(du_ptr + ui[:, None].to(tl.int64) * D + cols[None, :], step_u, mask=act2)
        tl.atomic_add(du_ptr + ni[:, None].to(tl.int64) * D + cols[None, :], step_n, mask=act2)
        tl.atomic_add(dv_ptr + vi[:, None].to(tl.int64) * D + cols[None, :], step_v, mask=act2)


@triton.jit
def _row_block(rows_ptr, n, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's block of the row list: table offsets, list-slot offsets, element mask, row mask."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = r < n
    mask2 = rmask[:, None] & (cols[None, :] < D)
    rows = tl.load(rows_ptr + r, mask=rmask, other=0).to(tl.int64)
    return rows[:, None] * D + cols[None, :], r[:, None].to(tl.int64) * D + cols[None, :], mask2, rmask


@triton.jit
def _retracted(x_ptr, dx_ptr, offs, mask2, rmask):
    y = tl.load(x_ptr + offs, mask=mask2, other=0.0) + tl.load(dx_ptr + offs, mask=mask2, other=0.0)
    norm = tl.where(rmask, tl.sqrt(tl.sum(y * y, axis=1)), 1.0)  # padded rows: no 0/0
    return y / norm[:, None]


@triton.jit
def _jose_retract_kernel(x_ptr, dx_ptr, rows_ptr, n, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    offs, _, mask2, rmask = _row_block(rows_ptr, n, D, BLOCK_R, BLOCK_D)
    y = _retracted(x_ptr, dx_ptr, offs, mask2, rmask)
    tl.store(x_ptr + offs, y, mask=mask2)
    tl.store(dx_ptr + offs, tl.zeros_like(y), mask=mask2)


@triton.jit
def _jose_retract_stage_kernel(x_ptr, dx_ptr, rows_ptr, stage_ptr, n, D, BLOCK_R: tl.constexpr,
                               BLOCK_D: tl.constexpr):  # fmt: skip
    # phase 1 of a retraction over a row list with repeats: each list position's result into its own slot
    offs, slot, mask2, rmask = _row_block(rows_ptr, n, D, BLOCK_R, BLOCK_D)
    tl.store(stage_ptr + slot, _retracted(x_ptr, dx_ptr, offs, mask2, rmask), mask=mask2)


@triton.jit
def _jose_retract_commit_kernel(x_ptr, dx_ptr, rows_ptr, stage_ptr, n, D, BLOCK_R: tl.constexpr,
                                BLOCK_D: tl.constexpr):  # fmt: skip
    # phase 2 (a later launch): x[r] ← staged row, Δx[r] ← 0; repeats of a row write equal values
    offs, slot, mask2, _ = _row_block(rows_ptr, n, D, BLOCK_R, BLOCK_D)
    y = tl.load(stage_ptr + slot, mask=mask2, other=0.0)
    tl.store(x_ptr + offs, y, mask=mask2)
    tl.store(dx_ptr + offs, tl.zeros_like(y), mask=mask2)


def _check(name: str, t: Tensor, dtype: Optional[torch.dtype] = None, ndim: Optional[int] = None) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}; got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got {t.ndim}-D")


def _check_tables(tables, deltas, index_vectors) -> None:
    """Each delta buffer shaped as its table, every table of one width, index vectors of one length, all on one
    device: the kernels index rows of width u.shape[1] and trust these. The row indices themselves are trusted too
    (checking their range would sync the host on every step): callers pass indices within their tables."""
    (_, first), device = tables[0], tables[0][1].device
    for (name, t), (dname, dt) in zip(tables, deltas):
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"{name} must have {first.shape[1]} columns (as {tables[0][0]}); got {tuple(t.shape)}")
        if dt.shape != t.shape:
            raise ValueError(f"{dname} must have {name}'s shape {tuple(t.shape)}; got {tuple(dt.shape)}")
    n = index_vectors[0][1].shape[0]
    for name, t in (*tables, *deltas, *index_vectors):
        if t.device != device:
            raise ValueError(f"{name} must be on {device}; got {t.device}")
    for name, t in index_vectors:
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 tensor; got {t.dtype}")
        if t.shape[0] != n:
            raise ValueError(f"{name} must hold {n} indices (as {index_vectors[0][0]}); got {t.shape[0]}")


def _block_t(dim: int) -> int:
    return max(1, min(32, 4096 // triton.next_power_of_2(dim)))


def _has_centre(centre: Optional[Tensor], n: int) -> bool:
    """Whether the step kernels compare negatives with centre words (validated: one per triple)."""
    if centre is None:
        return False
    _check("centre", centre, None, 1)
    if centre.shape[0] != n:
        raise ValueError(f"centre must hold one word per triple ({n}), got {centre.shape[0]}")
    return True


def separate_step(u: Tensor, v: Tensor, du: Tensor, dv: Tensor, ui: Tensor, vi: Tensor, ni: Tensor, alpha: float,
                  margin: float, rule: str, move_words: bool = True,
                  centre: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """Separate-hinge steps of B triples (u[ui], v[vi], u[ni]) added into du, dv; returns the hinge values [B].
    centre [B] (optional): a triple whose negative ni equals its centre word does nothing (hinge 0), as jose.c skips
    that sample — masked in the kernel, so the caller needs no host sync to drop it."""
    for name, t in (("u", u), ("v", v), ("du", du), ("dv", dv)):
        _check(name, t, u.dtype, 2)
    for name, t in (("ui", ui), ("vi", vi), ("ni", ni)):
        _check(name, t, None, 1)
    _check_tables((("u", u), ("v", v)), (("du", du), ("dv", dv)), (("ui", ui), ("vi", vi), ("ni", ni)))
    n, dim = ui.shape[0], u.shape[1]
    loss = torch.empty(n, dtype=u.dtype, device=u.device)
    if n == 0:
        return loss
    has_cw = _has_centre(centre, n)
    bt, bd = _block_t(dim), triton.next_power_of_2(dim)
    _jose_separate_step_kernel[(triton.cdiv(n, bt),)](
        u, v, du, dv, ui, vi, ni, centre if has_cw else ui, loss, n, dim, float(alpha), float(margin),
        RULE=RULES[rule], MOVE_WORDS=bool(move_words), HAS_CW=has_cw, BLOCK_T=bt, BLOCK_D=bd,
    )  # fmt: skip
    return loss


def joint_step(u: Tensor, v: Tensor, d: Tensor, du: Tensor, dv: Tensor, dd: Tensor, ui: Tensor, vi: Tensor,
               di: Tensor, ni: Tensor, alpha: float, margin: float, rule: str, move_words: bool = True,
               centre: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """Joint-hinge steps of B quadruples (u[ui], v[vi], d[di], u[ni]) added into du, dv, dd; returns the hinges [B].
    centre: as in separate_step."""
    for name, t in (("u", u), ("v", v), ("d", d), ("du", du), ("dv", dv), ("dd", dd)):
        _check(name, t, u.dtype, 2)
    for name, t in (("ui", ui), ("vi", vi), ("di", di), ("ni", ni)):
        _check(name, t, None, 1)
    _check_tables((("u", u), ("v", v), ("d", d)), (("du", du), ("dv", dv), ("dd", dd)),
                  (("ui", ui), ("vi", vi), ("di", di), ("ni", ni)))  # fmt: skip
    n, dim = ui.shape[0], u.shape[1]
    loss = torch.empty(n, dtype=u.dtype, device=u.device)
    if n == 0:
        return loss
    has_cw = _has_centre(centre, n)
    bt, bd = _block_t(dim), triton.next_power_of_2(dim)
    _jose_joint_step_kernel[(triton.cdiv(n, bt),)](
        u, v, d, du, dv, dd, ui, vi, di, ni, centre if has_cw else ui, loss, n, dim, float(alpha), float(margin),
        RULE=RULES[rule], MOVE_WORDS=bool(move_words), HAS_CW=has_cw, BLOCK_T=bt, BLOCK_D=bd,
    )  # fmt: skip
    return loss


def retract(x: Tensor, dx: Tensor, rows: Tensor, unique: bool = True) -> None:
    """x[r] ← (x[r] + dx[r]) / ‖x[r] + dx[r]‖ and dx[r] ← 0 for the rows r, in place. unique=False accepts a list
    with repeats (no sort, no host sync): every listed row is normalized into its own slot of a staging buffer,
    then a second launch writes the slots back, so repeats never read a half-updated row."""
    _check("x", x, None, 2)
    _check("dx", dx, x.dtype, 2)
    _check("rows", rows, None, 1)
    _check_tables((("x", x),), (("dx", dx),), (("rows", rows),))
    n, dim = rows.shape[0], x.shape[1]
    if n == 0:
        return
    br, bd = _block_t(dim), triton.next_power_of_2(dim)
    grid = (triton.cdiv(n, br),)
    if unique:
        _jose_retract_kernel[grid](x, dx, rows, n, dim, BLOCK_R=br, BLOCK_D=bd)
        return
    stage = torch.empty((n, dim), dtype=x.dtype, device=x.device)
    _jose_retract_stage_kernel[grid](x, dx, rows, stage, n, dim, BLOCK_R=br, BLOCK_D=bd)
    _jose_retract_commit_kernel[grid](x, dx, rows, stage, n, dim, BLOCK_R=br, BLOCK_D=bd)
