"""`ResidualFlow`: a normalizing flow made of invertible residual blocks (and ActNorm / Squeeze), with a standard
normal base: log p(x) = log N(f(x); 0, I) + log|det ∂f/∂x|, sampling by inverting f.

Presets reproduce the two papers' block recipes:
  "iresnet"        (Behrmann et al. 2019): ELU, truncated series (n_terms=5, 1 probe), gradient through the series
  "residual_flow"  (Chen et al. 2019):     LipSwish, Russian roulette (2 exact terms + Geom(0.5) tail), Neumann
                                           gradient computed memory-efficiently
with g built from kexue_fast spectral-norm layers of coefficient `coeff` (Linear for `dense`; for `conv`, 3×3 / 1×1
/ 3×3 convolutions normalized by their *operator* norm at each scale's input shape).
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .iresnet import ActNorm, FactorOut, InvertibleResBlock, LipSwish, Squeeze, _int_at_least
from .spectral_norm import spectral_norm

PRESETS: Dict[str, Dict[str, object]] = {
    "iresnet": {"logdet": "series", "n_terms": 5, "n_probes": 1, "neumann_grad": False, "memory_efficient": False},
    "residual_flow": {
        "logdet": "roulette",
        "n_exact_terms": 2,
        "roulette": "geometric",
        "roulette_p": 0.5,
        "neumann_grad": True,
        "memory_efficient": True,
    },
}
_ACTIVATIONS = {"iresnet": nn.ELU, "residual_flow": LipSwish}


def _preset(name: str) -> Tuple[Dict[str, object], type]:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return dict(PRESETS[name]), _ACTIVATIONS[name]


def _check_coeff(coeff: float) -> float:
    if isinstance(coeff, bool) or not isinstance(coeff, numbers.Real) or not 0 < coeff < 1:
        raise ValueError(f"coeff must be in (0, 1) for invertible blocks, got {coeff!r}")
    return float(coeff)


class ResidualFlow(nn.Module):
    """A flow x -> z through `layers` (each maps x -> (y, logdet [B]) and has `inverse`), standard normal base.

    forward(x) -> (z, logdet [B]); inverse(z) -> x; log_prob(x) -> [B] in nats; sample(n) -> [n, *input_shape].
    With `FactorOut` layers (multi-scale), z is the flat latent [B, D] (D = numel of one input): the channels each
    FactorOut drops, then the last layer's output, each flattened, so log p(x) = log N(z; 0, I) + log|det ∂z/∂x|;
    without them z keeps the last layer's shape. The builders default to n_power_iterations=0: call
    kexue_fast.nn.update_spectral_norms(flow) after each optimizer step (one batched call for every layer), as
    Residual Flows does. Save and load a flow by its state_dict: torch.save of the module itself refuses modules
    with parametrizations (its spectral norms), as it does for torch's own spectral_norm."""

    def __init__(self, layers: Sequence[nn.Module], input_shape: Sequence[int]) -> None:
        super().__init__()
        if (
            not isinstance(input_shape, (tuple, list, torch.Size))
            or not input_shape
            or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in input_shape)
        ):
            raise ValueError(f"input_shape must be a non-empty sequence of ints >= 1 (one sample's shape), got "
                             f"{input_shape!r}")  # fmt: skip
        layers = list(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, FactorOut) and not (
                isinstance(layer, nn.Module) and callable(getattr(layer, "inverse", None))
            ):
                raise TypeError(f"layers[{i}] must be an nn.Module with an inverse (a flow layer mapping x -> (y, "
                                f"logdet)), got {type(layer).__name__}")  # fmt: skip
        self.layers = nn.ModuleList(layers)
        self.input_shape = tuple(int(s) for s in input_shape)
        # Shapes along the flow (Squeeze and FactorOut change them), for putting a flat latent back together.
        shape = self.input_shape
        self._factored_shapes: List[Tuple[int, ...]] = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Squeeze):
                if len(shape) != 3 or shape[1] % 2 or shape[2] % 2:
                    raise ValueError(f"layers[{i}] (Squeeze) needs inputs [C, H, W] with even H and W, got {shape}")
                c, h, w = shape
                shape = (4 * c, h // 2, w // 2)
            elif isinstance(layer, ActNorm) and shape[0] != layer.bias.numel():
                raise ValueError(f"layers[{i}] (ActNorm of {layer.bias.numel()} channels) meets inputs of shape "
                                 f"{shape}")  # fmt: skip
            elif isinstance(layer, FactorOut):
                if len(shape) != 3 or shape[0] != layer.channels:
                    raise ValueError(f"a FactorOut for {layer.channels} channels meets inputs of shape {shape}")
                self._factored_shapes.append((layer.channels - layer.keep, *shape[1:]))
                shape = (layer.keep, *shape[1:])
        self._final_shape = shape

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must be [B, {', '.join(map(str, self.input_shape))}], got {tuple(x.shape)}")
        total = x.new_zeros(x.shape[0])
        factored: List[Tensor] = []
        for layer in self.layers:
            if isinstance(layer, FactorOut):
                x, out = layer.split(x)
                factored.append(out.flatten(1))  # flatten: a batch of 0 too
                continue
            out = layer(x)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"{type(layer).__name__} returned {type(out).__name__}; a ResidualFlow layer must "
                                "return (y, logdet [B])")  # fmt: skip
            x, logdet = out
            total = total + logdet
        if factored:
            x = torch.cat([*factored, x.flatten(1)], dim=1)
        return x, total

    def extra_repr(self) -> str:
        return f"input_shape={getattr(self, 'input_shape', None)}"  # (None while __init__ raises)

    def inverse(self, z: Tensor) -> Tensor:
        if self._factored_shapes:
            numel = math.prod(self.input_shape)
            if z.ndim != 2 or z.shape[1] != numel:
                raise ValueError(f"z must be the flat latent [B, {numel}], got {tuple(z.shape)}")
            sizes = [math.prod(s) for s in self._factored_shapes]
            parts = list(torch.split(z, [*sizes, math.prod(self._final_shape)], dim=1))
            z = parts.pop().reshape(z.shape[0], *self._final_shape)
        for layer in reversed(self.layers):
            if isinstance(layer, FactorOut):
                out = parts.pop()
                z = layer.merge(z, out.reshape(z.shape[0], layer.channels - layer.keep, *z.shape[2:]))
            else:
                z = layer.inverse(z)
        return z

    def log_prob(self, x: Tensor) -> Tensor:
        z, logdet = self(x)
        flat = z.flatten(1)
        base = -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)
        return base + logdet

    @torch.no_grad()
    def sample(self, n: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        ref = next(self.parameters(), None)
        dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.get_default_dtype(), None)
        # The latent's shape: flat with factor-outs, else the last layer's (Squeeze changes it)
        shape = (math.prod(self.input_shape),) if self._factored_shapes else self._final_shape
        z = torch.randn((int(n), *shape), dtype=dtype, device=device, generator=generator)
        if n == 0:
            return z.new_zeros((0, *self.input_shape))
        return self.inverse(z)

    @classmethod
    def dense(
        cls,
        dim: int,
        *,
        n_blocks: int = 4,
        hidden: int = 64,
        n_hidden_layers: int = 1,
        coeff: float = 0.97,
        preset: str = "residual_flow",
        actnorm: bool = True,
        n_power_iterations: int = 0,
        **block_kwargs,
    ) -> ResidualFlow:
        """Blocks g = Linear(dim→hidden) · act · [Linear(hidden→hidden) · act]×(n_hidden_layers−1) · Linear(→dim),
        each Linear spectral-normalized with `coeff`; ActNorm before each block if `actnorm`."""
        coeff = _check_coeff(coeff)
        dim, n_blocks = _int_at_least(dim, 1, "dim"), _int_at_least(n_blocks, 1, "n_blocks")
        hidden, n_hidden_layers = (
            _int_at_least(hidden, 1, "hidden"),
            _int_at_least(n_hidden_layers, 1, "n_hidden_layers"),
        )
        kwargs, act = _preset(preset)
        kwargs.update(block_kwargs)
        layers: List[nn.Module] = []
        for _ in range(n_blocks):
            widths = [dim] + [hidden] * n_hidden_layers + [dim]
            g_layers: List[nn.Module] = []
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                if i:
                    g_layers.append(act())
                g_layers.append(spectral_norm(nn.Linear(a, b), coeff=coeff, n_power_iterations=n_power_iterations))
            if actnorm:
                layers.append(ActNorm(dim))
            layers.append(InvertibleResBlock(nn.Sequential(*g_layers), **kwargs))
        return cls(layers, (dim,))

    @classmethod
    def conv(
        cls,
        input_shape: Sequence[int],
        *,
        n_scales: int = 2,
        n_blocks: int = 2,
        hidden_channels: int = 32,
        coeff: float = 0.97,
        preset: str = "residual_flow",
        actnorm: bool = True,
        factor_out: bool = False,
        n_power_iterations: int = 0,
        **block_kwargs,
    ) -> ResidualFlow:
        """Multi-scale: per scale `n_blocks` blocks g = conv3×3 · act · conv1×1 · act · conv3×3 (the i-ResNet image
        recipe), each conv normalized by its operator norm at that scale's shape; Squeeze between scales. With
        `factor_out`, half of the channels leave the flow after every scale but the last, right after its Squeeze
        (`FactorOut`; the latent is then flat, [B, C·H·W])."""
        coeff = _check_coeff(coeff)
        if not isinstance(input_shape, Sequence) or len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
        c, h, w = (_int_at_least(s, 1, "input_shape") for s in input_shape)
        n_scales, n_blocks = _int_at_least(n_scales, 1, "n_scales"), _int_at_least(n_blocks, 1, "n_blocks")
        hidden_channels = _int_at_least(hidden_channels, 1, "hidden_channels")
        if h % 2 ** (n_scales - 1) or w % 2 ** (n_scales - 1):
            raise ValueError(f"{n_scales} scales squeeze H and W by 2 per scale: H and W must be multiples of "
                             f"{2 ** (n_scales - 1)}, got {input_shape!r}")  # fmt: skip
        kwargs, act = _preset(preset)
        kwargs.update(block_kwargs)
        layers: List[nn.Module] = []
        for scale in range(n_scales):
            if scale:
                layers.append(Squeeze())
                c, h, w = 4 * c, h // 2, w // 2
                if factor_out:  # half of the previous scale's output leaves, squeezed (even for one channel)
                    layers.append(FactorOut(c, c // 2))
                    c //= 2
            for _ in range(n_blocks):
                convs = [
                    (nn.Conv2d(c, hidden_channels, 3, padding=1), (c, h, w)),
                    (nn.Conv2d(hidden_channels, hidden_channels, 1), (hidden_channels, h, w)),
                    (nn.Conv2d(hidden_channels, c, 3, padding=1), (hidden_channels, h, w)),
                ]
                g_layers: List[nn.Module] = []
                for i, (conv, shape) in enumerate(convs):
                    if i:
                        g_layers.append(act())
                    g_layers.append(
                        spectral_norm(conv, coeff=coeff, input_shape=shape, n_power_iterations=n_power_iterations)
                    )
                if actnorm:
                    layers.append(ActNorm(c))
                layers.append(InvertibleResBlock(nn.Sequential(*g_layers), **kwargs))
        return cls(layers, tuple(int(s) for s in input_shape))
