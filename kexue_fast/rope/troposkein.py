"""The troposkein: the shape of a rope of length L spun at ω about an axis through its two ends, a distance h apart,
without gravity (kexue.fm "你跳绳的时候,想过绳子的形状曲线是怎样的吗?", 2019; Nordmark & Essén, "The skipping rope
curve", Eur. J. Phys. 28, 2007).

With y along the axis (0 ≤ y ≤ h) and x the distance from it, the equilibrium of the tension T and the centrifugal
force ρω²x gives (m = k², m' = 1 − m, K = K(m), E = E(m))
    x(y) = R sn(2K y / h | m),    R / h = k / (m' K),    L / h = 2E / (m' K) − 1,
independent of ω: L/h fixes m (the right side grows from 1 at m = 0 to ∞ at m → 1). The tension is
    T(y) = ρ ω² (a − x²) / 2,   a = h² (1 + m) / (2 m'² K²),
its axial component ρω²h² / (4 m' K²) is constant, and the arclength from (0, 0) is
    s(y) = h (E(am v | m) − m' v / 2) / (m' K),   v = 2K y / h.
Shapes: L and h broadcast to a batch shape [...]; the curve is sampled at n_points values of y, [..., n_points].
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import elliptic
from .jacobi import ellipj_with_zeta

Scalar = Union[Tensor, float]
_BISECTION_STEPS = 40  # on log m' ∈ [−720, 0]: a bracket of 7e-10, then Newton steps to full precision
_NEWTON_STEPS = 3


class Troposkein(NamedTuple):
    """The troposkein of each (L, h): the curve x(y) at the points y, the tension, the arclength s(y) and the
    constants of the closed form (k the modulus, m = k², radius R = max x, axial_tension the constant axial part)."""

    y: Tensor
    x: Tensor
    tension: Tensor
    s: Tensor
    k: Tensor
    m: Tensor
    radius: Tensor
    axial_tension: Tensor


def _length_ratio(q: Tensor) -> Tensor:
    """L/h = 2E/(m'K) − 1 as a function of m' = q (m = 1 − q)."""
    k, e = elliptic._agm_ke(1 - q, q)
    return 2 * e / (q * k) - 1


def _length_ratio_derivative(q: Tensor) -> Tensor:
    """d(L/h)/dm' = 2 (E_q m' K − E (K + m' K_q)) / (m'K)² with K_q = −dK/dm, E_q = −dE/dm."""
    m = 1 - q
    k, e = elliptic._agm_ke(m, q)
    dk, de = elliptic._ke_derivatives(m, k, e, q)  # m′ = q exactly: 1 − m loses its digits for long ropes
    return 2 * (-de * q * k - e * (k - q * dk)) / (q * k) ** 2


class _ComplementaryParameter(torch.autograd.Function):
    """m' solving 2E/(m'K) − 1 = ratio: bisection on log m' (monotone, no host sync), gradient by the implicit
    function theorem dm'/dratio = 1 / f'(m')."""

    @staticmethod
    def forward(ctx, ratio: Tensor) -> Tensor:
        lo = torch.full_like(ratio, -720.0)  # log m'; f(e^-720) ≈ 1e312 exceeds any finite float64 ratio
        hi = torch.zeros_like(ratio)
        for _ in range(_BISECTION_STEPS):
            mid = (lo + hi) / 2
            too_long = _length_ratio(torch.exp(mid)) > ratio  # f decreases in m': the root lies above mid
            lo = torch.where(too_long, mid, lo)
            hi = torch.where(too_long, hi, mid)
        t = (lo + hi) / 2
        for _ in range(_NEWTON_STEPS):  # in t = log m': d f/dt = m' f'(m'); kept inside the bracket
            q = torch.exp(t)
            step = (_length_ratio(q) - ratio) / (q * _length_ratio_derivative(q))
            t = torch.clamp(t - step, lo, hi)
        q = torch.exp(t)
        ctx.save_for_backward(q)
        return q

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (q,) = ctx.saved_tensors
        return grad / _length_ratio_derivative(q)


class _CompleteOfComplement(torch.autograd.Function):
    """(K, E) as functions of m' = q itself: near m = 1 (a long rope, L/h ≳ 1e6) rounding m = 1 − q would cost
    q's low digits (relative 1e-5 at q = 1e-11), and the solve of L/h holds q to full precision."""

    @staticmethod
    def forward(ctx, q: Tensor) -> Tuple[Tensor, Tensor]:
        k, e = elliptic._agm_ke(1 - q, q)
        ctx.save_for_backward(q, k, e)
        return k, e

    @staticmethod
    def backward(ctx, gk: Tensor, ge: Tensor) -> Tensor:
        q, k, e = ctx.saved_tensors
        dk, de = elliptic._ke_derivatives(1 - q, k, e, q)  # d/dq = −d/dm
        return -(gk * dk + ge * de)


def _positive(t: Scalar, name: str) -> Tensor:
    if isinstance(t, Tensor):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise ValueError(f"{name} must be finite and > 0, got {t}")
        return t
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"{name} must be a torch.Tensor or a real number, got {type(t).__name__}")
    if not (0 < float(t) < float("inf")):
        raise ValueError(f"{name} must be finite and > 0, got {t!r}")
    return torch.tensor(float(t), dtype=torch.float64)


