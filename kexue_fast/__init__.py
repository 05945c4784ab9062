"""kexue_fast: fast, exact implementations of the kexue.fm family of ML techniques.

Spectral normalization (this release): `power_iteration`, `spectral_norm_bound`, `conv_operator_norm`, and the
drop-in modules in `kexue_fast.nn`. `python -m kexue_fast.info` says which backend each op runs on and why.
"""

from . import nn
from .spectral import conv_operator_norm, power_iteration, spectral_norm_bound

__version__ = "0.1.0"
__all__ = ["__version__", "conv_operator_norm", "nn", "power_iteration", "spectral_norm_bound"]
