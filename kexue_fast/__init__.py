"""kexue_fast: fast, exact implementations of the kexue.fm family of ML techniques.

Spectral normalization (`power_iteration`, `spectral_norm_bound`, `conv_operator_norm`), invertible residual networks
(`kexue_fast.nn.InvertibleResBlock`, `ResidualFlow`, `kexue_fast.flows`), exact tiled HSIC (`hsic`, `hsic_stats`,
`cka`, `median_bandwidth`), the map equation and Infomap (`map_equation`, `infomap`), JoSE spherical text embeddings
(`JoSE`, `kexue_fast.jose`, offline corpora in `kexue_fast.datasets`), Cascading Rejection (`kexue_fast.gan`), the
Self-Orthogonality regularizer and its siblings (`kexue_fast.ortho`), denoising score matching and annealed Langevin
sampling (`kexue_fast.score`), the skipping-rope curve and Jacobi elliptic functions (`kexue_fast.rope`), and the
drop-in modules in `kexue_fast.nn`. `python -m kexue_fast.info` says which backend each op runs on and why.
"""

from . import datasets, flows, gan, jose, nn, ortho, rope, score
from .hsic import cka, hsic_stats, hsic_test, median_bandwidth
from .hsic import hsic as hsic  # the function; the sub-package stays importable as `import kexue_fast.hsic`
from .infomap import infomap as infomap  # likewise
from .infomap import map_equation
from .jose import JoSE
from .spectral import conv_operator_norm, conv_operator_norm_bound, power_iteration, spectral_norm_bound

__version__ = "0.1.0"
__all__ = [
    "JoSE",
    "__version__",
    "cka",
    "conv_operator_norm",
    "conv_operator_norm_bound",
    "datasets",
    "flows",
    "gan",
    "hsic",
    "hsic_stats",
    "hsic_test",
    "infomap",
    "jose",
    "map_equation",
    "median_bandwidth",
    "nn",
    "ortho",
    "power_iteration",
    "rope",
    "score",
    "spectral_norm_bound",
]