def rope_arguments(L: Scalar, h: Scalar, *others: Tuple[Scalar, str]) -> Tuple[Tensor, ...]:
    """Validated float64 tensors of one broadcast shape: L > h > 0 and the extra (value, name) pairs (≥ 0)."""
    length = _positive(L, "L")
    span = _positive(h, "h")
    extra = []
    for value, name in others:
        if isinstance(value, Tensor):
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
            if not bool(torch.isfinite(value).all()) or not bool((value >= 0).all()):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a torch.Tensor or a real number, got {type(value).__name__}")
        elif not (0 <= float(value) < float("inf")):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        extra.append(value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64))
    tensors = [length, span, *extra]
    given = [L, h, *(value for value, _ in others)]
    devices = {t.device for t in given if isinstance(t, Tensor)}  # Python numbers follow the tensors' device
    if len(devices) > 1:
        raise ValueError(f"L, h and the other parameters must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    out = elliptic.broadcast_named([t.to(device=device, dtype=torch.float64) for t in tensors],
                                   ["L", "h", *(name for _, name in others)], "one batch shape")  # fmt: skip
    if not bool((out[0] > out[1]).all()):
        raise ValueError(
            "L must be greater than h: a rope no longer than the distance between its ends cannot bulge "
            f"(got L = {L}, h = {h})"
        )
    return out


