"""Certified Lipschitz upper bounds of residual branches, and `lipschitz_report`.

Per layer (all upper bounds, in the ℓ2 norm):
- Linear: Gram-iteration bound on its effective weight (kexue_fast.spectral_norm_bound).
- ConvNd (zero padding, any stride/dilation): ‖A‖₂ ≤ max over groups Σ_{kernel positions p} ‖K_p‖₂, since the conv is
  Σ_p (shift_p ∘ K_p) and each shift-and-subsample has norm ≤ 1 (triangle inequality).
- Activations: LipSwish, ReLU, LeakyReLU(|slope| ≤ 1), ELU(α ≤ 1), Tanh, Softplus, Identity ≤ 1; Sigmoid ≤ 1/4.
A Sequential's bound is the product. Unknown modules give None (no certificate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from ..spectral import spectral_norm_bound

_ONE_LIPSCHITZ = (nn.ReLU, nn.Tanh, nn.Softplus, nn.Identity, nn.Dropout)


def activation_bound(module: nn.Module) -> Optional[float]:
    from ..nn.iresnet import LipSwish

    if isinstance(module, (LipSwish, *_ONE_LIPSCHITZ)):
        return 1.0
    if isinstance(module, nn.Sigmoid):
        return 0.25
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
        bounds = spectral_norm_bound(mats).reshape(groups, -1).sum(1)
        return float(bounds.max())
    return activation_bound(module)


def branch_bound(g: nn.Module) -> Optional[float]:
    """Product of the layer bounds of a Sequential branch (or one layer); None if any layer has no rule."""
    layers = list(g) if isinstance(g, nn.Sequential) else [g]
    total = 1.0
    for layer in layers:
        b = branch_bound(layer) if isinstance(layer, nn.Sequential) else layer_bound(layer)
        if b is None:
            return None
        total *= b
    return total


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
    for name, module in model.named_modules():
        if isinstance(module, InvertibleResBlock):
            g = module.g
            layers = list(g) if isinstance(g, nn.Sequential) else [g]
            blocks.append(BlockReport(name or "(model)", [layer_bound(x) for x in layers], branch_bound(g)))
    return LipschitzReport(blocks)
