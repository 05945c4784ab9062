"""Certified Lipschitz upper bounds of residual branches, and `lipschitz_report`.

Per layer (all upper bounds, in the ℓ2 norm):
- Linear: Gram-iteration bound on its effective weight (kexue_fast.spectral_norm_bound).
- ConvNd (zero padding, any stride/dilation): the smaller of the largest norm of the kernel's symbol on a DFT grid
  (kexue_fast.spectral.conv_operator_norm_bound) and max over groups Σ_{kernel positions p} ‖K_p‖₂ (the conv is
  Σ_p (shift_p ∘ K_p) and each shift-and-subsample has norm ≤ 1; valid for every input size, ~√(kernel size)
  loose). The symbol's grid is that of the input shape an operator-norm spectral norm was built for — the
  certificate then holds for inputs of that size or smaller, as the normalization itself does — else one valid
  for every size; layers whose symbol would cost more than ~1e9 multiply-adds of SVDs (wide channels) keep the
  per-position bound.
- Activations: LipSwish, ReLU, LeakyReLU(|slope| ≤ 1), ELU(α ≤ 1), Tanh, Softplus, Identity ≤ 1; Sigmoid ≤ 1/4.
- Dropout(p): 1/(1 − p) in training mode (the kept units are scaled up), 1 in eval mode.
A Sequential's bound is the product. Unknown modules give None (no certificate).
Reading the bounds changes no buffer: power iterations that reading a parametrized weight would advance run on
copies (kexue_fast._state.replaying), and kexue_fast's own spectral norms read their current u, v.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import torch
from torch import nn

from .._state import capture, replaying
from ..nn.spectral_norm import SpectralNorm, frozen_power_iteration
from ..spectral import conv_operator_norm_bound, spectral_norm_bound
from ..spectral.bound import symbol_grid

_SYMBOL_WORK = 1e9  # SVD multiply-adds: ~1 s on one core
_ONE_LIPSCHITZ = (nn.ReLU, nn.Tanh, nn.Softplus, nn.Identity)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def activation_bound(module: nn.Module) -> Optional[float]:
    from ..nn.iresnet import LipSwish

    if isinstance(module, (LipSwish, *_ONE_LIPSCHITZ)):
        return 1.0
    if isinstance(module, nn.Sigmoid):
        return 0.25
    if isinstance(module, _DROPOUTS):
        if not module.training:
            return 1.0
        return 0.0 if module.p >= 1 else 1.0 / (1.0 - module.p)
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.ELU):
        return max(1.0, module.alpha)
    return None


@torch.no_grad()
def layer_bound(module: nn.Module) -> Optional[float]:
    """Certified upper bound on the Lipschitz constant of one layer, or None if it has no rule."""
    if isinstance(module, nn.Linear):
        return float(spectral_norm_bound(module.weight.detach().double()))
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.padding_mode != "zeros":
            return None
        w = module.weight.detach().double()
        groups = module.groups
        per_group = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)  # [G, out/G, in/G, positions]
        mats = per_group.permute(0, 3, 1, 2).reshape(-1, w.shape[0] // groups, w.shape[1])
        by_positions = float(spectral_norm_bound(mats).reshape(groups, -1).sum(1).max())
        shape = _input_shape(module)
        spans = [d * (k - 1) for d, k in zip(module.dilation, w.shape[2:])]
        grid, _ = symbol_grid(spans, None if shape is None else list(shape[1:]))
        free, _ = symbol_grid(spans, None)
        c_out, c_in = w.shape[0] // groups, w.shape[1]
        work = min(math.prod(grid), math.prod(free)) * groups * c_out * c_in * min(c_out, c_in)
        if work > _SYMBOL_WORK:  # wide layers: the per-position bound only (the SVDs would take seconds)
            return by_positions
        by_symbol = float(conv_operator_norm_bound(w, shape, dilation=module.dilation, groups=groups))
        return min(by_positions, by_symbol)
    return activation_bound(module)


def _input_shape(conv: nn.Module) -> Optional[tuple]:
    """The input shape an operator-norm kexue_fast spectral norm was built for (a tighter grid), else None."""
    for norm in getattr(getattr(conv, "parametrizations", None), "weight", []):
        if isinstance(norm, SpectralNorm) and norm.conv is not None:
            return tuple(norm.conv.input_shape)
    return None


def branch_bound(g: nn.Module) -> Optional[float]:
    """Product of the layer bounds of a Sequential branch (or one layer); None if any layer has no rule."""
    with _unchanged(g):
        return _branch_bound(g)


@contextlib.contextmanager
def _unchanged(module: nn.Module) -> Iterator[None]:
    with frozen_power_iteration(), replaying(capture(module, rng=False)):
        yield


def _layer_bounds(g: nn.Module) -> List[Optional[float]]:
    """The bound of each layer of a Sequential branch (a nested Sequential as one layer), or of g itself."""
    layers = list(g) if isinstance(g, nn.Sequential) else [g]
    return [_branch_bound(layer) if isinstance(layer, nn.Sequential) else layer_bound(layer) for layer in layers]


def _product(bounds: List[Optional[float]]) -> Optional[float]:
    return None if any(b is None for b in bounds) else math.prod(bounds)  # type: ignore[arg-type]


def _branch_bound(g: nn.Module) -> Optional[float]:
    return _product(_layer_bounds(g))


@dataclass
class BlockReport:
    name: str
    layer_bounds: List[Optional[float]] = field(default_factory=list)
    bound: Optional[float] = None

    @property
    def certified_invertible(self) -> bool:
        return self.bound is not None and self.bound < 1.0


@dataclass
class LipschitzReport:
    blocks: List[BlockReport]

    @property
    def all_certified(self) -> bool:
        return all(b.certified_invertible for b in self.blocks)

    def __str__(self) -> str:
        lines = [f"{'block':<28} {'Lip(g) bound':>12}  invertible  layer bounds"]
        for b in self.blocks:
            bound = "none" if b.bound is None else f"{b.bound:.6f}"
            layers = ", ".join("?" if x is None else f"{x:.4f}" for x in b.layer_bounds)
            lines.append(f"{b.name:<28} {bound:>12}  {'yes' if b.certified_invertible else 'NO':<10}  {layers}")
        return "\n".join(lines)


def lipschitz_report(model: nn.Module) -> LipschitzReport:
    """Per residual block of `model`: certified upper bounds of each layer of g and of g, and whether the block is
    certified invertible (bound < 1)."""
    from ..nn.iresnet import InvertibleResBlock

    blocks = []
    with _unchanged(model):
        for name, module in model.named_modules():
            if isinstance(module, InvertibleResBlock):
                bounds = _layer_bounds(module.g)  # each layer's bound once: conv symbols cost SVDs
                blocks.append(BlockReport(name or "(model)", bounds, _product(bounds)))
    return LipschitzReport(blocks)
