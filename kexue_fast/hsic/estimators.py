"""Every HSIC variant as O(n) float64 algebra on the streaming statistics (see kexue_fast.hsic.tiled).

With k1 = r^K + diag K (full row sums) and T_kl = S_kl + Σ_i K_ii L_ii (= tr KL):
    biased     (T_kl − 2/n·k1ᵀl1 + (1ᵀk1)(1ᵀl1)/n²) / n²                      = tr(KHLH)/n²
    unbiased   (S_kl + (1ᵀr^K)(1ᵀr^L)/((n−1)(n−2)) − 2/(n−2)·r^Kᵀr^L) / (n(n−3))   (Song et al. 2012)
    normalized v(K, L) / sqrt(v(K, K)·v(L, L)), and 0 where either self-term is ≤ 0 or not above its terms'
               rounding (constant inputs; as hyppo)
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
from torch import Tensor


def _biased_terms(s_xy: Tensor, r_x: Tensor, r_y: Tensor, d_x: Tensor, d_y: Tensor):
    n = r_x.shape[0]
    k1, l1 = r_x + d_x, r_y + d_y
    return (s_xy, (d_x * d_y).sum(), -2.0 / n * (k1 * l1).sum(), k1.sum() * l1.sum() / n**2), n**2


def _unbiased_terms(s_xy: Tensor, r_x: Tensor, r_y: Tensor):
    n = r_x.shape[0]
    return (s_xy, r_x.sum() * r_y.sum() / ((n - 1) * (n - 2)), -2.0 / (n - 2) * (r_x * r_y).sum()), n * (n - 3)


def biased(s_xy: Tensor, r_x: Tensor, r_y: Tensor, d_x: Tensor, d_y: Tensor) -> Tensor:
    terms, denominator = _biased_terms(s_xy, r_x, r_y, d_x, d_y)
    return sum(terms) / denominator


def unbiased(s_xy: Tensor, r_x: Tensor, r_y: Tensor) -> Tensor:
    terms, denominator = _unbiased_terms(s_xy, r_x, r_y)
    return sum(terms) / denominator


# A self-term v(K, K) no larger than this share of its terms' magnitudes is rounding: the input is constant (its
# unbiased self-term came out ±1e-16, not 0, and CKA ±1e-7 instead of 0) or too nearly so to tell apart.
_RESOLVED = 64 * torch.finfo(torch.float64).eps


def self_term(terms_and_denominator) -> Tuple[Tensor, Tensor]:
    """(v(K, K), the magnitude of its terms) for normalize's resolution test."""
    terms, denominator = terms_and_denominator
    return sum(terms) / denominator, sum(t.detach().abs() for t in terms) / denominator


def normalize(v: Tensor, vk: Tensor, vl: Tensor, scale_k=None, scale_l=None) -> Tensor:
    """v/√(vk·vl), and 0 where a self-term is ≤ 0 or (given its terms' magnitude) not above rounding."""
    ok = (vk > (0 if scale_k is None else _RESOLVED * scale_k)) & (vl > (0 if scale_l is None else _RESOLVED * scale_l))
    return torch.where(ok, v / torch.sqrt(torch.where(ok, vk * vl, torch.ones_like(vk))), torch.zeros_like(v))


def estimate(kind: str, normalized: bool):
    """The scalar map stats -> value for one variant (what StreamingHSIC differentiates)."""

    def fn(s_kl, s_kk, s_ll, rk, rl, dk, dl):
        if kind == "biased":
            v = biased(s_kl, rk, rl, dk, dl)
            if not normalized:
                return v
            vk, sk = self_term(_biased_terms(s_kk, rk, rk, dk, dk))
            vl, sl = self_term(_biased_terms(s_ll, rl, rl, dl, dl))
            return normalize(v, vk, vl, sk, sl)
        v = unbiased(s_kl, rk, rl)
        if not normalized:
            return v
        vk, sk = self_term(_unbiased_terms(s_kk, rk, rk))
        vl, sl = self_term(_unbiased_terms(s_ll, rl, rl))
        return normalize(v, vk, vl, sk, sl)

    return fn


class HSICStats(NamedTuple):
    """Every variant from one pass (float64 scalars)."""

    biased: Tensor  # tr(KHLH)/n²
    biased_n1: Tensor  # tr(KHLH)/(n−1)²
    unbiased: Tensor  # Song et al. 2012
    cka: Tensor  # normalized biased (CKA)
    cka_unbiased: Tensor  # normalized unbiased (hyppo's Hsic statistic with both bandwidths x's median, as hyppo's)
    hsic_xx_biased: Tensor
    hsic_yy_biased: Tensor
    gamma_null_mean: Tensor  # E[HSIC_b] under independence, (1 + μ_x μ_y − μ_x − μ_y)/n; NaN unless diag K = diag L = 1
    n: int


def all_variants(stats) -> HSICStats:
    s_kl, s_kk, s_ll, rk, rl, dk, dl = stats
    n = rk.shape[0]
    b = biased(s_kl, rk, rl, dk, dl)
    (bk, sbk), (bl, sbl) = (
        self_term(_biased_terms(s_kk, rk, rk, dk, dk)),
        self_term(_biased_terms(s_ll, rl, rl, dl, dl)),
    )
    u = unbiased(s_kl, rk, rl) if n >= 4 else torch.full_like(b, float("nan"))
    if n >= 4:
        (uk, suk), (ul, sul) = self_term(_unbiased_terms(s_kk, rk, rk)), self_term(_unbiased_terms(s_ll, rl, rl))
        cka_u = normalize(u, uk, ul, suk, sul)
    else:
        cka_u = u  # undefined below 4 samples: NaN, not normalize's 0 for "not ok"
    return HSICStats(b, b * n**2 / (n - 1) ** 2, u, normalize(b, bk, bl, sbk, sbl), cka_u, bk, bl,
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
