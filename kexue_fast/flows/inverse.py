"""Inverting y = x + g(x) (Lip(g) < 1): fixed-point iteration and Anderson acceleration.

Stopping rule (both methods), per sample, on the *actual* step of the fixed-point map F(x) = y − g(x):
    ‖F(x_k) − x_k‖∞ ≤ atol + (rtol + 16ε) · ‖F(x_k)‖∞,
with ε the dtype's rounding unit: steps cannot shrink below a few ulps of x (in float32, atol = 1e-6 is at that
floor for ‖x‖∞ ≈ 3), so the floor keeps a reachable target from turning into max_iter iterations. The returned
point is F(x_k), whose error is then ‖F(x_k) − x*‖₂ ≤ Lip(g)/(1 − Lip(g)) · √d · (atol + (rtol + 16ε)‖x‖∞) for d
entries per sample (Lip(g) in the 2-norm, the step measured in ∞-norm). In half precision the floor dominates
(16ε = 16·torch.finfo(dtype).eps is 12.5% of ‖x‖∞ in bfloat16, 1.6% in float16): invert a float32 copy for a
closer inverse. (Residual Flows compares the *squared* step with its tolerance, so its "1e-5" stops at steps of
~3e-3.) Checking the rule is a host sync per iteration.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import Tensor


@dataclass
class InverseStats:
    """What the last inverse did: iterations, evaluations of g, and the largest final step ‖F(x) − x‖∞."""

    method: str
    iterations: int
    g_evals: int
    max_step: float
    converged: bool


def _step_ok(step: Tensor, new: Tensor, atol: float, rtol: float) -> Tensor:
    flat_step = step.reshape(step.shape[0], -1).abs().amax(1)
    flat_new = new.reshape(new.shape[0], -1).abs().amax(1)
    # finite first: once an iterate overflows, the right side is inf too and inf <= inf would pass
    return torch.isfinite(flat_step) & (flat_step <= atol + (rtol + 16 * torch.finfo(new.dtype).eps) * flat_new)


def _status(step: Tensor, new: Tensor, atol: float, rtol: float) -> Tuple[bool, bool]:
    """(every sample converged, every iterate finite), with one host sync."""
    ok, finite = torch.stack((_step_ok(step, new, atol, rtol).all(), torch.isfinite(new).all())).tolist()
    return bool(ok), bool(finite)


def _finish(method: str, it: int, evals: int, step: Tensor, ok: bool, atol: float, rtol: float,
            diverged: bool = False) -> InverseStats:  # fmt: skip
    max_step = float(step.abs().max()) if step.numel() else 0.0
    if diverged:
        warnings.warn(
            f"inverse ({method}) diverged after {it} iterations: an iterate is NaN or Inf, so the result is not an "
            "inverse; the fixed-point map contracts only if Lip(g) < 1",
            RuntimeWarning,
            stacklevel=3,
        )
    elif not ok:
        warnings.warn(
            f"inverse ({method}) did not converge in {it} iterations: largest step {max_step:.3e} > atol={atol} + "
            f"rtol={rtol}·‖x‖∞; is Lip(g) < 1? Raise inverse_max_iter or loosen the tolerances",
            RuntimeWarning,
            stacklevel=3,
        )
    return InverseStats(method, it, evals, max_step, ok)


@torch.no_grad()
def fixed_point(g: Callable[[Tensor], Tensor], y: Tensor, atol: float, rtol: float, max_iter: int):
    """x_{k+1} = y − g(x_k) from x_0 = y. Returns (x, InverseStats)."""
    x = y
    step = torch.zeros_like(y)
    ok, finite = False, True
    iterations = 0
    while iterations < max_iter and not ok and finite:
        new = y - g(x)
        step = new - x
        x = new
        iterations += 1
        ok, finite = _status(step, new, atol, rtol)
    return x, _finish("fixed_point", iterations, iterations, step, ok, atol, rtol, not finite)


@torch.no_grad()
def anderson(
    g: Callable[[Tensor], Tensor],
    y: Tensor,
    atol: float,
    rtol: float,
    max_iter: int,
    memory: int = 5,
    damping: float = 1.0,
):
    """Anderson acceleration (type II, Walker & Ni 2011) of F(x) = y − g(x), per sample, window `memory`.

    x_{k+1} = Σ_i α_i F(x_i) over the last m iterates, with α minimizing ‖Σ_i α_i (F(x_i) − x_i)‖₂, Σα = 1.
    Returns (x, InverseStats); the result is F of the last iterate, as for fixed_point."""
    batch = y.shape[0]
    shape = y.shape

    def F(flat: Tensor) -> Tensor:
        return (y - g(flat.reshape(shape))).reshape(batch, -1)

    x0 = y.reshape(batch, -1)
    d = x0.shape[1]
    X = y.new_zeros(batch, memory, d)
    Fx = y.new_zeros(batch, memory, d)
    X[:, 0], Fx[:, 0] = x0, F(x0)
    evals = 1
    step = Fx[:, 0] - X[:, 0]
    ok, finite = _status(step, Fx[:, 0], atol, rtol)
    if ok or not finite or max_iter == 1:
        return Fx[:, 0].reshape(shape), _finish("anderson", 1, evals, step, ok, atol, rtol, not finite)
    X[:, 1], Fx[:, 1] = Fx[:, 0], F(Fx[:, 0])
    evals += 1
    ok = False
    it = 1
    last = 1
    for it in range(2, max_iter + 1):
        n = min(it, memory)
        G = Fx[:, :n] - X[:, :n]  # residuals [B, n, d]
        gram = G @ G.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).amax(1).clamp_min(torch.finfo(y.dtype).tiny)
        gram = gram + (1e-10 * scale)[:, None, None] * torch.eye(n, dtype=y.dtype, device=y.device)
        ones = torch.ones(batch, n, 1, dtype=y.dtype, device=y.device)
        z = _solve_or_uniform(gram, ones)
        alpha = z / z.sum(1, keepdim=True)  # [B, n, 1]
        new = (alpha.transpose(1, 2) @ Fx[:, :n])[:, 0]
        if damping != 1.0:
            new = damping * new + (1 - damping) * (alpha.transpose(1, 2) @ X[:, :n])[:, 0]
        slot = it % memory
        X[:, slot] = new
        Fx[:, slot] = F(new)
        evals += 1
        last = slot
        step = Fx[:, slot] - X[:, slot]
        ok, finite = _status(step, Fx[:, slot], atol, rtol)
        if ok or not finite:
            break
    return Fx[:, last].reshape(shape), _finish("anderson", it, evals, step, ok, atol, rtol, not finite)


def fixed_point_traceable(g: Callable[[Tensor], Tensor], y: Tensor, atol: float, rtol: float, max_iter: int) -> Tensor:
    """The fixed-point inverse as a `while_loop` (one graph under torch.compile(fullgraph=True), no host sync):
    the same stopping rule, evaluated on the device. No InverseStats and no non-convergence warning (either would
    need the host)."""
    from torch._higher_order_ops.while_loop import while_loop

    def cond(i: Tensor, x: Tensor, ok: Tensor) -> Tensor:
        return (i < max_iter) & ~ok

    def body(i: Tensor, x: Tensor, ok: Tensor):
        new = y - g(x)
        return i + 1, new, _step_ok(new - x, new, atol, rtol).all()

    start = (
        torch.zeros((), dtype=torch.int64, device=y.device),
        y.clone(),
        torch.zeros((), dtype=torch.bool, device=y.device),
    )
    _, x, _ = while_loop(cond, body, start)
    return x


def _anderson_weights(X: Tensor, Fx: Tensor, valid: Tensor) -> Tensor:
    """α [B, m, 1] minimizing ‖Σ_i α_i (F(x_i) − x_i)‖₂ with Σα = 1 over the valid window slots (0 elsewhere): the
    regularized Gram system G Gᵀ z = 1, α = z / Σz, invalid slots decoupled by a unit diagonal."""
    G = Fx - X
    gram = G @ G.transpose(1, 2)
    pair = valid[:, None] & valid[None, :]
    scale = (gram.diagonal(dim1=1, dim2=2) * valid).amax(1).clamp_min(torch.finfo(X.dtype).tiny)
    eye = torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
    gram = (
        torch.where(pair, gram, torch.zeros_like(gram))
        + eye * torch.where(valid, 1e-10 * scale[:, None], 1.0)[:, :, None]
    )
    z = _solve_or_uniform(gram, torch.where(valid, 1.0, 0.0).to(X.dtype).expand(X.shape[0], -1)[..., None])
    return z / z.sum(1, keepdim=True)


def _solve_or_uniform(gram: Tensor, rhs: Tensor) -> Tensor:
    """gram⁻¹ rhs per sample; where the regularized Gram is still singular (residuals that underflow, e.g. an
    iteration that has converged to the last bit in float32), rhs itself: equal weights, no crash, no host sync."""
    wide = gram.dtype in (torch.float16, torch.bfloat16)  # no half LU on the CPU; the small system in float32
    z, info = torch.linalg.solve_ex(gram.float(), rhs.float()) if wide else torch.linalg.solve_ex(gram, rhs)
    z = z.to(rhs.dtype)
    bad = (info != 0) | ~torch.isfinite(z).all(2).all(1)
    return torch.where(bad[:, None, None], rhs, z)


def anderson_traceable(g: Callable[[Tensor], Tensor], y: Tensor, atol: float, rtol: float, max_iter: int,
                       memory: int = 5) -> Tensor:  # fmt: skip
    """`anderson` as a `while_loop` (one graph under torch.compile(fullgraph=True), no host sync): a fixed window of
    `memory` slots, the ones not yet filled masked out of the least-squares, the same stopping rule evaluated on the
    device. Returns F of the last iterate. No InverseStats and no non-convergence warning (both need the host)."""
    from torch._higher_order_ops.while_loop import while_loop

    batch, shape = y.shape[0], y.shape
    slots = torch.arange(memory, device=y.device)

    def F(flat: Tensor) -> Tensor:
        return (y - g(flat.reshape(shape))).reshape(batch, -1)

    def cond(i: Tensor, X: Tensor, Fx: Tensor, last: Tensor, ok: Tensor) -> Tensor:
        return (i < max_iter) & ~ok

    def body(i: Tensor, X: Tensor, Fx: Tensor, last: Tensor, ok: Tensor):
        alpha = _anderson_weights(X, Fx, slots < torch.clamp(i, max=memory))
        new = (alpha.transpose(1, 2) @ Fx)[:, 0]
        f_new = F(new)
        here = (slots == i % memory)[None, :, None]
        X = torch.where(here, new[:, None, :], X)
        Fx = torch.where(here, f_new[:, None, :], Fx)
        return i + 1, X, Fx, f_new, _step_ok(f_new - new, f_new, atol, rtol).all()

    x0 = y.reshape(batch, -1)
    f0 = F(x0)
    X = x0[:, None, :].expand(batch, memory, x0.shape[1]).clone()
    Fx = f0[:, None, :].expand(batch, memory, x0.shape[1]).clone()
    start = (torch.ones((), dtype=torch.int64, device=y.device), X, Fx, f0, _step_ok(f0 - x0, f0, atol, rtol).all())
    _, _, _, last, _ = while_loop(cond, body, start)
    return last.reshape(shape)
