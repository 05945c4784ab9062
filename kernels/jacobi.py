"""The Jacobi elliptic functions sn, cn, dn, am (and the Jacobi zeta function) elementwise in one Triton pass
(kexue_fast.rope): Cephes' descending Landen / AGM algorithm (formulas: kexue_fast.rope.elliptic), 0 ≤ m ≤ 1.

Each element keeps its AGM levels a_i, c_i (i ≤ 8) in a [BLOCK, 16] register tile, stops where |c_i/a_i| ≤ ε/2
as Cephes does, and runs the backward recurrence φ_{i−1} = (φ_i + arcsin(c_i sin φ_i / a_i))/2 over its own levels.
arcsin, arctan, tanh and expm1 are not in Triton's core language (and the interpreter has no libdevice), so they
are built here from sqrt and exp: arcsin t = 2 arctan(t / (1 + √(1 − t²))), arctan by two half-angle reductions
(|w| ≤ tan(π/16)) and a 16-term series, expm1 by its Taylor series below |x| < 1/2. Constants that are not exact
in float32 (ε/2 and the thresholds of the series) come from a small tensor in the compute dtype, so that float64
stays float64.
No autograd and no dispatch here: see kexue_fast.rope.jacobi.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64)
BLOCK = 128
LEVELS = 8  # Cephes stops after 8 halvings


@triton.jit
def _atan_unit(z):
    """arctan z for |z| ≤ 1: two half-angle reductions arctan z = 2 arctan(z / (1 + √(1 + z²))), then the series."""
    w = z / (1 + tl.sqrt(1 + z * z))
    w = w / (1 + tl.sqrt(1 + w * w))
    w2 = w * w
    one = w2 * 0 + 1
    p = one / 31
    for k in tl.static_range(14, -1, -1):  # Σ_k (−w²)^k / (2k + 1), k = 15..0
        p = p * -w2 + one / (2 * k + 1)
    return 4 * w * p


@triton.jit
def _asin(t):
    return 2 * _atan_unit(t / (1 + tl.sqrt((1 - t) * (1 + t))))


@triton.jit
def _expm1(x):
    """e^x − 1 without cancellation near 0 (Taylor to x^18/18! below |x| < 1/2, where the tail is < 1e-22):
    x (1 + x/2 (1 + x/3 (⋯ (1 + x/18)))), Horner from the inside."""
    one = x * 0 + 1
    p = one
    for k in tl.static_range(18, 1, -1):
        p = one + x * p / k
    small = x * p
    return tl.where(tl.abs(x) < 0.5, small, tl.exp(x) - 1)


@triton.jit
def _tanh(x):
    xc = tl.minimum(tl.maximum(x, -20.0), 20.0)  # tanh(±20) = ±1 to double precision; e^{40} stays finite
    e = _expm1(2 * xc)
    return e / (e + 2)


@triton.jit
def _column(tile, selected):
    """Σ_j tile[:, j] over the selected [BLOCK, 16] entries: one column per row."""
    return tl.sum(tl.where(selected, tile, 0.0), axis=1)


@triton.jit
def _jacobi_kernel(u_ptr, m_ptr, mp_ptr, const_ptr, sn_ptr, cn_ptr, dn_ptr, am_ptr, zeta_ptr, n,
                   BLOCK: tl.constexpr, LEVELS: tl.constexpr, HAS_MP: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: tensors of 2³¹ elements fit on a GPU
    mask = offs < n
    machep = tl.load(const_ptr)
    small_m = tl.load(const_ptr + 1)
    near_one = tl.load(const_ptr + 2)
    small_mu = tl.load(const_ptr + 3)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.5)
    bad = ~((m >= 0) & (m <= 1))
    if HAS_MP:  # 1 − m held more exactly than it rounds (m near 1): m = 1 only where m' = 0
        mp = tl.load(mp_ptr + offs, mask=mask, other=0.5)
        at_one = mp <= 0
    else:
        mp = 1 - m
        at_one = m >= near_one
    mg = tl.where(bad | at_one, 0.5, m)
    mpg = tl.where(bad | at_one, 0.5, mp)

    cols = tl.arange(0, 16)
    c0 = tl.sqrt(mg)
    a_tile = tl.where(cols[None, :] == 0, 1.0, 0.0) + u[:, None] * 0
    c_tile = tl.where(cols[None, :] == 0, c0[:, None], 0.0)
    a = mg * 0 + 1
    b = tl.sqrt(mpg)
    levels = tl.zeros([BLOCK], dtype=tl.int32)
    pow2 = mg * 0 + 1
    running = tl.abs(c0) > machep
    for i in tl.static_range(1, LEVELS + 1):
        c_new = (a - b) / 2
        b_new = tl.sqrt(a * b)
        a = (a + b) / 2
        b = b_new
        a_tile = tl.where(cols[None, :] == i, a[:, None], a_tile)
        c_tile = tl.where(cols[None, :] == i, c_new[:, None], c_tile)
        levels += running.to(tl.int32)
        pow2 = tl.where(running, pow2 * 2, pow2)
        running = running & (tl.abs(c_new / a) > machep)

    phi = pow2 * _column(a_tile, cols[None, :] == levels[:, None]) * u
    prev = phi
    zeta = phi * 0
    for j in tl.static_range(0, LEVELS):
        i = LEVELS - j
        active = levels >= i
        ci = _column(c_tile, cols[None, :] == i)
        ai = _column(a_tile, cols[None, :] == i)
        sin_phi = tl.sin(phi)
        zeta = tl.where(active, zeta + ci * sin_phi, zeta)
        prev = tl.where(active, phi, prev)
        phi = tl.where(active, (_asin(ci * sin_phi / ai) + phi) / 2, phi)
    sn = tl.sin(phi)
    cn = tl.cos(phi)
    dn_factor = tl.cos(phi - prev)
    dn = tl.where(tl.abs(dn_factor) < 0.1, tl.sqrt(mpg + mg * cn * cn), cn / dn_factor)  # 1 − m sn² = m' + m cn²
    dn = tl.where(levels == 0, 1.0, dn)

    # m < 1e-9 and m·|u| < 1e-8: first order in m (its next term grows as (m u)²)
    sin_u = tl.sin(u)
    cos_u = tl.cos(u)
    ai = 0.25 * m * (u - sin_u * cos_u)
    is_small = (m < small_m) & (m * tl.abs(u) < small_mu)
    sn = tl.where(is_small, sin_u - ai * cos_u, sn)
    cn = tl.where(is_small, cos_u + ai * sin_u, cn)
    phi = tl.where(is_small, u - ai, phi)
    dn = tl.where(is_small, 1 - 0.5 * m * sin_u * sin_u, dn)

    # m = 1 (near_one, as kexue_fast.rope.elliptic._NEAR_ONE; m' = 0): sn = tanh u, cn = dn = sech u, am = gd u
    # (sech → 0 past cosh's overflow; a first-order series in m' here gave 0·∞/∞ = NaN)
    near = at_one & ~bad
    ua = tl.where(near, u, 0.0)
    cosh = (_expm1(ua) + _expm1(-ua)) / 2 + 1
    th = _tanh(ua)
    sech = 1 / cosh
    sn = tl.where(near, th, sn)
    gd = 2 * _atan_unit(_tanh(ua / 2))  # 2 arctan(e^u) − π/2
    phi = tl.where(near, gd, phi)
    cn = tl.where(near, sech, cn)
    dn = tl.where(near, sech, dn)
    zeta = tl.where(near, th, zeta)

    nan = u * 0 + float("nan")
    tl.store(sn_ptr + offs, tl.where(bad, nan, sn), mask=mask)
    tl.store(cn_ptr + offs, tl.where(bad, nan, cn), mask=mask)
    tl.store(dn_ptr + offs, tl.where(bad, nan, dn), mask=mask)
    tl.store(am_ptr + offs, tl.where(bad, nan, phi), mask=mask)
    tl.store(zeta_ptr + offs, tl.where(bad, nan, zeta), mask=mask)


def jacobi_elliptic(u: Tensor, m: Tensor, mp: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(sn, cn, dn, am, zeta) of contiguous u, m of one shape, dtype (float32/float64) and device; 0 ≤ m ≤ 1
    (NaN elsewhere). mp: 1 − m held more exactly than it rounds (optional, like m)."""
    if u.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Jacobi kernel supports float32 and float64, got {u.dtype}")
    if m.shape != u.shape or m.dtype != u.dtype or m.device != u.device:
        raise ValueError(f"u and m must share shape, dtype and device, got {tuple(u.shape)} {u.dtype} {u.device} "
                         f"and {tuple(m.shape)} {m.dtype} {m.device}")  # fmt: skip
    if not (u.is_contiguous() and m.is_contiguous()):
        raise ValueError("u and m must be contiguous")
    if mp is not None and (
        mp.shape != m.shape or mp.dtype != m.dtype or mp.device != m.device or not mp.is_contiguous()
    ):
        raise ValueError("mp must be a contiguous tensor of m's shape, dtype and device")
    consts = torch.tensor([torch.finfo(u.dtype).eps / 2, 1e-9, 1.0, 1e-8], dtype=u.dtype, device=u.device)
    outs = [torch.empty_like(u) for _ in range(5)]
    n = u.numel()
    if n:
        _jacobi_kernel[(triton.cdiv(n, BLOCK),)](u, m, mp if mp is not None else m, consts, *outs, n, BLOCK=BLOCK,
                                                 LEVELS=LEVELS, HAS_MP=mp is not None)  # fmt: skip
    return tuple(outs)  # type: ignore[return-value]
