"""Drop-in modules: thin parameters + a call into the functional API."""

from .spectral_norm import SpectralNorm, spectral_norm, spectral_norm_layers, update_spectral_norms

__all__ = ["SpectralNorm", "spectral_norm", "spectral_norm_layers", "update_spectral_norms"]
