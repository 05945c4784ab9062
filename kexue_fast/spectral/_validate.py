"""Argument checks shared by the spectral room: clear ValueError/TypeError naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_n_iters(n_iters: object, name: str = "n_iters", minimum: int = 1) -> int:
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(n_iters).__name__}")
    if n_iters < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n_iters}")
    return int(n_iters)


def check_positive(value: object, name: str, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_matrix(weight: object, name: str) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix [m, n], got a {weight.ndim}-D tensor of shape "
                         f"{tuple(weight.shape)}")  # fmt: skip
    check_float(weight, name)
    if weight.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(weight.shape)}")
    return weight


def check_float(t: Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def check_finite(t: Tensor, name: str) -> None:
    """Raises if `t` holds NaN or Inf (a host sync on CUDA: call only where one is acceptable)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_input_shape(input_shape: object, nd: int, what: str) -> Tuple[int, ...]:
    """(C, *spatial) as a tuple of nd + 1 positive ints (bools refused: True is not a size); `what` names the conv."""
    if not isinstance(input_shape, (tuple, list, torch.Size)) or not all(
        isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1 for x in input_shape
    ):
        raise ValueError(f"input_shape must be a tuple of positive ints (C, *spatial), got {input_shape!r}")
    if len(input_shape) != nd + 1:
        raise ValueError(f"input_shape must be (C, *spatial) with {nd} spatial dims for {what} (no batch dim), got "
                         f"{tuple(input_shape)}")  # fmt: skip
    return tuple(int(x) for x in input_shape)
