"""Pure-torch truth for HSIC (materializes n×n Gram matrices: for tests and small n only).

HSIC (Gretton et al. 2005; kexue.fm "HSIC简介"; Ma, Lewis & Kleijn 2020, "The HSIC Bottleneck"), with Gram matrices
K_ij = k(x_i, x_j), L_ij = l(y_i, y_j), H = I − 11ᵀ/n:
    biased     HSIC_b = tr(K H L H) / n²
    unbiased   HSIC_u = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))   (Song et al. 2012;
               K̃, L̃: K, L with zeroed diagonals)
    normalized HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L))  (CKA for the biased estimator; Kornblith et al. 2019)
Kernels of d = ‖a − b‖ with bandwidth σ: gaussian exp(−d²/(2σ²)), laplace exp(−d/σ), imq (1 + d²/σ²)^(−1/2);
linear aᵀb; delta 1[a = b] for integer labels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gram(x: Tensor, kernel: str, sigma: float | Tensor | None = None) -> Tensor:
    if kernel == "delta":
        return (x[:, None] == x[None, :]).to(torch.float64)
    if kernel == "linear":
        return x @ x.T
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if kernel == "gaussian":
        return torch.exp(-sq / (2 * sigma**2))
    if kernel == "laplace":
        return torch.exp(-torch.sqrt(sq) / sigma)
    if kernel == "imq":
        return 1 / torch.sqrt(1 + sq / sigma**2)
    raise ValueError(f"unknown kernel {kernel!r}")


def hsic_biased(k: Tensor, lm: Tensor) -> Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
    return torch.trace(k @ h @ lm @ h) / n**2


def hsic_unbiased(k: Tensor, lm: Tensor) -> Tensor:
    n = k.shape[0]
    kt = k - torch.diag(torch.diagonal(k))
    lt = lm - torch.diag(torch.diagonal(lm))
    one = torch.ones(n, dtype=k.dtype, device=k.device)
    term = (
        torch.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    )
    return term / (n * (n - 3))


def normalized(estimator, k: Tensor, lm: Tensor) -> Tensor:
    return estimator(k, lm) / torch.sqrt(estimator(k, k) * estimator(lm, lm))
