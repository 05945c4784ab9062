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

from torch import Tensor

GFunction = Callable[[Tensor], Tensor]


def fixed_point_inverse(g: GFunction, y: Tensor, n_iters: int) -> Tensor:
    """x_{k+1} = y − g(x_k) from x_0 = y, exactly n_iters times."""
    x = y
    for _ in range(n_iters):
        x = y - g(x)
    return x
