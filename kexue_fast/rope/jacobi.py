"""`ellipj`, `ellipk`, `ellipe`: the public, dispatched Jacobi elliptic functions and complete integrals
(formulas: kexue_fast.rope.elliptic). Triton on CUDA (kernels/jacobi.py), the C++ core on CPU (csrc/rope: the same
algorithms elementwise in double precision, threaded), the torch reference otherwise and under torch.compile."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch
from . import elliptic
from .elliptic import Jacobi, Param

OP = "jacobi_elliptic"
COMPLETE_OP = "complete_elliptic"
_FLOATS = (torch.float32, torch.float64)
_dispatch.register_op(OP, {"triton": _FLOATS, "cpp": _FLOATS, "torch": _FLOATS})
_dispatch.register_op(COMPLETE_OP, {"cpp": _FLOATS, "torch": _FLOATS})


def _traceable(chosen: str) -> str:
    """Under torch.compile the C++ core (NumPy buffers) cannot be traced: the torch path compiles instead."""
    return "torch" if chosen == "cpp" and torch.compiler.is_compiling() else chosen


def _numpy_args(*ts: Tensor):
    return [t.detach().contiguous().numpy() for t in torch.broadcast_tensors(*ts)]


class _JacobiCpp(torch.autograd.Function):
    """The C++ forward (sn, cn, dn, am and the Jacobi zeta); the backward is elementwise torch, as the reference's."""

    @staticmethod
    def forward(ctx, u: Tensor, m: Tensor, mp: Optional[Tensor] = None):
        from .. import _core

        args = _numpy_args(u, m) if mp is None else _numpy_args(u, m, mp)
        outs = _core.jacobi_elliptic(*args[:2], torch.get_num_threads(), *args[2:])
        return elliptic.jacobi_save(ctx, u, m, tuple(torch.from_numpy(o) for o in outs), mp)

    backward = staticmethod(elliptic.jacobi_backward)


class _CompleteCpp(elliptic._CompleteIntegrals):
    """K, E from the C++ core; the reference's backward (dK/dm, dE/dm)."""

    @staticmethod
    def forward(ctx, m: Tensor):
        from .. import _core

        k, e = (torch.from_numpy(t) for t in _core.complete_integrals(*_numpy_args(m), torch.get_num_threads()))
        ctx.save_for_backward(m, k, e)
        return k, e


class _JacobiTriton(torch.autograd.Function):
    """The Triton forward (sn, cn, dn, am and the Jacobi zeta for the m-gradient); the backward is elementwise
    torch on the saved values, as the reference's."""

    @staticmethod
    def forward(ctx, u: Tensor, m: Tensor, mp: Optional[Tensor] = None):
        from ..kernels.jacobi import jacobi_elliptic

        mp_c = mp.contiguous() if mp is not None else None
        return elliptic.jacobi_save(ctx, u, m, tuple(jacobi_elliptic(u.contiguous(), m.contiguous(), mp_c)), mp)

    backward = staticmethod(elliptic.jacobi_backward)


def ellipj(u: Param, m: Param, *, backend: str = "auto") -> Jacobi:
    """Jacobi elliptic functions (sn, cn, dn, am) of u with parameter m = k² (SciPy's ``ellipj`` convention).

    u, m: tensors (or floats) broadcasting to one shape [...]; float32 or float64 (a float adopts the other's dtype).
    m ≤ 1; m > 1 gives NaN (as SciPy; a Python float m > 1 raises ValueError). m < 0 by DLMF 22.17 (SciPy gives
    NaN there), through μ = −m/(1 − m) with 1 − μ = 1/(1 − m) passed along exactly (tests/test_rope.py: mpmath).
    Differentiable in u and m (∂/∂m for m < 1). backend: "auto" (Triton for CUDA tensors, the C++ core for CPU
    tensors, torch under torch.compile), "triton", "cpp" or "torch"; an explicit backend never falls back (but "cpp"
    traces as torch under torch.compile).
    """
    elliptic.check_parameter(m)
    u_t, m_t = elliptic._promote(elliptic._floating(u, "u"), elliptic._floating(m, "m"))
    chosen = _traceable(_dispatch.choose(OP, u_t.device, u_t.dtype, backend))
    fn = _jacobi_function(chosen)
    if elliptic._may_sync(m_t) and not bool((m_t < 0).any()):  # no m < 0: skip DLMF 22.17's passes (CPU check)
        return Jacobi(*fn.apply(u_t, m_t)[:4])
    v, mu, mu_c, negative, root = elliptic.to_unit_parameter(u_t, m_t)
    return elliptic.from_unit_parameter(*fn.apply(v, mu, mu_c)[:4], negative, root)


def _jacobi_function(chosen: str):
    return {"triton": _JacobiTriton, "cpp": _JacobiCpp}.get(chosen, elliptic._JacobiTorch)


def ellipj_with_zeta(u: Tensor, m: Tensor, *, backend: str = "auto") -> Tuple[Jacobi, Tensor]:
    """(sn, cn, dn, am) and the Jacobi zeta Z(u | m) (no gradient) from one pass, for u, m of one shape and
    dtype with 0 ≤ m ≤ 1 (the troposkein's arclength needs both)."""
    chosen = _traceable(_dispatch.choose(OP, u.device, u.dtype, backend))
    sn, cn, dn, am, zeta = _jacobi_function(chosen).apply(u, m)
    return Jacobi(sn, cn, dn, am), zeta


def ellipke(m: Param, *, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(K(m), E(m)) from one AGM pass, m ≤ 1 (NaN above, as SciPy), K(1) = inf, E(1) = 1; differentiable in m.
    backend: "auto" (the C++ core for CPU tensors, else torch), "cpp" or "torch". A Python number m > 1 raises
    ValueError, as in ellipj."""
    elliptic.check_parameter(m)
    (m_t,) = elliptic._promote(elliptic._floating(m, "m"))
    chosen = _traceable(_dispatch.choose(COMPLETE_OP, m_t.device, m_t.dtype, backend))
    return _CompleteCpp.apply(m_t) if chosen == "cpp" else elliptic._CompleteIntegrals.apply(m_t)


def ellipk(m: Param, *, backend: str = "auto") -> Tensor:
    """K(m) = ∫₀^{π/2} (1 − m sin²θ)^{−1/2} dθ = π / (2 AGM(1, √(1 − m))), m ≤ 1 (SciPy's ``ellipk``)."""
    return ellipke(m, backend=backend)[0]


def ellipe(m: Param, *, backend: str = "auto") -> Tensor:
    """E(m) = ∫₀^{π/2} (1 − m sin²θ)^{1/2} dθ by the AGM, m ≤ 1 (SciPy's ``ellipe``)."""
    return ellipke(m, backend=backend)[1]
