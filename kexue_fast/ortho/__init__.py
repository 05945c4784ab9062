"""Orthogonality regularizers: the Self-Orthogonality Module's activation regularizer (`som_regularizer`, fused Triton
kernel on CUDA), BigGAN's off-diagonal weight regularizer and the soft orthogonality penalty ‖WᵀW − I‖², and the
forward-hook recorder behind kexue_fast.nn.SelfOrthogonality. Formulas and papers: kexue_fast.ortho.reference."""

from . import reference
from .hooks import OutputRecorder
from .som import som_regularizer
from .weights import biggan_orthogonal_regularizer, orthogonality_penalty

__all__ = ["OutputRecorder", "biggan_orthogonal_regularizer", "orthogonality_penalty", "reference", "som_regularizer"]