def troposkein(
    L: Scalar,
    h: Scalar,
    n_points: int = 129,
    *,
    y: Optional[Tensor] = None,
    omega: Scalar = 1.0,
    density: Scalar = 1.0,
    backend: str = "auto",
) -> Troposkein:
    """The troposkein x = R sn(2K y/h | m) of a rope of length L > h between (0, 0) and (0, h) on the rotation axis.

    L, h: positive floats or tensors broadcasting to a batch shape [...] (a parameter sweep); the result is float64.
    n_points: samples y = h·linspace(0, 1, n_points) (ignored when `y` [..., n] is given: the heights to evaluate
    at, 0 ≤ y ≤ h, else ValueError). omega, density: only scale the tension T = ρω²(a − x²)/2 (the shape does not
    depend on them).
    backend: for the Jacobi functions ("auto", "triton", "torch"; see `kexue_fast.rope.ellipj`).
    Differentiable in L, h, omega, density (m by the implicit function theorem); s carries no gradient.
    m' = 1 − m is solved to full precision (K, E from m' itself); the Jacobi functions take m, whose rounding near 1
    (long ropes: m' = 1e-13 at L/h = 1e12) they absorb by reading sn at the same fraction of m's own quarter
    period, so x(0) = x(h) = 0, x(h/2) = R, s(h) = L and the curve's symmetry hold to rounding at every L/h up to
    ~1.8e15, where m rounds to 1 in float64 (ValueError beyond).
    """
    _positive(omega, "omega")
    _positive(density, "density")
    length, span, omega_t, density_t = rope_arguments(L, h, (omega, "omega"), (density, "density"))
    if y is None:
        if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
            raise ValueError(f"n_points must be an int >= 2, got {n_points!r}")
        grid = torch.linspace(0, 1, n_points, dtype=torch.float64, device=length.device)
        y = span[..., None] * grid
    else:
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise TypeError("y must be a floating tensor of heights [..., n]")
        y = y.to(device=length.device, dtype=torch.float64)
        if y.ndim < 1:
            raise ValueError("y must be a tensor of heights [..., n] (n >= 1), got a 0-d tensor")
        span_, slack = span[..., None], 1e-9 * span[..., None]  # a rounding's slack: heights from a numerical solve
        try:
            inside = bool(((y >= -slack) & (y <= span_ + slack)).all())
        except RuntimeError:
            raise ValueError(f"y [..., n] must broadcast with the batch of L, h {tuple(span.shape)}, got shape "
                             f"{tuple(y.shape)}") from None  # fmt: skip
        if not inside:  # beyond the ends the formula extrapolates a curve that is not the rope's (s > L)
            raise ValueError("y must lie in [0, h] (heights along the axis between the rope's ends)")
        y = torch.minimum(y.clamp_min(0), span_)
    q = _ComplementaryParameter.apply(length / span)
    m = 1 - q
    if bool((m >= 1).any()):  # m' < 2^-54: K(m) = inf and sn of inf·fraction is NaN
        raise ValueError(f"L/h must be below ~1.8e15 (there the troposkein's parameter m = 1 − m' rounds to 1 in "
                         f"float64), got L/h up to {float((length / span).max()):.3g}")  # fmt: skip
    big_k = _CompleteOfComplement.apply(q)[0]
    k_mod = torch.sqrt(m)
    radius = span * k_mod / (q * big_k)
    # The Jacobi functions take m itself, rounded from 1 − m' (relative 1e-3 of m' at L/h = 1e12): they are
    # evaluated at the same fraction of *that* parameter's quarter period K_m, so that sn(K_m | m) = 1 and
    # Z(K_m | m) = 0 hold as they should; the upper half by the reflections sn(2K − v) = sn(v), s(h − y) = L − s(y)
    # (identities for every v): the curve is symmetric to the last bit and back on the axis at y = h.
    k_m = elliptic.ellipk(m)
    upper = y > span[..., None] / 2
    fraction = 2 * torch.where(upper, span[..., None] - y, y) / span[..., None]  # v / K on the lower half
    v_m = k_m[..., None] * fraction
    m_grid = m[..., None].expand_as(v_m)
    jac, zeta = ellipj_with_zeta(v_m, m_grid, backend=backend)
    x = radius[..., None] * jac.sn
    a = span**2 * (1 + m) / (2 * q**2 * big_k**2)
    scale = density_t * omega_t**2 / 2
    tension = scale[..., None] * (a[..., None] - x * x)
    axial = density_t * omega_t**2 * span**2 / (4 * q * big_k**2)
    with torch.no_grad():  # s(y) = h (E(am v | m) − m'v/2) / (m'K), E(am v | m) = Z(v) + (E/K) v; no gradient
        q_, k_ = q[..., None], big_k[..., None]
        e_m = elliptic.ellipe(m)[..., None]
        incomplete = zeta + e_m * fraction  # E(am v | m) = Z + (E/K_m) v_m at v_m = fraction · K_m
        s_low = span[..., None] * (incomplete - q_ * k_ * fraction / 2) / (q_ * k_)
        s = torch.where(upper, length[..., None] - s_low, s_low)
    return Troposkein(y, x, tension, s, k_mod, m, radius, axial)


def length_ratio(m: Scalar) -> Tensor:
    """L/h = 2E(m)/((1 − m)K(m)) − 1 of the troposkein with parameter m ∈ [0, 1] (inf at m = 1); a ValueError
    outside it (checked on the host: one sync for a GPU tensor)."""
    (m_t,) = elliptic._promote(elliptic._floating(m, "m"))
    if not bool(((m_t >= 0) & (m_t <= 1)).all()):
        raise ValueError(f"m must lie in [0, 1] (the troposkein's parameter), got {m!r}")
    k, e = elliptic.ellipke(m_t)
    return torch.where(m_t == 1, math.inf, 2 * e / ((1 - m_t) * k) - 1)  # m = 1: (1 − m)K = 0·∞
