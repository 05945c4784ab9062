"""Complete elliptic integrals K(m), E(m) and the Jacobi elliptic functions sn, cn, dn, am in pure torch: batched,
float64-exact (they match SciPy's ``ellipk``, ``ellipe``, ``ellipj`` to ~1e-15), differentiable.

Parameter convention: m = k² (as SciPy, Abramowitz & Stegun §16–17), m' = 1 − m.

    K(m) = ∫₀^{π/2} dθ / √(1 − m sin²θ) = π / (2 AGM(1, √m'))
    E(m) = ∫₀^{π/2} √(1 − m sin²θ) dθ   = K(m) (1 − Σ_{n≥0} 2^{n−1} c_n²),  c₀² = m
with the arithmetic–geometric mean a_{n+1} = (a_n + b_n)/2, b_{n+1} = √(a_n b_n), c_{n+1} = (a_n − b_n)/2,
a₀ = 1, b₀ = √m' (A&S 17.6). The Jacobi functions of u = F(φ | m) (φ = am(u | m)) come from the descending Landen
transformation (A&S 16.4, the algorithm of Cephes ``ellpj`` that SciPy runs): φ_N = 2^N a_N u, then
φ_{n−1} = (φ_n + arcsin(c_n sin φ_n / a_n)) / 2, and sn = sin φ₀, cn = cos φ₀, dn = cn / cos(φ₁ − φ₀), with
the first-order series in m for m < 1e-9 where also m·|u| < 1e-8 (its error grows as (m u)²: Cephes takes it for
every u) and the closed forms at m = 1 (Cephes also takes a series for m ≥ 1 − 1e-10, wrong for large u: not here).
The same pass gives the Jacobi zeta function Z(u | m) = Σ_{n=1}^{N} c_n sin φ_n (A&S §17.6, with the same φ_n), and
so the incomplete integral E(am u | m) = Z(u) + (E/K) u.

Derivatives (DLMF 19.4.1, 22.13.1 and ∂am/∂m by implicit differentiation of u = F(am u | m)):
    dK/dm = (E − m'K) / (2 m m'),  dE/dm = (E − K) / (2m)
    ∂sn/∂u = cn dn,  ∂cn/∂u = −sn dn,  ∂dn/∂u = −m sn cn,  ∂am/∂u = dn
    ∂am/∂m = D = (dn (m'u − E(am u | m)) + m sn cn) / (2 m m'),
    ∂sn/∂m = cn D,  ∂cn/∂m = −sn D,  ∂dn/∂m = −(sn² + 2m sn cn D) / (2 dn)
(D's closed form cancels for small m: its relative error grows like ε/m, ~1e-10 at m = 1e-6; for m < 1e-9 the
series limit (sin u cos u − u)/4 is used).
Shapes: every function broadcasts its arguments (u [...], m [...] or a float) and returns tensors of the broadcast
shape in the floating dtype of the inputs.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._autograd import first_order, transformed

_DOUBLE_BACKWARD = {"op": "the Jacobi elliptic functions (ellipj, and troposkein's shape)"}  # first_order's message

Param = Union[Tensor, float]

_AGM_STEPS = 12  # quadratic convergence: enough for √m' down to 1e-8 (m' ≥ 2^-53) and for m down to −1e30
_LANDEN_LEVELS = 8  # Cephes ellpj stops after 8 halvings (it converges in ≤ 6 for m ≤ 1 − 2^-53)
_SMALL_M = 1e-9  # below: first-order series in m (Cephes), where also m·|u| < _SMALL_MU
_SMALL_MU = 1e-8  # the series' next term grows as (m u)²: past this the Landen path (sn to ~|u|·eps, as at large m)
# At m = 1: sn = tanh u, cn = dn = sech u. Cephes (and so SciPy) also takes the first-order series in m' for
# m ≥ 1 − 1e-10, which fails once m' cosh² u is not small (sn(2K | 1 − 1e-11) = 1 instead of 0); the Landen
# transformation is accurate up to m' = 2^-53 (≤ 3e-13 against mpmath, tests/test_rope.py), so it runs there.
_NEAR_ONE = 1.0
_SERIES_M = 1e-2  # |m| below: the derivatives of K, E by their Maclaurin series (the closed forms cancel)


class Jacobi(NamedTuple):
    """sn, cn, dn and the amplitude am = φ of (u, m)."""

    sn: Tensor
    cn: Tensor
    dn: Tensor
    am: Tensor


def _floating(t: Param, name: str) -> Tuple[Union[Tensor, float], str]:
    """(t, name) checked: a real floating tensor or a real number (kept a float: it adopts the tensors' dtype)."""
    if isinstance(t, Tensor):
        if not (t.is_floating_point() and t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)):
            raise TypeError(f"{name} must be a real floating tensor, got dtype {t.dtype}")
        if transformed(t):
            raise NotImplementedError(
                f"{name}: kexue_fast.rope's functions cannot run under torch.func transforms (grad, vmap, jacrev...): "
                "their autograd.Functions have no setup_context, and the C++ / Triton paths read data pointers. They "
                "are elementwise over tensors of any shape: pass the whole batch, and take derivatives by autograd"
            )
        return t, name
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"{name} must be a torch.Tensor or a real number, got {type(t).__name__}")
    return float(t), name


