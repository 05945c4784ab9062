"""`hsic_test`: HSIC independence tests without an n×n matrix.

Gamma approximation (Gretton, Fukumizu, Teo, Song, Schölkopf & Smola 2008): under independence n·HSIC_b is close to
Gamma(α, θ) with α = μ²/v, θ = n·v/μ, where, for kernels with unit diagonal (μ_x = 1ᵀK̃1/(n(n−1)), likewise μ_y),
    μ = (1 + μ_x μ_y − μ_x − μ_y)/n,
    v = 72 (n−4)(n−5) / (n(n−1)(n−2)(n−3)) · Σ_{i≠j} (Kc_ij Lc_ij / 6)² / (n(n−1)),   Kc = HKH, Lc = HLH.
The centered tiles need the row means, so this is a second tiled pass after the statistics pass.

Permutation: HSIC_b(x, y_π) changes only through S_kl^π = Σ_{i≠j} K_ij L_π(i)π(j) (row sums permute, every other
statistic is invariant), so permutations run batched over tiles, each K tile computed once and shared; p-value
(1 + #{null ≥ observed}) / (1 + n_permutations), ties counted (within 1e-10 of the statistic's scale: tied data
sum equal statistics in different orders). A constant input (K or L constant) gives p = 1 on both tests.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor

from .._autograd import no_autocast
from . import estimators
from .api import _prepare
from .tiled import _KERNEL_CODES, TILE, KernelSpec, _blocks, _cpp_arrays, kernel_tile, stats_for


@dataclass
class HSICTestResult:
    """statistic: HSIC_b = tr(KHLH)/n²; pvalue; null: the null distribution's parameters."""

    statistic: float
    pvalue: float
    method: str
    null: Dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def _centered_square_sum(x, y, kx, ky, stats, tile: int) -> Tensor:
    """Σ_{i≠j} (Kc_ij Lc_ij)² with Kc_ij = K_ij − m_i − m_j + m̄ (m: full-row means of K), likewise Lc."""
    _, _, _, rk, rl, dk, dl = stats
    n = rk.shape[0]
    mk, ml = (rk + dk) / n, (rl + dl) / n
    mk_bar, ml_bar = mk.mean(), ml.mean()
    total = torch.zeros((), dtype=torch.float64, device=rk.device)
    for i0, i1, j0, j1 in _blocks(n, tile):
        kc = kernel_tile(x[i0:i1], x[j0:j1], kx).double() - mk[i0:i1, None] - mk[None, j0:j1] + mk_bar
        lc = kernel_tile(y[i0:i1], y[j0:j1], ky).double() - ml[i0:i1, None] - ml[None, j0:j1] + ml_bar
        sq = (kc * lc) ** 2
        if i0 == j0:
            sq.fill_diagonal_(0)
            total += sq.sum()
        else:
            total += 2 * sq.sum()
    return total


def _gamma_test(x, y, kx, ky, tile, backend) -> HSICTestResult:
    stats = stats_for(backend, x, y, kx, ky, tile)
    _, _, _, rk, rl, dk, dl = stats
    n = rk.shape[0]
    hsic_b = estimators.biased(*(stats[0], rk, rl, dk, dl))
    mean = estimators.gamma_null_mean(rk, rl, dk, dl)
    var = _centered_square_sum(x, y, kx, ky, stats, tile) / 36 / (n * (n - 1))
    var = var * 72 * (n - 4) * (n - 5) / (n * (n - 1) * (n - 2) * (n - 3))
    if not (float(var) > 0 and float(mean) > 0):  # a constant input: K or L constant, the null is HSIC = 0 exactly
        nan = float("nan")
        return HSICTestResult(float(hsic_b), 1.0, "gamma", {"shape": nan, "scale": nan})
    shape, scale = mean**2 / var, var * n / mean
    # HSIC_b = 0 exactly (a balanced design) rounds to ±1e-16; gammaincc of a negative argument is NaN, and p = 1 there
    statistic = (n * hsic_b).clamp_min(0)
    pvalue = torch.special.gammaincc(shape, statistic / scale)
    return HSICTestResult(float(hsic_b), float(pvalue), "gamma", {"shape": float(shape), "scale": float(scale / n)})


