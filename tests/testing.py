"""Shared test helpers: which backends can run here, matrices with a known spectrum, relative errors."""

from __future__ import annotations

from typing import List, Sequence

import torch

from kexue_fast import _dispatch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends(device: str = "cpu", dtype: torch.dtype = torch.float64) -> List[str]:
    """Every backend of power_iteration that can run on (device, dtype) here; triton under the interpreter on CPU."""
    return [
        b for b in _dispatch.BACKENDS if _dispatch.why_not("power_iteration", b, torch.device(device), dtype) is None
    ]


def matrix_with_gap(m: int, n: int, *, gap: float = 2.0, dtype=torch.float64, device="cpu", seed=None,
                    with_norm: bool = False):  # fmt: skip
    """A random m×n matrix with σ₁ = gap·σ₂ (so power iteration converges at rate 1/gap² per iteration); with
    with_norm=True also its σ₁ (float64, known by construction: no SVD). The QRs run on `device` (fast on a GPU)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g).to(device))
    v, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g).to(device))
    s = torch.rand(k, dtype=torch.float64, generator=g) + 0.5
    s = s / s.max()
    s[0] = gap
    scale = float(torch.rand((), dtype=torch.float64, generator=g)) * 3 + 0.1
    w = ((u * (s * scale).to(device)) @ v.T).to(dtype=dtype)
    return (w, torch.tensor(gap * scale, dtype=torch.float64)) if with_norm else w


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def exact_norms(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.linalg.matrix_norm(w.double(), ord=2) for w in weights])


def jacobi_truth(u: torch.Tensor, m: torch.Tensor):
    """(sn, cn, dn, am) as float64 numpy arrays: SciPy's ellipj, except for 1 − 1e-10 ≤ m < 1, where SciPy (Cephes)
    takes a first-order series in 1 − m that is wrong for large u (sn(2K | 1 − 1e-11) = 1 instead of 0): mpmath
    there, at 30 digits, of the same float64 (u, m)."""
    import math

    import mpmath
    import numpy as np
    import scipy.special

    u_np, m_np = (t.detach().double().cpu().numpy() for t in torch.broadcast_tensors(u, m))
    out = [np.array(a, dtype=np.float64) for a in scipy.special.ellipj(u_np, m_np)]
    with mpmath.workdps(30):
        for i in zip(*np.nonzero((m_np >= 1 - 1e-10) & (m_np < 1))):
            x, k = mpmath.mpf(float(u_np[i])), mpmath.mpf(float(m_np[i]))
            sn, cn, dn = (mpmath.ellipfun(f, x, m=k) for f in ("sn", "cn", "dn"))
            # am = atan2(sn, cn) + 2πj, the branch nearest its drift πu/(2K) (am − πu/(2K) is periodic, |·| < π/2)
            drift = float(mpmath.pi * x / (2 * mpmath.ellipk(k)))
            principal = float(mpmath.atan2(sn, cn))
            am = principal + 2 * math.pi * round((drift - principal) / (2 * math.pi))
            out[0][i], out[1][i], out[2][i], out[3][i] = float(sn), float(cn), float(dn), am
    return out
