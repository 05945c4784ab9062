"""`memory_order`: the axis order in which a dense, non-contiguous tensor (channels_last, a transpose) lies in memory,
so that an op indifferent to that order (a Gram over rows, an elementwise update, σ of a matrix with permuted
columns) can read it in place instead of a contiguous copy."""

from __future__ import annotations

from typing import List, Optional

from torch import Tensor


def memory_order(t: Tensor, first: int = 0) -> Optional[List[int]]:
    """For t not contiguous whose axes first, first + 1, ... lie densely in another order, that order (axes before
    `first` kept in place): t.permute(*range(first), *order) is then a contiguous view of t's memory. None where t
    is contiguous, or overlapping or with gaps (an expanded or sliced tensor). Size-1 axes may land anywhere (their
    strides do not matter to contiguity)."""
    if t.is_contiguous():
        return None
    strides = t.stride()
    order = sorted(range(first, t.ndim), key=lambda d: -strides[d])  # stable
    return order if t.permute(*range(first), *order).is_contiguous() else None
