"""`median_bandwidth`: the median pairwise Euclidean distance, exactly, in O(n) memory.

On CPU the C++ core selects it (csrc/hsic/pair_select): a seeded sample of pairs brackets the median, and one exact
pass over all pairs counts the values below the bracket and keeps those inside (a second pass narrows a bracket that
holds too many). The torch path (other devices) is a radix select: squared distances d² ≥ 0 are float64, whose bit
patterns order like the values; four passes over the upper-triangle tiles histogram 16 bits at a time of the pairs
that still match the selected prefix, so the k-th smallest of the n(n−1)/2 values is found without storing them (and
the (k+1)-th with at most one more pass). Both compute distances in float64 and return the same value. The median
follows numpy's convention (mean of the two middle values when their count is even), over pairs i < j — as hyppo
computes it over the off-diagonal entries.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .tiled import TILE, _blocks

OP = "median_bandwidth"
_dispatch.register_op(OP, {"cpp": (torch.float32, torch.float64),
                           "torch": (torch.float32, torch.float64, torch.float16, torch.bfloat16)})  # fmt: skip


def _squared_distance_tile(a: Tensor, b: Tensor) -> Tensor:
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)).clamp_min(0)


def _pair_values(x: Tensor, tile: int):
    """The squared distances of the pairs i < j, one tile at a time (flattened)."""
    n = x.shape[0]
    for i0, i1, j0, j1 in _blocks(n, tile):
        sq = _squared_distance_tile(x[i0:i1], x[j0:j1])
        yield sq[torch.triu(torch.ones_like(sq, dtype=torch.bool), diagonal=1)] if i0 == j0 else sq.reshape(-1)


@torch.no_grad()
def kth_squared_distance(x: Tensor, k: int, tile: int = TILE, with_next: bool = False):
    """The k-th smallest (0-based) squared distance over pairs i < j; with_next=True also returns the (k+1)-th,
    which is the same value when it repeats, else the smallest value above it (one more pass, not a second select).
    x is centred first: the tiles' ‖a‖² + ‖b‖² − 2a·b would cancel for points far from the origin."""
    x = x.to(torch.float64)
    x = x - x.mean(0)
    prefix = 0
    last_count = 0
    for shift in (48, 32, 16, 0):
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=x.device)
        for values in _pair_values(x, tile):
            bits = values.view(torch.int64)
            if shift < 48:
                bits = bits[(bits >> (shift + 16)) == prefix]
            hist += torch.bincount(((bits >> shift) & 0xFFFF), minlength=1 << 16)
        cumulative = torch.cumsum(hist, 0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(k + 1, device=x.device)))
        k -= int(cumulative[digit - 1]) if digit > 0 else 0
        last_count = int(hist[digit])
        prefix = (prefix << 16) | digit
    value = torch.tensor([prefix], dtype=torch.int64).view(torch.float64).item()
    if not with_next:
        return value
    if k + 1 < last_count:  # the value repeats
        return value, value
    above = float("inf")
    for values in _pair_values(x, tile):
        bigger = values[values > value]
        if bigger.numel():
            above = min(above, float(bigger.min()))
    return value, above


def _kth_cpp(x: Tensor, k: int, with_next: bool = False):
    from .. import _core

    value, above, _ = _core.kth_pair_sq_distance(x.detach().contiguous().cpu().numpy(), k,
                                                 n_threads=torch.get_num_threads())  # fmt: skip
    return (value, above) if with_next else value


def median_bandwidth(
    x: Tensor,
    *,
    exact: bool = True,
    subsample: Optional[int] = None,
    seed: Optional[int] = None,
    backend: str = "auto",
) -> float:
    """σ = median_{i<j} ‖x_i − x_j‖ (exact by default; or over a seeded subsample of `subsample` rows).

    x: [n, d] (or [n]), float32 or float64; distances are computed in float64. Returns a Python float; 0 if all
    points coincide (callers replace it, e.g. by 1, as hyppo). backend: "auto" (C++ on CPU), "cpp" or "torch"."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be [n, d] with n >= 2, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < 2**63):  # fmt: skip
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
    if subsample is not None:
        if isinstance(subsample, bool) or not isinstance(subsample, numbers.Integral) or subsample < 2:
            raise ValueError(f"subsample must be an int >= 2, got {subsample!r}")
        subsample = int(subsample)
        if subsample < x.shape[0]:
            g = torch.Generator(device="cpu").manual_seed(0 if seed is None else seed)
            x = x[torch.randperm(x.shape[0], generator=g)[:subsample].to(x.device)]
    elif not exact:
        raise ValueError("exact=False needs subsample=m")
    n = x.shape[0]
    m = n * (n - 1) // 2
    if _dispatch.choose(OP, x.device, x.dtype, backend) == "cpp":
        if m % 2:
            return math.sqrt(_kth_cpp(x, m // 2))
        lo, hi = _kth_cpp(x, m // 2 - 1, with_next=True)
        return 0.5 * (math.sqrt(lo) + math.sqrt(hi))
    if n <= TILE:  # the whole matrix is one tile: sort its upper triangle
        x = x.to(torch.float64)
        x = x - x.mean(0)  # centred: ‖a‖² + ‖b‖² − 2a·b cancels far from the origin
        sq = _squared_distance_tile(x, x)
        values = torch.sqrt(sq[torch.triu(torch.ones_like(sq, dtype=torch.bool), diagonal=1)]).sort().values
        return float(values[m // 2]) if m % 2 else float(0.5 * (values[m // 2 - 1] + values[m // 2]))
    if m % 2:
        return math.sqrt(kth_squared_distance(x, m // 2))
    lo, hi = kth_squared_distance(x, m // 2 - 1, with_next=True)
    return 0.5 * (math.sqrt(lo) + math.sqrt(hi))
