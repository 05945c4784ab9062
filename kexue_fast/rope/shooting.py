"""`rope_shape`: the spinning rope with gravity, by batched shooting on the Euler–Lagrange equations
(kexue.fm "你跳绳的时候,想过绳子的形状曲线是怎样的吗?", 2019).

A rope of length L and linear density ρ, ends at (0, 0) and (0, h), spinning at ω about the y axis. In the rotating
frame each element feels the potential U per unit mass, and with the arclength s, the tangent (x', y') =
(cos θ, sin θ) and the tension T = ρ(C + U) (the Lagrange multiplier of |r'| = 1, the −ρφ of the post):
    d(T x')/ds = ρ ∂U/∂x,   d(T y')/ds = ρ ∂U/∂y   ⇔   θ' = (−∂U/∂x sin θ + ∂U/∂y cos θ) / (C + U).
gravity="axial" (the post: the axis is vertical, U = −ω²x²/2 + g y, so d(φx')/ds = ω²x, d(φy')/ds = −g with
φ = ω²x²/2 − g y = −T/ρ + C) and gravity="radial" (the skipping rope at the bottom of its turn: gravity pulls away
from the axis, U = −ω²x²/2 − g x; at ω = 0 the rope hangs as the catenary x = c (cosh(h/2c) − cosh((y − h/2)/c)),
L = 2c sinh(h/2c)). Unknowns θ(0) and C; conditions x(L) = 0, y(L) = h. Newton with a forward-difference Jacobian,
the classical Runge–Kutta method (RK4) in s, and continuation in g/(ω²h + g) from the exact troposkein (g = 0).
Shapes: L, h, omega, g broadcast to a batch [...]; the curve is sampled at n_points equally spaced arclengths.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Tuple, Union

import torch
from torch import Tensor

from . import elliptic
from .troposkein import _ComplementaryParameter, rope_arguments

Scalar = Union[Tensor, float]
GRAVITY = ("axial", "radial")


class RopeShape(NamedTuple):
    """The rope at n_points equally spaced arclengths s [..., n]: positions x, y, tension T; theta0 the angle of
    the tangent at (0, 0) from the x axis; residual max(|x(L)|, |y(L) − h|)/h of the shooting (converged: ≤ tol)."""

    s: Tensor
    x: Tensor
    y: Tensor
    tension: Tensor
    theta0: Tensor
    residual: Tensor


def _rhs(state: Tensor, c: Tensor, w2: Tensor, gg: Tensor, radial: bool) -> Tensor:
    """d/ds of (x, y, θ) [3, ...] in units of h and ω²h² + g h."""
    x, y, theta = state[0], state[1], state[2]
    sin_t, cos_t = torch.sin(theta), torch.cos(theta)
    if radial:
        potential = -0.5 * w2 * x * x - gg * x
        force_normal = (w2 * x + gg) * sin_t  # −∂U/∂x sin θ + ∂U/∂y cos θ with ∂U/∂y = 0
    else:
        potential = -0.5 * w2 * x * x + gg * y
        force_normal = w2 * x * sin_t + gg * cos_t
    return torch.stack((cos_t, sin_t, force_normal / (c + potential)))


def _integrate(theta0: Tensor, c: Tensor, w2: Tensor, gg: Tensor, ell: Tensor, n_steps: int, radial: bool,
               record_every: int = 0) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """RK4 from (0, 0, θ0) over s ∈ [0, ℓ]: the end state [3, ...] and, with record_every > 0, the states at every
    record_every-th step [n_steps / record_every + 1, 3, ...]."""
    state = torch.stack((torch.zeros_like(theta0), torch.zeros_like(theta0), theta0))
    step = ell / n_steps
    half = step / 2
    records = [state] if record_every else []
    for i in range(1, n_steps + 1):
        k1 = _rhs(state, c, w2, gg, radial)
        k2 = _rhs(state + half * k1, c, w2, gg, radial)
        k3 = _rhs(state + half * k2, c, w2, gg, radial)
        k4 = _rhs(state + step * k3, c, w2, gg, radial)
        state = state + (step / 6) * (k1 + 2 * (k2 + k3) + k4)
        if record_every and i % record_every == 0:
            records.append(state)
    return state, (torch.stack(records) if record_every else state)


def _troposkein_start(ell: Tensor) -> Tuple[Tensor, Tensor]:
    """(θ0, C) of the exact g = 0 solution in units of h and ω²h²: tan θ0 = h / (2K R), C = T(0)/(ρω²h²) = a/(2h²)."""
    q = _ComplementaryParameter.apply(ell)
    m = 1 - q
    big_k, _ = elliptic._agm_ke(m, q)
    radius = torch.sqrt(m) / (q * big_k)
    theta0 = torch.atan2(torch.ones_like(radius), 2 * big_k * radius)
    c = (1 + m) / (4 * q * q * big_k * big_k)
    return theta0, c


def _newton(theta0, c, w2, gg, ell, n_steps, radial, iterations, tol=None):
    """Newton steps on (θ0, C) for x(ℓ) = 0, y(ℓ) = 1; the Jacobian by forward differences in one batched pass."""
    for _ in range(iterations):
        d_theta = 1e-7
        d_c = 1e-7 * c.abs().clamp_min(1e-3)
        thetas = torch.stack((theta0, theta0 + d_theta, theta0))
        cs = torch.stack((c, c, c + d_c))
        end, _ = _integrate(thetas, cs, w2, gg, ell, n_steps, radial)
        residual = torch.stack((end[0], end[1] - 1))  # [2, 3, ...]
        r0 = residual[:, 0]
        j_theta = (residual[:, 1] - r0) / d_theta
        j_c = (residual[:, 2] - r0) / d_c
        det = j_theta[0] * j_c[1] - j_c[0] * j_theta[1]
        step_theta = (j_c[1] * r0[0] - j_c[0] * r0[1]) / det
        step_c = (-j_theta[1] * r0[0] + j_theta[0] * r0[1]) / det
        # a damped step: far from the root the linearization overshoots past θ = ±π/2 or through C + U = 0
        scale = torch.clamp(0.5 / step_theta.abs().clamp_min(1e-300), max=1.0)
        scale = torch.minimum(scale, torch.clamp(0.5 * c.abs() / step_c.abs().clamp_min(1e-300), max=1.0))
        theta0 = theta0 - scale * step_theta
        c = c - scale * step_c
        # an empty batch: nothing to solve
        if tol is not None and (r0.numel() == 0 or float(r0.detach().abs().amax()) <= tol):
            break
    return theta0, c


def _check_resolution(
    x: Tensor,
    y: Tensor,
    theta0: Tensor,
    c: Tensor,
    w2: Tensor,
    gg: Tensor,
    ell: Tensor,
    n_steps: int,
    record: int,
    radial: bool,
    max_iter: int,
    tol: float,
    accuracy: float,
) -> None:
    """Raises RuntimeError where the RK4 error of the solved shape, estimated by Richardson's rule from a solve with
    half the steps (|r_n − r_{n/2}|/15 for a fourth-order method, in units of h), exceeds `accuracy`: the boundary
    residual alone cannot see it (a long rope at too few steps meets x(L) = 0, y(L) = h on a wrong shape, and near
    the collapse under axial gravity a solve can meet them on an unresolved fold)."""
    with torch.no_grad():  # a check: no graph through the second solve
        args = (w2.detach(), gg.detach(), ell.detach(), n_steps // 2, radial)
        half_theta0, half_c = _newton(theta0.detach(), c.detach(), *args, max_iter, tol)
        _, half = _integrate(half_theta0, half_c, *args, record_every=record // 2)
        gap = torch.maximum((x.detach() - half[:, 0]).abs().amax(0), (y.detach() - half[:, 1]).abs().amax(0))
    estimate = (gap / 15).nan_to_num(float("inf"))
    if bool((estimate <= accuracy).all()):
        return
    failed = ~(estimate <= accuracy)
    worst = float(estimate[failed].max())
    needed = "" if worst == float("inf") else f" (about {math.ceil(1.25 * n_steps * (worst / accuracy) ** 0.25)})"
    raise RuntimeError(
        f"rope_shape's solution is not resolved for {int(failed.sum())} of {failed.numel()} parameter sets: the RK4 "
        f"error of x, y estimated from a solve with n_steps / 2 is {worst:.2e} h > accuracy = {accuracy:g} (the "
        f"boundary conditions were met): raise n_steps (now {n_steps}){needed} or loosen accuracy; with axial gravity "
        "near g ≈ ω²h the rope may also be collapsing onto the axis, where no smooth equilibrium exists"
    )


def rope_shape(
    L: Scalar,
    h: Scalar,
    omega: Scalar,
    g: Scalar = 9.81,
    *,
    gravity: str = "axial",
    density: Scalar = 1.0,
    n_points: int = 129,
    n_steps: int = 1024,
    tol: float = 1e-11,
    accuracy: float = 1e-6,
    max_iter: int = 30,
    continuation_steps: int = 8,
) -> RopeShape:
    """The equilibrium of a rope of length L > h between (0, 0) and (0, h) on an axis spinning at ω, with gravity g.

    L, h, omega, g (and density): floats or tensors broadcasting to a batch [...], solved together (float64).
    gravity: "axial" (the axis vertical, as in the post) or "radial" (gravity pointing away from the axis in the
    rope's plane: the skipping rope at its lowest point; ω = 0 gives the catenary). g = 0 gives the troposkein
    for either. n_points ≥ 2 samples at equal arclength; n_steps RK4 steps (an even multiple of n_points − 1 is
    used; the error falls as n_steps⁻⁴). Raises RuntimeError when the shooting does not meet the boundary conditions
    to tol (scaled by h), or when the shape is not resolved to `accuracy` (in units of h; the RK4 error of x and y
    estimated from a second solve with half the steps, Richardson's |r_n − r_{n/2}|/15: it costs about half a solve
    more): too few steps for the rope (much longer, or barely longer, than h), or axial gravity near or beyond
    g ≈ ω²h, where the rope collapses onto the axis and no smooth solution exists (ValueError for axial gravity with
    ω = 0). Radial gravity is an idealization: a force fixed in the rotating frame (the lowest point of a skipping
    rope's turn held for good), not gravity on a rope that turns through it. Differentiable in the parameters by
    autograd through the Newton and RK4 loops (memory grows with max_iter·n_steps).
    """
    if gravity not in GRAVITY:
        raise ValueError(f'gravity must be "axial" or "radial", got {gravity!r}')
    for name, value in (("n_points", n_points), ("n_steps", n_steps), ("max_iter", max_iter),
                        ("continuation_steps", continuation_steps)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "n_points" else 1):
            raise ValueError(f"{name} must be an int >= {2 if name == 'n_points' else 1}, got {value!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf:
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    length, span, omega_t, g_t, density_t = rope_arguments(L, h, (omega, "omega"), (g, "g"), (density, "density"))
    if not bool((density_t > 0).all()):
        raise ValueError("density must be > 0")
    energy = omega_t**2 * span**2 + g_t * span  # the unit of U: ω²h² + g h
    if not bool((energy > 0).all()):
        raise ValueError("omega and g cannot both be 0: without any force every curve of length L is an equilibrium")
    radial = gravity == "radial"
    if not radial and bool(((omega_t == 0) & (g_t > 0)).any()):
        raise ValueError("omega must be > 0 with axial gravity: a rope that does not spin hangs folded onto the axis, "
                         "which has no smooth equilibrium (the shooting could still meet its boundary conditions "
                         "on an unresolved fold)")  # fmt: skip
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0 < accuracy < math.inf:
        raise ValueError(f"accuracy must be a finite number > 0, got {accuracy!r}")
    ell = length / span
    gg_target = g_t * span / energy
    record = 2 * max(1, math.ceil(n_steps / (2 * (n_points - 1))))  # even: the check's half-step solve records too
    n_steps = record * (n_points - 1)

    theta0, c = _troposkein_start(ell)
    stages = continuation_steps if bool((gg_target > 0).any()) else 1  # g = 0: the start is already exact
    for j in range(1, stages + 1):
        gg = gg_target * (j / stages)
        last = j == stages
        # intermediate stages only need to stay inside the next stage's basin: a loose tolerance, fewer steps
        theta0, c = _newton(theta0, c, 1 - gg, gg, ell, n_steps if last else max(64, n_steps // 4), radial,
                            max_iter if last else 8, tol if last else 1e-6)  # fmt: skip
    w2 = 1 - gg_target
    _, states = _integrate(theta0, c, w2, gg_target, ell, n_steps, radial, record_every=record)
    x, y = states[:, 0], states[:, 1]
    residual = torch.maximum(x[-1].abs(), (y[-1] - 1).abs())
    if bool((residual <= tol).all()):
        _check_resolution(x, y, theta0, c, w2, gg_target, ell, n_steps, record, radial, max_iter, tol, accuracy)
    else:
        failed = ~(residual <= tol)
        worst = float(residual.detach()[failed].nan_to_num(float("inf")).max())
        hints = [f"raise n_steps (now {n_steps}: the RK4 error falls as n_steps⁻⁴, and ropes much longer or barely "
                 "longer than h need finer steps) or loosen tol"]  # fmt: skip
        if not radial and bool((g_t[failed] > 0).any()):
            hints.append(
                "with axial gravity near or beyond g ≈ ω²h the rope folds onto the axis and has no smooth equilibrium"
            )
        raise RuntimeError(
            f"rope_shape did not converge for {int(failed.sum())} of {failed.numel()} parameter sets (largest boundary "
            f"residual {'NaN: the shooting diverged' if worst == float('inf') else f'{worst:.2e}'} > tol = {tol:g} "
            f"after {max_iter} Newton steps): " + "; ".join(hints)
        )
    potential = -0.5 * w2 * x * x + (-gg_target * x if radial else gg_target * y)
    tension = density_t * energy * (c + potential)
    s = torch.linspace(0, 1, n_points, dtype=torch.float64, device=ell.device)
    move = (lambda t: t.movedim(0, -1)) if x.ndim > 1 else (lambda t: t)
    return RopeShape(
        s=length[..., None] * s, x=move(x) * span[..., None], y=move(y) * span[..., None], tension=move(tension),
        theta0=theta0, residual=residual,
    )  # fmt: skip
