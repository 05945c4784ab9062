"""`langevin_step`: one Langevin update x + (α/2) s + √(αT) z, fused in one Triton pass on CUDA (kernels/langevin.py)
or as torch ops (formula: kexue_fast.score.reference)."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch
from .._layout import memory_order

OP = "langevin_step"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_dispatch.register_op(OP, {"triton": _FLOATS, "torch": _FLOATS})


def on_device(generator: torch.Generator, device: torch.device) -> bool:
    """Whether a generator draws on `device` ("cuda" and "cuda:<current>" are one device)."""
    g = generator.device
    if g.type != device.type:
        return False
    current = torch.cuda.current_device() if g.type == "cuda" and (g.index is None or device.index is None) else 0
    return (g.index if g.index is not None else current) == (device.index if device.index is not None else current)


def step_coefficients(step_size: Union[float, Tensor], temperature: Union[float, Tensor], dtype: torch.dtype,
                      device: torch.device) -> Tensor:  # fmt: skip
    """[..., 2] = (α/2, √(αT)) on the device, in the dtype the update is computed in (no host sync)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.as_tensor(step_size, dtype=torch.float64, device=device)
    t = torch.as_tensor(temperature, dtype=torch.float64, device=device)
    a, t = torch.broadcast_tensors(a, t)
    return torch.stack((a / 2, torch.sqrt(a * t)), dim=-1).to(compute)


def host_coefficients(step_size: Union[float, Tensor], temperature: Union[float, Tensor]) -> Optional[tuple]:
    """(α/2, √(αT)) as Python floats when both are numbers or one-element CPU tensors, else None."""
    values = []
    for v in (step_size, temperature):
        if isinstance(v, Tensor):
            if v.numel() != 1 or v.device.type != "cpu":
                return None
            v = float(v)
        values.append(float(v))
    a, t = values
    # a CPU tensor's value is read here anyway, so checked here (a device tensor's is not: that would sync)
    if not (0 < a < math.inf):
        raise ValueError(f"step_size must be finite and > 0, got {a!r}")
    if not (0 <= t < math.inf):
        raise ValueError(f"temperature must be finite and >= 0, got {t!r}")
    return (a / 2, math.sqrt(a * t))  # correctly rounded, as torch.sqrt on the device path


@functools.lru_cache(maxsize=256)
def _device_coefficients(host: Tuple[float, float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """(α/2, √(αT)) on the device, one copy per distinct value: no host-to-device copy per update (nor during a CUDA
    graph capture after a first call). Read-only: the kernels never write it."""
    return torch.tensor(host, dtype=dtype, device=device)


def _check_number(value: Union[float, Tensor], name: str, allow_zero: bool) -> None:
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        return  # checking a device tensor's value would sync with the host
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # NumPy scalars too (np.float32 included)
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 or (allow_zero and value == 0)) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def has_overlap(t: Tensor) -> bool:
    """Whether elements of t share memory as an expanded tensor's do (an axis of size > 1 and stride 0), where torch's
    in-place ops and copy_ refuse to write."""
    return any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride()))


