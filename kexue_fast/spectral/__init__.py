"""Spectral normalization: batched power iteration, certified bounds, conv operator norms."""

from .bound import conv_operator_norm_bound, spectral_norm_bound
from .conv import conv_operator_norm
from .power_iteration import power_iteration

__all__ = ["conv_operator_norm", "conv_operator_norm_bound", "power_iteration", "spectral_norm_bound"]
