"""`ellipj`, `ellipk`, `ellipe`: the public, dispatched Jacobi elliptic functions and complete integrals
(formulas: kexue_fast.rope.elliptic). Triton on CUDA (kernels/jacobi.py), the torch reference elsewhere."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

from .. import _dispatch
from . import elliptic
from .elliptic import Jacobi, Param

OP = "jacobi_elliptic"
_dispatch.register_op(OP, {"triton": (elliptic.torch.float32, elliptic.torch.float64),
                           "torch": (elliptic.torch.float32, elliptic.torch.float64)})  # fmt: skip


class _JacobiTriton(elliptic.torch.autograd.Function):
    """The Triton forward (sn, cn, dn, am and the Jacobi zeta for the m-gradient); the backward is elementwise
    torch on the saved values, as the reference's."""

    @staticmethod
    def forward(ctx, u: Tensor, m: Tensor):
        from ..kernels.jacobi import jacobi_elliptic

        sn, cn, dn, am, zeta = jacobi_elliptic(u.contiguous(), m.contiguous())
        ctx.save_for_backward(u, m, sn, cn, dn, zeta)
        ctx.mark_non_differentiable(zeta)
        return sn, cn, dn, am, zeta

    @staticmethod
    def backward(ctx, gsn, gcn, gdn, gam, _gzeta):
        u, m, sn, cn, dn, zeta = ctx.saved_tensors
        return elliptic.jacobi_grads(u, m, sn, cn, dn, zeta, gsn, gcn, gdn, gam, *ctx.needs_input_grad[:2])


def ellipj(u: Param, m: Param, *, backend: str = "auto") -> Jacobi:
    """Jacobi elliptic functions (sn, cn, dn, am) of u with parameter m = k² (SciPy's ``ellipj`` convention).

    u, m: tensors (or floats) broadcasting to one shape [...]; float32 or float64 (a float adopts the other's dtype).
    m ≤ 1; m > 1 gives NaN (as SciPy; a Python float m > 1 raises ValueError). m < 0 by DLMF 22.17.
    Differentiable in u and m (∂/∂m for m < 1). backend: "auto" (Triton for CUDA tensors, else torch), "triton"
    or "torch"; an explicit backend never falls back.
    """
    elliptic.check_parameter(m)
    u_t, m_t = elliptic._promote(elliptic._floating(u, "u"), elliptic._floating(m, "m"))
    chosen = _dispatch.choose(OP, u_t.device, u_t.dtype, backend)
    v, mu, negative, root = elliptic.to_unit_parameter(u_t, m_t)
    fn = _JacobiTriton if chosen == "triton" else elliptic._JacobiTorch
    return elliptic.from_unit_parameter(*fn.apply(v, mu)[:4], negative, root)


def ellipj_with_zeta(u: Tensor, m: Tensor, *, backend: str = "auto") -> Tuple[Jacobi, Tensor]:
    """(sn, cn, dn, am) and the Jacobi zeta Z(u | m) (no gradient) from one pass, for u, m of one shape and
    dtype with 0 ≤ m ≤ 1 (the troposkein's arclength needs both)."""
    chosen = _dispatch.choose(OP, u.device, u.dtype, backend)
    fn = _JacobiTriton if chosen == "triton" else elliptic._JacobiTorch
    sn, cn, dn, am, zeta = fn.apply(u, m)
    return Jacobi(sn, cn, dn, am), zeta


def ellipk(m: Param) -> Tensor:
    """K(m) = ∫₀^{π/2} (1 − m sin²θ)^{−1/2} dθ = π / (2 AGM(1, √(1 − m))), m ≤ 1 (SciPy's ``ellipk``)."""
    return elliptic.ellipk(m)


def ellipe(m: Param) -> Tensor:
    """E(m) = ∫₀^{π/2} (1 − m sin²θ)^{1/2} dθ by the AGM, m ≤ 1 (SciPy's ``ellipe``)."""
    return elliptic.ellipe(m)
