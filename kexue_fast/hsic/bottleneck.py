"""The HSIC-bottleneck objective (Ma, Lewis & Kleijn, AAAI 2020, "The HSIC Bottleneck: Deep Learning without
Back-Propagation"): train each hidden representation Z to forget the input X and keep the label Y,

    loss = HSIC(Z, X) − β · HSIC(Z, Y).

Conventions of the paper's code (`hsic_regular`, `hsic_normalized`): Gaussian kernels whose variance is 2σ²·d for a
d-dimensional input (so σ is a per-dimension scale), the biased estimator tr(KHLH)/m² ("plain"), or its normalized
form HSIC(Z, X)/sqrt(HSIC(Z, Z)·HSIC(X, X)) ("normalized", CKA). Labels Y enter one-hot, like the code's targets.
Computed by kexue_fast.hsic: exact, in tiles, with the recompute backward.
"""

from __future__ import annotations

import math
import numbers
from typing import Tuple

import torch
from torch import Tensor

from .api import hsic


def _paper_bandwidth(t: Tensor, sigma: float) -> float:
    return sigma * math.sqrt(t.shape[1])  # exp(−‖a−b‖²/(2σ²d)) = our Gaussian with bandwidth σ·sqrt(d)


def bottleneck_loss(
    z: Tensor,
    x: Tensor,
    y: Tensor,
    *,
    beta: float,
    sigma: float = 5.0,
    normalized: bool = False,
    n_classes: int | None = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, HSIC(Z, X), HSIC(Z, Y)) for hidden activations z [m, dz], inputs x [m, dx] and labels y.

    y: integer class labels [m] (one-hot encoded with `n_classes`, default max(y)+1) or a float target [m, dy].
    beta: the weight of the label term (the paper's λ_y); sigma: the per-dimension kernel scale (the paper's σ).
    normalized=False is the paper's `hsic_regular` (biased HSIC); True its `hsic_normalized`.
    """
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a number, got {type(beta).__name__}")
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    for name, t in (("z", z), ("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim < 1 or t.shape[0] != z.shape[0]:
            raise ValueError(f"z, x and y must have the same number of samples (first axis), got z {tuple(z.shape)}, "
                             f"{name} {tuple(t.shape)}")  # fmt: skip
    for name, t in (("z", z), ("x", x)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    z2 = z.reshape(z.shape[0], -1)
    x2 = x.reshape(x.shape[0], -1).to(z2.dtype)
    if not y.is_floating_point():
        if y.ndim != 1:
            raise ValueError(f"integer labels y must be [m], got shape {tuple(y.shape)}")
        if y.numel() and int(y.min()) < 0:  # one_hot's own error named no argument
            raise ValueError(f"integer labels y must be class indices >= 0, got label {int(y.min())}")
        if n_classes is not None and y.numel() and int(y.max()) >= n_classes:
            raise ValueError(f"n_classes = {n_classes} but y has label {int(y.max())}: need n_classes > max(y)")
        y2 = torch.nn.functional.one_hot(y.long(), n_classes if n_classes is not None else -1).to(z2.dtype)
    else:
        y2 = y.reshape(y.shape[0], -1).to(z2.dtype)
    kw = dict(estimator="biased", normalize=bool(normalized), backend=backend)
    hzx = hsic(z2, x2, bandwidth_x=_paper_bandwidth(z2, sigma), bandwidth_y=_paper_bandwidth(x2, sigma), **kw)
    hzy = hsic(z2, y2, bandwidth_x=_paper_bandwidth(z2, sigma), bandwidth_y=_paper_bandwidth(y2, sigma), **kw)
    return hzx - beta * hzy, hzx, hzy
