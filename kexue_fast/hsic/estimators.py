"""Every HSIC variant as O(n) float64 algebra on the streaming statistics (see kexue_fast.hsic.tiled).

With k1 = r^K + diag K (full row sums) and T_kl = S_kl + Σ_i K_ii L_ii (= tr KL):
    biased     (T_kl − 2/n·k1ᵀl1 + (1ᵀk1)(1ᵀl1)/n²) / n²                      = tr(KHLH)/n²
    unbiased   (S_kl + (1ᵀr^K)(1ᵀr^L)/((n−1)(n−2)) − 2/(n−2)·r^Kᵀr^L) / (n(n−3))   (Song et al. 2012)
    normalized v(K, L) / sqrt(v(K, K)·v(L, L)), and 0 where either self-term is ≤ 0 (constant inputs; as hyppo)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def biased(s_xy: Tensor, r_x: Tensor, r_y: Tensor, d_x: Tensor, d_y: Tensor) -> Tensor:
    n = r_x.shape[0]
    k1, l1 = r_x + d_x, r_y + d_y
    return (s_xy + (d_x * d_y).sum() - 2.0 / n * (k1 * l1).sum() + k1.sum() * l1.sum() / n**2) / n**2


def unbiased(s_xy: Tensor, r_x: Tensor, r_y: Tensor) -> Tensor:
    n = r_x.shape[0]
    return (s_xy + r_x.sum() * r_y.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (r_x * r_y).sum()) / (n * (n - 3))


def normalize(v: Tensor, vk: Tensor, vl: Tensor) -> Tensor:
    ok = (vk > 0) & (vl > 0)
    return torch.where(ok, v / torch.sqrt(torch.where(ok, vk * vl, torch.ones_like(vk))), torch.zeros_like(v))


def estimate(kind: str, normalized: bool):
    """The scalar map stats -> value for one variant (what StreamingHSIC differentiates)."""

    def fn(s_kl, s_kk, s_ll, rk, rl, dk, dl):
        if kind == "biased":
            v = biased(s_kl, rk, rl, dk, dl)
            if not normalized:
                return v
            return normalize(v, biased(s_kk, rk, rk, dk, dk), biased(s_ll, rl, rl, dl, dl))
        v = unbiased(s_kl, rk, rl)
        if not normalized:
            return v
        return normalize(v, unbiased(s_kk, rk, rk), unbiased(s_ll, rl, rl))

    return fn


class HSICStats(NamedTuple):
    """Every variant from one pass (float64 scalars)."""

    biased: Tensor  # tr(KHLH)/n²
    biased_n1: Tensor  # tr(KHLH)/(n−1)²
    unbiased: Tensor  # Song et al. 2012
    cka: Tensor  # normalized biased (CKA)
    cka_unbiased: Tensor  # normalized unbiased (hyppo's Hsic statistic)
    hsic_xx_biased: Tensor
    hsic_yy_biased: Tensor
    gamma_null_mean: Tensor  # E[HSIC_b] under independence, (1 + μ_x μ_y − μ_x − μ_y)/n; NaN unless diag K = diag L = 1
    n: int


def all_variants(stats) -> HSICStats:
    s_kl, s_kk, s_ll, rk, rl, dk, dl = stats
    n = rk.shape[0]
    b = biased(s_kl, rk, rl, dk, dl)
    bk, bl = biased(s_kk, rk, rk, dk, dk), biased(s_ll, rl, rl, dl, dl)
    u = unbiased(s_kl, rk, rl) if n >= 4 else torch.full_like(b, float("nan"))
    uk = unbiased(s_kk, rk, rk) if n >= 4 else u
    ul = unbiased(s_ll, rl, rl) if n >= 4 else u
    cka_u = normalize(u, uk, ul) if n >= 4 else u  # undefined below 4 samples: NaN, not normalize's 0 for "not ok"
    return HSICStats(b, b * n**2 / (n - 1) ** 2, u, normalize(b, bk, bl), cka_u, bk, bl,
                     gamma_null_mean(rk, rl, dk, dl), n)  # fmt: skip


def gamma_null_mean(rk: Tensor, rl: Tensor, dk: Tensor, dl: Tensor) -> Tensor:
    """The Gamma approximation's mean of HSIC_b under independence (Gretton et al. 2008), from the row sums alone:
    μ_x = 1ᵀr^K/(n(n−1)) (mean off-diagonal K), likewise μ_y; it assumes unit diagonals (radial and delta kernels).
    Its variance needs the centered tiles: a second pass, run by hsic_test."""
    n = rk.shape[0]
    mu_x, mu_y = rk.sum() / (n * (n - 1)), rl.sum() / (n * (n - 1))
    mean = (1 + mu_x * mu_y - mu_x - mu_y) / n
    unit = bool((dk == 1).all()) and bool((dl == 1).all())
    return mean if unit else torch.full_like(mean, float("nan"))