@torch.no_grad()
def _permuted_cross_sums(x, y, kx: KernelSpec, ky: KernelSpec, perms: Tensor, tile: int) -> Tensor:
    """S_kl for each permutation of y: perms [P, n] -> [P]."""
    n = x.shape[0]
    out = torch.zeros(perms.shape[0], dtype=torch.float64, device=x.device)
    chunk = max(1, (1 << 22) // (tile * tile))  # ≤ 4M tile elements at a time
    for i0, i1, j0, j1 in _blocks(n, tile):
        k = kernel_tile(x[i0:i1], x[j0:j1], kx).double()
        if i0 == j0:
            k.fill_diagonal_(0)
        weight = 1.0 if i0 == j0 else 2.0
        for p0 in range(0, perms.shape[0], chunk):
            pi = perms[p0 : p0 + chunk, i0:i1]
            pj = perms[p0 : p0 + chunk, j0:j1]
            lm = kernel_tile(y[pi], y[pj], ky).double()  # [P, t_i, t_j]
            out[p0 : p0 + chunk] += weight * (k[None] * lm).sum((1, 2))
    return out


def _permuted_cross_sums_cpp(x, y, kx: KernelSpec, ky: KernelSpec, perms: Tensor) -> Tensor:
    """The same sums from the C++ core: each K tile once, an L tile per permutation, threads over tiles."""
    from .. import _core

    out = _core.hsic_permuted_cross_sums(*_cpp_arrays(x, y, kx, ky), _KERNEL_CODES[kx.name], kx.sigma or 0.0,
                                         _KERNEL_CODES[ky.name], ky.sigma or 0.0, perms.cpu().numpy(),
                                         n_threads=torch.get_num_threads())  # fmt: skip
    return torch.from_numpy(out).to(x.device)


PERMUTATION_BLOCK_ELEMENTS = 1 << 22  # permutation indices held at a time (int64: 32 MiB)


def _permutation_test(x, y, kx, ky, n_permutations: int, seed: Optional[int], tile: int, backend) -> HSICTestResult:
    stats = stats_for(backend, x, y, kx, ky, tile)
    s_kl, _, _, rk, rl, dk, dl = stats
    n = rk.shape[0]
    observed = estimators.biased(s_kl, rk, rl, dk, dl)
    if seed is None:  # a draw from torch's global generator (reproducible under torch.manual_seed; never reseeds it)
        seed = int(torch.randint(0, 2**62, (1,)).item())
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    # permutations drawn and used a block at a time (O(n) int64 each: all at once was [P, n]), in the same order
    block = max(1, PERMUTATION_BLOCK_ELEMENTS // n)
    null_parts = []
    for p0 in range(0, n_permutations, block):
        count = min(block, n_permutations - p0)
        perms = torch.stack([torch.randperm(n, generator=g) for _ in range(count)]).to(x.device)
        if backend == "cpp":
            s_perm = _permuted_cross_sums_cpp(x, y, kx, ky, perms)
        else:
            s_perm = _permuted_cross_sums(x, y, kx, ky, perms, tile)
        null_parts += [estimators.biased(s_perm[p], rk, rl[perms[p]], dk, dl[perms[p]]) for p in range(count)]
    null = torch.stack(null_parts)
    # Ties count as at least as extreme: permuted statistics equal to the observed one (tied or binary data, a
    # constant input) are summed in another order and can fall below it by rounding, so compare within 1e-10 of
    # the estimator's scale (its terms are products of mean |K| and mean |L| entries), as scipy's permutation_test
    # does relatively.
    scale = ((rk.abs().sum() + dk.abs().sum()) / n**2) * ((rl.abs().sum() + dl.abs().sum()) / n**2)
    slack = 1e-10 * float(scale)
    pvalue = (1 + int((null >= observed - slack).sum())) / (1 + n_permutations)  # k/(B+1) exactly rounded
    return HSICTestResult(float(observed), float(pvalue), "permutation",
                          {"n_permutations": n_permutations, "null_mean": float(null.mean()),
                           "null_std": float(null.std()) if n_permutations > 1 else math.nan})  # fmt: skip


def hsic_test(
    x: Tensor,
    y: Tensor,
    *,
    method: str = "gamma",
    n_permutations: int = 1000,
    seed: Optional[int] = None,
    kernel_x: str = "gaussian",
    kernel_y: Optional[str] = None,
    bandwidth_x="median",
    bandwidth_y=None,
    backend: str = "auto",
    tile: int = TILE,
) -> HSICTestResult:
    """Test H0: x ⟂ y with the biased statistic HSIC_b = tr(KHLH)/n² of x [n, dx] and y [n, dy] (or [n] labels
    with kernel_y="delta"); kernels and bandwidths as in `hsic`. Returns HSICTestResult(statistic = HSIC_b, pvalue,
    method, null).

    method="gamma" (Gretton et al. 2008): n·HSIC_b ~ Gamma(shape = μ²/σ², scale = nσ²/μ) under H0, with μ = (1 +
    μ_x μ_y − μ_x − μ_y)/n (μ_x, μ_y: the off-diagonal means of K, L; kernels with a unit diagonal only, so not
    linear) and σ² = 72(n−4)(n−5)/(n(n−1)(n−2)(n−3)) · Σ_{i≠j}(K̃_ij L̃_ij)²/(36 n(n−1)) (K̃, L̃ centered);
    pvalue = P(Gamma ≥ n·HSIC_b); null = {"shape", "scale" (of HSIC_b)}. A constant input gives p = 1.
    method="permutation": HSIC_b of (x, y[π]) for n_permutations random π (seeded by `seed`, else drawn from torch's
    generator); pvalue = (1 + #{HSIC_b(π) ≥ HSIC_b − slack})/(1 + P), ties counted (slack: 1e-10 of the
    estimator's scale, mean|K|·mean|L|); null = {"n_permutations", "null_mean", "null_std" (NaN for one
    permutation: a sample standard deviation needs two)}. Exact tiles, memory
    O(n·d + P) (each K tile reused for every permutation); no gradient."""
    if method not in ("gamma", "permutation"):
        raise ValueError(f'method must be "gamma" or "permutation", got {method!r}')
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, numbers.Integral) or n_permutations < 1:
        raise ValueError(f"n_permutations must be a positive int, got {n_permutations!r}")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63
    ):  # torch.Generator.manual_seed takes a signed 64-bit value
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
    # the Gamma approximation's variance has (n − 4)(n − 5) in it; permutations need two samples
    min_n = 6 if method == "gamma" else 2
    x, y, kx, ky, chosen = _prepare(x, y, kernel_x, kernel_y, bandwidth_x, bandwidth_y, "biased", backend,
                                    min_n=min_n, tile=tile, needs=f"hsic_test(method={method!r})")  # fmt: skip
    if method == "gamma" and (kx.name == "linear" or ky.name == "linear"):
        raise ValueError("the Gamma approximation assumes kernels with a unit diagonal; use method='permutation'")
    with no_autocast(x.device.type):  # the Gram tiles in the inputs' precision
        if method == "gamma":
            return _gamma_test(x, y, kx, ky, tile, chosen)
        return _permutation_test(x, y, kx, ky, int(n_permutations), seed, tile, chosen)