def apply_step(x: Tensor, score: Tensor, coef: Union[Tensor, Tuple[float, float]], chosen: str,
               noise: Optional[Tensor], generator: Optional[torch.Generator], seed: Optional[Tensor], step: int,
               out: Optional[Tensor]) -> Tensor:  # fmt: skip
    """The update with precomputed coefficients (α/2, √(αT)) — a device tensor [2], or Python floats for the torch
    path on CPU, where reading them costs no sync and saves the 0-d tensor arithmetic — and a chosen backend. The
    result has x's memory format where x is dense (a channels_last x stays channels_last)."""
    if chosen == "triton":
        order = memory_order(x)
        if order is not None:  # the elementwise kernel runs on x's memory as it lies: no copy of x, nor of `out` or a
            # score of x's layout (in-kernel noise is then keyed by memory position, not by the shape's order)
            inverse = [order.index(d) for d in range(x.ndim)]
            permuted = None if noise is None else noise.permute(order)
            result = apply_step(x.permute(order), score.permute(order), coef, chosen, permuted, generator, seed, step,
                                None if out is None else out.permute(order))  # fmt: skip
            return out if out is not None else result.permute(inverse)
        from ..kernels.langevin import langevin_update

        if noise is None and seed is None:
            if generator is None or on_device(generator, x.device):  # drawn where it is used: no copy
                seed = torch.randint(0, 2**62, (1,), generator=generator, device=x.device)
            else:
                seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).to(x.device)
        strided_out = out is not None and not out.is_contiguous()  # the kernel writes contiguous buffers
        result = langevin_update(x.contiguous(), score.contiguous(), coef,
                                 noise.contiguous() if noise is not None else None, seed, step,
                                 None if strided_out else out)  # fmt: skip
        return out.copy_(result) if strided_out else result
    if noise is None:
        if generator is None or on_device(generator, x.device):
            noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        else:
            noise = torch.randn(x.shape, dtype=x.dtype, device=generator.device, generator=generator).to(x.device)
    elif out is not None and out.untyped_storage().data_ptr() == noise.untyped_storage().data_ptr():
        noise = noise.clone()  # the first pass writes out before the second reads the noise
    if isinstance(coef, tuple) and x.dtype in (torch.float16, torch.bfloat16):  # computed in float32, as on Triton
        result = torch.add(x.float(), score.float(), alpha=coef[0]).add_(noise.float(), alpha=coef[1]).to(x.dtype)
        return result if out is None else out.copy_(result)
    if isinstance(coef, tuple):  # CPU: two in-place-able passes with scalar coefficients
        result = torch.add(x, score, alpha=coef[0], out=out)
        return result.add_(noise, alpha=coef[1])
    if coef.dtype == x.dtype:  # two passes: x + (α/2)s, then += √(αT) z (coefficients stay on the device)
        result = torch.addcmul(x, score, coef[0], out=out)
        return result.addcmul_(noise, coef[1])
    compute = coef.dtype
    result = (x.to(compute) + coef[0] * score.to(compute) + coef[1] * noise.to(compute)).to(x.dtype)
    return out.copy_(result) if out is not None else result


def langevin_step(
    x: Tensor,
    score: Tensor,
    step_size: Union[float, Tensor],
    *,
    temperature: Union[float, Tensor] = 1.0,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    out: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """One Langevin update for p^{1/T}: x + (α/2)·score + √(α·T)·z, z ~ N(0, I) (Welling & Teh 2011; NCSN).

    x, score: [...] of one shape and dtype; step_size α > 0 and temperature T ≥ 0: floats or 0-d device tensors.
    noise: z [...] (drawn from `generator` when None; the Triton path then draws it in-kernel with a seed from
    `generator`, keyed by memory position). out: write the result there (may be x). The result has x's memory format
    where x is dense (channels_last stays channels_last; the Triton kernel then runs on x's memory as it lies). backend:
    "auto" (Triton for CUDA tensors, else torch), "triton", "torch". No gradient (a sampler's step).
    """
    if not isinstance(x, Tensor) or not isinstance(score, Tensor):
        raise TypeError("x and score must be tensors")
    if not x.is_floating_point() or x.dtype not in _FLOATS:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if score.shape != x.shape:
        raise ValueError(f"score must have x's shape {tuple(x.shape)}, got {tuple(score.shape)}")
    if noise is not None and not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a tensor of x's shape or None, got {type(noise).__name__}")
    if out is not None and not isinstance(out, Tensor):
        raise TypeError(f"out must be a tensor of x's shape and dtype or None, got {type(out).__name__}")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError("out must have x's shape and dtype")
    _check_number(step_size, "step_size", allow_zero=False)
    _check_number(temperature, "temperature", allow_zero=True)
    chosen = _dispatch.choose(OP, x.device, x.dtype, backend)
    host = host_coefficients(step_size, temperature)
    if host is not None and chosen == "torch" and x.device.type == "cpu":
        coef = host
    elif host is not None:  # numbers: a cached device copy (a sampler repeats its step sizes), else one small copy
        coef = _device_coefficients(host, torch.float64 if x.dtype == torch.float64 else torch.float32, x.device)
    else:
        coef = step_coefficients(step_size, temperature, x.dtype, x.device)
        if coef.shape != (2,):
            raise ValueError("step_size and temperature must be scalars (use a loop or the samplers for schedules)")
    score = score.to(x.dtype)
    noise = noise.to(x.dtype) if noise is not None else None
    with torch.no_grad():
        return apply_step(x.detach(), score.detach(), coef, chosen, noise, generator, None, 0, out)
