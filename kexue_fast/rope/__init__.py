"""The skipping-rope curve (kexue.fm "你跳绳的时候,想过绳子的形状曲线是怎样的吗?"): the troposkein in closed form
with Jacobi elliptic functions, the general spinning rope with gravity by batched shooting, and batched,
differentiable K, E, sn, cn, dn in torch, with a C++ core on CPU and a Triton kernel for sn, cn, dn on CUDA."""

from .elliptic import Jacobi, jacobi_zeta
from .jacobi import ellipe, ellipj, ellipk, ellipke
from .shooting import RopeShape, rope_shape
from .troposkein import Troposkein, length_ratio, troposkein

__all__ = [
    "Jacobi",
    "RopeShape",
    "Troposkein",
    "ellipe",
    "ellipj",
    "ellipk",
    "ellipke",
    "jacobi_zeta",
    "length_ratio",
    "rope_shape",
    "troposkein",
]