def _promote(*given: Tuple[Union[Tensor, float], str]) -> Tuple[Tensor, ...]:
    """_floating's (value, name) pairs broadcast to one shape and one dtype: Python numbers adopt the tensors' dtype
    (0-d tensors adopt that of tensors with dimensions, as in torch's promotion), float64 when all are numbers; half
    types compute in float32. A ValueError naming the arguments where they do not broadcast or share a device."""
    ts = [t for t, _ in given if isinstance(t, Tensor)]
    tensors = [t for t in ts if t.ndim > 0 or t.requires_grad] or ts
    dtype = tensors[0].dtype if tensors else torch.float64
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    devices = {t.device for t in ts if t.ndim > 0}
    names = ", ".join(name for _, name in given)
    if len(devices) > 1:
        raise ValueError(f"{names} must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop() if devices else (ts[0].device if ts else torch.device("cpu"))
    values = [t.to(device=device, dtype=dtype) if isinstance(t, Tensor) else torch.tensor(t, dtype=dtype, device=device)
              for t, _ in given]  # fmt: skip
    return broadcast_named(values, [name for _, name in given])


def broadcast_named(values: Sequence[Tensor], names: Sequence[str], what: str = "one shape") -> Tuple[Tensor, ...]:
    """torch.broadcast_tensors, with a ValueError naming the arguments and their shapes where they do not broadcast
    (torch's own names none)."""
    try:
        return tuple(torch.broadcast_tensors(*values))
    except RuntimeError:
        shapes = ", ".join(f"{name} {tuple(v.shape)}" for name, v in zip(names, values))
        raise ValueError(f"{', '.join(names)} must broadcast to {what}, got {shapes}") from None


def _may_sync(t: Tensor) -> bool:
    """Early exits read a flag back: cheap on CPU, avoided on CUDA (no host sync) and under torch.compile."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


# --- K and E ---------------------------------------------------------------------------------------------------


def _agm_ke(m: Tensor, mp: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(K, E) for m ≤ 1 (NaN above); K(1) = inf, E(1) = 1. `mp` = 1 − m when the caller holds it more exactly than
    1 − m can be rounded (m near 1)."""
    bad = ~(m <= 1)
    mm = torch.where(bad, torch.zeros_like(m), m)
    a = torch.ones_like(mm)
    b = torch.sqrt(1 - mm if mp is None else torch.where(bad, torch.ones_like(mp), mp))
    weight = 0.5
    s = 0.5 * mm  # Σ 2^{n−1} c_n², n = 0 term
    tiny = torch.finfo(m.dtype).eps
    for _ in range(_AGM_STEPS):
        c = (a - b) / 2
        a, b = (a + b) / 2, torch.sqrt(a * b)
        weight *= 2
        s = s + weight * c * c
        # on CPU a host check is cheap and saves the passes after convergence; on CUDA the loop stays sync-free
        if _may_sync(m) and bool((c.abs() <= tiny * a).all()):
            break
    one = (mm == 1) if mp is None else (mp == 0)
    k = torch.where(one, torch.full_like(mm, float("inf")), torch.pi / (2 * a))
    e = torch.where(one, torch.ones_like(mm), k * (1 - s))
    nan = torch.full_like(m, float("nan"))
    return torch.where(bad, nan, k), torch.where(bad, nan, e)


def _series_coefficients(n_terms: int) -> Tuple[float, ...]:
    """c_n² = ((2n−1)!! / (2n)!!)², n = 0..n_terms−1: K = (π/2) Σ c_n² mⁿ, E = (π/2) Σ c_n² mⁿ / (1 − 2n)."""
    out, c = [], 1.0
    for n in range(n_terms):
        if n > 0:
            c *= (2 * n - 1) / (2 * n)
        out.append(c * c)
    return tuple(out)


_C2 = _series_coefficients(12)


def _ke_derivatives(m: Tensor, k: Tensor, e: Tensor, mp: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(dK/dm, dE/dm): the closed forms, and their Maclaurin series for |m| < 1e-2 where the closed forms cancel.
    `mp` = 1 − m when the caller holds it more exactly (m near 1)."""
    mp = 1 - m if mp is None else mp
    safe_m = torch.where(m == 0, torch.ones_like(m), m)
    dk = torch.where(mp <= 0, torch.full_like(m, math.inf), (e - mp * k) / (2 * safe_m * mp))  # +∞ at m = 1
    de = (e - k) / (2 * safe_m)
    sdk = torch.zeros_like(m)
    sde = torch.zeros_like(m)
    for n in range(len(_C2) - 1, 0, -1):  # Horner in m over n = 1..N of n c_n² m^{n−1} and n c_n²/(2n−1) m^{n−1}
        sdk = sdk * m + n * _C2[n]
        sde = sde * m + n * _C2[n] / (2 * n - 1)
    small = m.abs() < _SERIES_M
    half_pi = torch.pi / 2
    return torch.where(small, half_pi * sdk, dk), torch.where(small, -half_pi * sde, de)


class _CompleteIntegrals(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m: Tensor) -> Tuple[Tensor, Tensor]:
        k, e = _agm_ke(m)
        ctx.save_for_backward(m, k, e)
        return k, e

    @staticmethod
    def backward(ctx, gk: Tensor, ge: Tensor) -> Tensor:
        m, k, e = ctx.saved_tensors
        dk, de = _ke_derivatives(m, k, e)
        # a zero upstream gradient contributes 0 even where the derivative is infinite (m = 1): not 0·∞ = NaN
        return torch.where(gk == 0, 0.0, gk * dk) + torch.where(ge == 0, 0.0, ge * de)


def ellipke(m: Param) -> Tuple[Tensor, Tensor]:
    """(K(m), E(m)) from one AGM pass; m ≤ 1 (NaN above, as SciPy), K(1) = inf, E(1) = 1. Differentiable in m
    (the derivative is infinite at m = 1)."""
    (m,) = _promote(_floating(m, "m"))
    return _CompleteIntegrals.apply(m)


def ellipk(m: Param) -> Tensor:
    """The complete elliptic integral of the first kind K(m) = ∫₀^{π/2} (1 − m sin²θ)^{−1/2} dθ (SciPy ``ellipk``)."""
    return ellipke(m)[0]


def ellipe(m: Param) -> Tensor:
    """The complete elliptic integral of the second kind E(m) = ∫₀^{π/2} (1 − m sin²θ)^{1/2} dθ (SciPy ``ellipe``)."""
    return ellipke(m)[1]


# --- sn, cn, dn --------------------------------------------------------------------------------------------------


def _landen(u: Tensor, m: Tensor, mp: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(sn, cn, dn, am, zeta) of broadcast u, m by Cephes' ellpj (NaN for m outside [0, 1]). `mp` = 1 − m when the
    caller holds it more exactly than 1 − m rounds (m near 1: DLMF 22.17's μ for a very negative parameter)."""
    machep = torch.finfo(u.dtype).eps / 2
    bad = ~((m >= 0) & (m <= 1))
    # m = 1 itself: the closed forms; with m' given, only where m' = 0 (μ of a very negative m rounds to 1)
    at_one = (m >= 1) if mp is None else (mp <= 0)
    general = bad | at_one
    mg = torch.where(general, torch.full_like(m, 0.5), m)  # the general path for m < 1 (others overwritten)
    mpg = 1 - mg if mp is None else torch.where(general, torch.full_like(m, 0.5), mp)
    a_levels = [torch.ones_like(mg)]
    c_levels = [torch.sqrt(mg)]
    b = torch.sqrt(mpg)
    n_levels = torch.zeros(mg.shape, dtype=torch.int32, device=mg.device)  # Cephes' i when its loop stops
    running = (c_levels[0] / a_levels[0]).abs() > machep
    for i in range(1, _LANDEN_LEVELS + 1):
        if _may_sync(u) and not bool(running.any()):  # every element has stopped (a cheap host check on CPU)
            break
        ai = a_levels[-1]
        c_levels.append((ai - b) / 2)
        a_levels.append((ai + b) / 2)
        b = torch.sqrt(ai * b)
        n_levels = n_levels + running.to(torch.int32)
        running = running & ((c_levels[i] / a_levels[i]).abs() > machep)
    a_n = torch.stack(a_levels).gather(0, n_levels.long()[None]).squeeze(0)
    phi = torch.ldexp(a_n * u, n_levels)  # 2^N a_N u
    prev = phi
    zeta = torch.zeros_like(phi)
    for i in range(len(a_levels) - 1, 0, -1):
        active = n_levels >= i
        sin_phi = torch.sin(phi)
        zeta = torch.where(active, zeta + c_levels[i] * sin_phi, zeta)
        t = c_levels[i] * sin_phi / a_levels[i]
        prev = torch.where(active, phi, prev)
        phi = torch.where(active, (torch.asin(t) + phi) / 2, phi)
    sn = torch.sin(phi)
    cn = torch.cos(phi)
    dn_factor = torch.cos(phi - prev)
    # DLMF 22.20(ii): the quotient loses digits when cos(φ₁ − φ₀) is small; the square root is then well conditioned,
    # as 1 − m sn² = m' + m cn² (no cancellation for m near 1)
    dn = torch.where(dn_factor.abs() < 0.1, torch.sqrt(mpg + mg * cn * cn), cn / dn_factor)
    dn = torch.where(n_levels == 0, torch.ones_like(dn), dn)  # m = 0: φ = u, dn = 1

    # m < 1e-9 and m·|u| < 1e-8: sn = sin u − (m/4)(u − sin u cos u) cos u + O(m²u²), ...
    sin_u, cos_u = torch.sin(u), torch.cos(u)
    ai = 0.25 * m * (u - sin_u * cos_u)
    small = (m < _SMALL_M) & (m * u.abs() < _SMALL_MU)
    sn = torch.where(small, sin_u - ai * cos_u, sn)
    cn = torch.where(small, cos_u + ai * sin_u, cn)
    phi = torch.where(small, u - ai, phi)
    dn = torch.where(small, 1 - 0.5 * m * sin_u * sin_u, dn)

    # m = 1 (_NEAR_ONE; m' = 0): sn = tanh u, cn = dn = sech u, am = gd u = atan(sinh u), Z = tanh u (DLMF 22.5(ii));
    # sech → 0 and gd → ±π/2 past cosh's overflow (a first-order series in m' here gave 0·∞/∞ = NaN for |u| > 355)
    near = ((m >= _NEAR_ONE) if mp is None else at_one) & ~bad
    ua = torch.where(near, u, torch.zeros_like(u))
    th = torch.tanh(ua)
    sech = 1 / torch.cosh(ua)
    sn = torch.where(near, th, sn)
    phi = torch.where(near, torch.atan(torch.sinh(ua)), phi)
    cn = torch.where(near, sech, cn)
    dn = torch.where(near, sech, dn)
    zeta = torch.where(near, th, zeta)  # Z(u | 1) = tanh u

    nan = torch.full_like(sn, float("nan"))
    return tuple(torch.where(bad, nan, t) for t in (sn, cn, dn, phi, zeta))  # type: ignore[return-value]


def jacobi_m_derivative(u: Tensor, m: Tensor, sn: Tensor, cn: Tensor, dn: Tensor, zeta: Tensor,
                        mp: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """D = ∂am(u | m)/∂m = (dn (m'u − E(am u | m)) + m sn cn) / (2 m m') with E(am u | m) = Z(u) + (E/K) u;
    its m → 0 limit (sin u cos u − u)/4 below m = 1e-9. Infinite at m = 1. `mp`: m' if held more exactly."""
    k, e = _agm_ke(m, mp)
    at_one = (m >= 1) if mp is None else (mp <= 0)
    eps_u = zeta + torch.where(at_one, torch.zeros_like(m), e / k) * u
    mp = 1 - m if mp is None else mp
    safe_m = torch.where(m < _SMALL_M, torch.ones_like(m), m)
    d = (dn * (mp * u - eps_u) + m * sn * cn) / (2 * safe_m * mp)
    return torch.where(m < _SMALL_M, (torch.sin(u) * torch.cos(u) - u) / 4, d)


def jacobi_grads(u, m, sn, cn, dn, zeta, gsn, gcn, gdn, gam, need_u: bool, need_m: bool, mp=None):
    """(∂L/∂u, ∂L/∂m) from the output gradients (None entries are zero)."""
    z = torch.zeros_like(sn)
    gsn, gcn, gdn, gam = (z if g is None else g for g in (gsn, gcn, gdn, gam))
    gu = gm = None
    if need_u:
        gu = gsn * cn * dn - gcn * sn * dn - gdn * m * sn * cn + gam * dn
    if need_m:
        d = jacobi_m_derivative(u, m, sn, cn, dn, zeta, mp)
        gm = gsn * cn * d - gcn * sn * d - gdn * (sn * sn + 2 * m * sn * cn * d) / (2 * dn) + gam * d
    return gu, gm


def jacobi_save(ctx, u: Tensor, m: Tensor, outs: Tuple[Tensor, ...], mp: Optional[Tensor] = None
                ) -> Tuple[Tensor, ...]:  # fmt: skip
    """The forward's bookkeeping shared by every backend's Function (u, m and the precision aid mp = 1 − m, which
    takes no gradient: the functions depend on m alone): outs = (sn, cn, dn, am, zeta)."""
    sn, cn, dn, _am, zeta = outs
    ctx.has_mp = mp is not None
    ctx.save_for_backward(u, m, sn, cn, dn, zeta, *([mp] if mp is not None else []))
    ctx.mark_non_differentiable(zeta)
    return outs


@first_order(**_DOUBLE_BACKWARD)
def jacobi_backward(ctx, gsn, gcn, gdn, gam, _gzeta):
    """The backward shared by every backend's Function: elementwise torch on the saved values."""
    u, m, sn, cn, dn, zeta, *rest = ctx.saved_tensors
    mp = rest[0] if ctx.has_mp else None
    return (*jacobi_grads(u, m, sn, cn, dn, zeta, gsn, gcn, gdn, gam, *ctx.needs_input_grad[:2], mp=mp), None)


class _JacobiTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, m: Tensor, mp: Optional[Tensor] = None):
        return jacobi_save(ctx, u, m, _landen(u, m, mp), mp)

    backward = staticmethod(jacobi_backward)


def to_unit_parameter(u: Tensor, m: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """DLMF 22.17 for m < 0: with μ = −m/(1 − m) ∈ [0, 1) and v = √(1 − m) u, sn(u|m) = sn(v|μ)/(√(1−m) dn(v|μ)),
    cn = cn(v|μ)/dn(v|μ), dn = 1/dn(v|μ). Returns (v, μ, μ' = 1 − μ, negative mask, √(1 − m)); identity where
    m ≥ 0. μ' = 1/(1 − m) is formed directly: 1 − μ from the rounded μ would cancel (relative error ε(1 − m))."""
    negative = m < 0
    one_minus = 1 - torch.where(negative, m, torch.zeros_like(m))
    root = torch.sqrt(torch.where(negative, 1 - m, torch.ones_like(m)))
    mu = torch.where(negative, -m / one_minus, m)
    mu_c = torch.where(negative, 1 / one_minus, 1 - m).detach()
    return u * root, mu, mu_c, negative, root


def from_unit_parameter(sn, cn, dn, am, negative, root) -> Jacobi:
    """The inverse of `to_unit_parameter` on the functions (the amplitude continued across branches by π
    multiples)."""
    sn2 = sn / (root * dn)
    cn2 = cn / dn
    am0 = torch.atan2(sn, root * cn)
    am2 = am0 + torch.pi * torch.round((am - am0) / torch.pi)
    return Jacobi(*(torch.where(negative, b, a) for a, b in ((sn, sn2), (cn, cn2), (dn, 1 / dn), (am, am2))))


def ellipj_reference(u: Param, m: Param) -> Jacobi:
    """The pure-torch Jacobi functions (sn, cn, dn, am) of u with parameter m ≤ 1 (NaN above, as SciPy's
    ``ellipj``; m < 0 by DLMF 22.17); differentiable in u and in m (m < 1)."""
    u, m = _promote(_floating(u, "u"), _floating(m, "m"))
    v, mu, mu_c, negative, root = to_unit_parameter(u, m)
    return from_unit_parameter(*_JacobiTorch.apply(v, mu, mu_c)[:4], negative, root)


def jacobi_zeta(u: Param, m: Param) -> Tensor:
    """The Jacobi zeta function Z(u | m) = E(am u | m) − (E(m)/K(m)) u (no gradient)."""
    u, m = _promote(_floating(u, "u"), _floating(m, "m"))
    if bool((m < 0).any()):
        raise ValueError("jacobi_zeta is implemented for 0 <= m <= 1")
    return _landen(u.detach(), m.detach())[4]


def incomplete_ellipe_of_u(u: Param, m: Param) -> Tensor:
    """E(am u | m) = ∫₀^u dn²(t | m) dt, the incomplete integral of the second kind at the amplitude of u (no
    gradient)."""
    u, m = _promote(_floating(u, "u"), _floating(m, "m"))
    u, m = u.detach(), m.detach()
    if bool((m < 0).any()):
        raise ValueError("incomplete_ellipe_of_u is implemented for 0 <= m <= 1")
    k, e = _agm_ke(m)
    return _landen(u, m)[4] + torch.where(m >= 1, torch.zeros_like(m), e / k) * u


def check_parameter(m: Param, name: str = "m") -> None:
    """A Python-number m > 1 (or NaN) is an error; tensors give NaN there, as SciPy, without a host sync."""
    if isinstance(m, numbers.Real) and not isinstance(m, bool) and not (float(m) <= 1.0):
        raise ValueError(f"{name} must be <= 1 (the parameter m = k²), got {m!r}")
