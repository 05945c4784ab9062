"""Drop-in modules: thin parameters + a call into the functional API."""

from .cascading import CascadingRejection
from .iresnet import ActNorm, FactorOut, InvertibleResBlock, LipSwish, Squeeze
from .residual_flow import ResidualFlow
from .self_orthogonality import SelfOrthogonality
from .spectral_norm import SpectralNorm, spectral_norm, spectral_norm_layers, update_spectral_norms

__all__ = [
    "ActNorm",
    "CascadingRejection",
    "FactorOut",
    "InvertibleResBlock",
    "LipSwish",
    "ResidualFlow",
    "SelfOrthogonality",
    "SpectralNorm",
    "Squeeze",
    "spectral_norm",
    "spectral_norm_layers",
    "update_spectral_norms",
]
