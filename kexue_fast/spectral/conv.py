"""The operator norm of a convolution (not of its reshaped kernel), by power iteration through conv / conv_transpose.

For a kernel K and inputs of shape (C, *S), the conv is a linear map A: R^{C·|S|} → R^{C'·|S'|}; its norm ‖A‖₂ is
the Lipschitz constant of the layer. Power iteration needs only A and Aᵀ: Aᵀ is the transposed convolution with
the same stride, dilation and groups (Gouk et al. 2021, "Regularisation of neural networks by enforcing Lipschitz
continuity"; Behrmann et al. 2019, i-ResNet, §4). Reshaping K to [C', C·k] and normalizing that matrix (what
torch's spectral_norm does) neither bounds nor equals ‖A‖₂.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import check_float, check_input_shape, check_n_iters, check_positive
from .reference import unit_or_keep

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

IntOrTuple = Union[int, Sequence[int]]


def _tuple(value: IntOrTuple, nd: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),) * nd
    if (
        isinstance(value, (tuple, list))
        and len(value) == nd
        and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in value)
    ):
        return tuple(int(x) for x in value)
    raise ValueError(f"{name} must be an int or a tuple of {nd} ints, got {value!r}")


@dataclass(frozen=True)
class ConvOperator:
    """The geometry of x ↦ conv(x, K) on per-sample inputs of `input_shape` = (C, *S), zero padding.

    pads[d] = (left, right) per spatial dim; 'same' padding may be asymmetric, as in torch.
    """

    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    pads: Tuple[Tuple[int, int], ...]
    dilation: Tuple[int, ...]
    groups: int

    @classmethod
    def build(
        cls,
        weight_shape: Sequence[int],
        input_shape: Sequence[int],
        stride: IntOrTuple = 1,
        padding: Union[IntOrTuple, str] = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
    ) -> ConvOperator:
        nd = len(weight_shape) - 2
        if nd not in _CONV:
            raise ValueError(
                f"weight must be a Conv1d/2d/3d kernel [C_out, C_in/groups, *k], got {tuple(weight_shape)}"
            )
        input_shape = check_input_shape(input_shape, nd, f"this {nd}-d conv")
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if min(weight_shape) < 1:
            raise ValueError(f"weight must not be empty, got shape {tuple(weight_shape)}")
        if weight_shape[0] % groups:
            raise ValueError(f"groups={groups} must divide the weight's C_out = {weight_shape[0]}")
        if input_shape[0] != weight_shape[1] * groups:
            raise ValueError(
                f"input_shape {input_shape} does not fit the conv: it has {input_shape[0]} channels but the weight "
                f"{tuple(weight_shape)} with groups={groups} expects {weight_shape[1] * groups}"
            )
        stride = _tuple(stride, nd, "stride")
        dilation = _tuple(dilation, nd, "dilation")
        if min(stride) < 1 or min(dilation) < 1:
            raise ValueError(f"stride and dilation must be >= 1, got {stride} and {dilation}")
        kernel = tuple(weight_shape[2:])
        if padding == "valid":
            pads = ((0, 0),) * nd
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' needs stride 1, as in torch")
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            pads = tuple((p, p) for p in _tuple(padding, nd, "padding"))
            if min(p for p, _ in pads) < 0:
                raise ValueError(f"padding must be >= 0, got {padding!r}")
        out = []
        for size, (lo, hi), d, k, s in zip(input_shape[1:], pads, dilation, kernel, stride):
            span = size + lo + hi - d * (k - 1) - 1
            if span < 0:
                raise ValueError(
                    f"input_shape {input_shape} does not fit the conv: a spatial size {size} with padding "
                    f"({lo}, {hi}) is smaller than the dilated kernel {d * (k - 1) + 1}"
                )
            out.append(span // s + 1)
        return cls(input_shape, (int(weight_shape[0]), *out), stride, pads, dilation, int(groups))

    @property
    def nd(self) -> int:
        return len(self.stride)

    def _symmetric(self) -> bool:
        return all(lo == hi for lo, hi in self.pads)

    def apply(self, weight: Tensor, x: Tensor) -> Tensor:
        """A x for x [N, C, *S] -> [N, C', *S']."""
        if self._symmetric():
            padding = tuple(lo for lo, _ in self.pads)
        else:
            x = F.pad(x, [p for lo_hi in reversed(self.pads) for p in lo_hi])
            padding = 0
        return _CONV[self.nd](x, weight, None, self.stride, padding, self.dilation, self.groups)

    def adjoint(self, weight: Tensor, y: Tensor) -> Tensor:
        """Aᵀ y for y [N, C', *S'] -> [N, C, *S] (the transposed conv, cropped to the input size)."""
        kernel = weight.shape[2:]
        sym = self._symmetric()
        padding, output_padding = [], []
        for size, out, (lo, hi), d, k, s in zip(
            self.input_shape[1:], self.output_shape[1:], self.pads, self.dilation, kernel, self.stride
        ):
            p = lo if sym else 0
            target = size if sym else size + lo + hi
            padding.append(p)
            output_padding.append(target - ((out - 1) * s - 2 * p + d * (k - 1) + 1))
        x = _CONV_T[self.nd](y, weight, None, self.stride, padding, output_padding, self.groups, self.dilation)
        if not sym:
            x = x[
                (
                    slice(None),
                    slice(None),
                    *(slice(lo, lo + size) for (lo, _), size in zip(self.pads, self.input_shape[1:])),
                )
            ]
        return x


def _unit(x: Tensor, eps: float) -> Tensor:
    return x / torch.linalg.vector_norm(x).clamp_min(eps)


def conv_power_iteration(
    op: ConvOperator, weight: Tensor, u: Tensor, v: Tensor, n_iters: int, tol: Optional[float], eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """In place on u [C', *S'] and v [C, *S]; returns (σ̂ of the last iteration, u, v). No autograd."""
    previous = None
    sigma = torch.zeros((), dtype=weight.dtype, device=weight.device)
    for _ in range(n_iters):
        # u, v kept where the operator maps them to 0 (a zero weight): zeroed, they would stay 0 for good
        wv = op.apply(weight, v.unsqueeze(0))[0]
        unit_or_keep(wv, u, eps, dim=None, out=u)
        w = op.adjoint(weight, u.unsqueeze(0))[0]
        sigma = torch.linalg.vector_norm(w)
        unit_or_keep(w, v, eps, dim=None, out=v)
        if tol is not None:
            value = float(sigma)
            if previous is not None and abs(value - previous) <= tol * value:
                break
            previous = value
    return sigma, u, v


def conv_operator_norm(
    weight: Tensor,
    input_shape: Sequence[int],
    *,
    stride: IntOrTuple = 1,
    padding: Union[IntOrTuple, str] = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    n_iters: int = 1,
    tol: Optional[float] = None,
    u: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    eps: float = 1e-12,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """σ̂ ≈ ‖A‖₂ for the convolution A: x ↦ conv(x, weight) on inputs of `input_shape` (zero padding, no bias).

    Iteration: u ← A v / ‖A v‖, v ← Aᵀu / ‖Aᵀu‖, σ̂ = ⟨u, A v⟩ (Aᵀ = conv_transpose; see the module docstring).

    Args:
        weight: [C_out, C_in/groups, *k] for a 1-, 2- or 3-d conv.
        input_shape: the per-sample input shape (C_in, *spatial), without the batch dimension.
        stride, padding ('same', 'valid', int or tuple), dilation, groups: as in torch.nn.functional.convNd.
        n_iters, tol, eps: as in `power_iteration`.
        u, v: warm starts shaped (C_out, *out_spatial) and (C_in, *spatial). Random v when absent.
    Returns:
        (sigma [], u, v); sigma is differentiable w.r.t. weight (u, v held constant).
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    check_float(weight, "weight")
    op = ConvOperator.build(weight.shape, input_shape, stride, padding, dilation, groups)
    n_iters = check_n_iters(n_iters)
    tol = check_positive(tol, "tol", allow_none=True)
    eps = check_positive(eps, "eps")
    kw = {"dtype": weight.dtype, "device": weight.device}
    for name, vec, shape in (("u", u, op.output_shape), ("v", v, op.input_shape)):
        if vec is not None and (not isinstance(vec, Tensor) or tuple(vec.shape) != shape):
            raise ValueError(f"{name} must be a tensor of shape {shape}")
        if vec is not None and (vec.dtype != weight.dtype or vec.device != weight.device):
            raise ValueError(f"{name} must have the weight's dtype and device ({weight.dtype}, {weight.device}), "
                             f"got ({vec.dtype}, {vec.device})")  # fmt: skip
    v0 = v.detach().clone() if v is not None else torch.randn(op.input_shape, generator=generator, **kw)
    if v is None and u is not None:
        v0 = op.adjoint(weight.detach(), u.detach().unsqueeze(0))[0]
    if not bool(v0.ne(0).any()):  # kept where Wv = 0: a zero start would stay zero (σ̂ = 0 for any weight)
        raise ValueError("v must be a non-zero start vector" if v is not None else "u must be non-zero, with Wᵀu ≠ 0")
    v0 = _unit(v0, eps)
    u0 = torch.zeros(op.output_shape, **kw)  # kept where Wv = 0 (a zero kernel): zeros, not uninitialized memory
    with torch.no_grad():
        sigma, u0, v0 = conv_power_iteration(op, weight.detach(), u0, v0, n_iters, tol, eps)
    if not math.isfinite(float(sigma)):
        raise ValueError("weight contains NaN or Inf")
    if torch.is_grad_enabled() and weight.requires_grad:
        sigma = (u0 * op.apply(weight, v0.unsqueeze(0))[0]).sum()
    return sigma, u0, v0
