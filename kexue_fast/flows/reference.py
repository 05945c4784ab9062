"""Pure-torch truth for invertible residual blocks y = x + g(x), Lip(g) < 1.

i-ResNet (Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, ICML 2019) and Residual Flows (Chen, Behrmann, Duvenaud &
Jacobsen, NeurIPS 2019); kexue.fm post "细水长flow之可逆ResNet".

- Inverse: x = y − g(x) is a contraction, so x_{k+1} = y − g(x_k) converges (Banach) at rate Lip(g).
- Log-determinant: for ‖J_g‖ < 1,  log|det(I + J_g)| = Σ_{k≥1} (−1)^{k+1} tr(J_g^k) / k.
- Hutchinson: tr(A) = E_v[vᵀ A v] for E[v vᵀ] = I (Gaussian or Rademacher v).
- Russian roulette (Residual Flows): with N ~ Geom(p) (or Poisson) and P_k = P(N ≥ k − n_exact) (1 for k ≤ n_exact),
  Σ_{k=1}^{n_exact+N} (−1)^{k+1} vᵀJ^k v / (k P_k) is an unbiased estimate of log|det(I + J)|.
- Neumann gradient: ∂ log det(I + J)/∂θ = tr((I + J)^{-1} ∂J/∂θ) = Σ_{k≥0} (−1)^k tr(J^k ∂J/∂θ), estimated with the
  same probes and weights, so one vector–Jacobian product with a graph carries the gradient, whatever the number of
  terms.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

GFunction = Callable[[Tensor], Tensor]


def jacobian(g: GFunction, x: Tensor, create_graph: bool = False) -> Tensor:
    """Per-sample Jacobian of g at x [B, *shape] -> [B, d, d] (d = prod(shape)), by d vector–Jacobian products."""
    batch = x.shape[0]
    with torch.enable_grad():
        x = x.detach().requires_grad_() if not x.requires_grad else x
        out = g(x).reshape(batch, -1)
        d = out.shape[1]
        rows = []
        for i in range(d):
            grad_out = torch.zeros_like(out)
            grad_out[:, i] = 1
            (row,) = torch.autograd.grad(out, x, grad_out, retain_graph=True, create_graph=create_graph)
            rows.append(row.reshape(batch, -1))
    return torch.stack(rows, dim=1)


def exact_logdet(g: GFunction, x: Tensor) -> Tensor:
    """log|det(I + J_g(x))| per sample [B], by slogdet of the autograd Jacobian."""
    jac = jacobian(g, x)
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    return torch.linalg.slogdet(eye + jac).logabsdet


def truncated_series(jac: Tensor, n_terms: int) -> Tensor:
    """Σ_{k=1}^{n} (−1)^{k+1} tr(J^k) / k with exact traces, for J [B, d, d] -> [B]."""
    power = jac
    total = torch.zeros(jac.shape[0], dtype=jac.dtype, device=jac.device)
    for k in range(1, n_terms + 1):
        total = total + (-1) ** (k + 1) * torch.diagonal(power, dim1=-2, dim2=-1).sum(-1) / k
        power = power @ jac
    return total


def fixed_point_inverse(g: GFunction, y: Tensor, n_iters: int) -> Tensor:
    """x_{k+1} = y − g(x_k) from x_0 = y, exactly n_iters times."""
    x = y
    for _ in range(n_iters):
        x = y - g(x)
    return x
