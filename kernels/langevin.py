"""The fused Langevin update: one pass x ← x + (α/2) s + √(αT) z over flat tensors (kexue_fast.score).

Unfused, torch reads x and s, writes a temporary, reads it and z, and writes x again (and first writes z from its
own RNG kernel); here x, s are read once, x written once, and z is drawn in registers by Philox (tl.randn) keyed by
a seed held on the device plus the step number, so a sampling loop has no host sync and records into a CUDA graph
(replaying it with a fresh seed in the same device tensor gives fresh noise). With `noise` given, z is read instead
(the exact comparison with torch). Coefficients (α/2, √(αT)) are read from a device tensor in the compute dtype
(float32 for float16/bfloat16/float32 inputs, float64 for float64). No autograd and no dispatch here: see
kexue_fast.score.langevin.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BLOCK = 1024
MAX_RNG_ELEMENTS = 2**31 - 1  # tl.randn's counters are int32 element indices


@triton.jit
def _langevin_update_kernel(x_ptr, s_ptr, z_ptr, coef_ptr, seed_ptr, out_ptr, n, step,
                            HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64 addresses: 2³¹ elements fit on a GPU
    mask = offs < n
    half_step = tl.load(coef_ptr)
    noise_scale = tl.load(coef_ptr + 1)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(half_step.dtype)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(half_step.dtype)
    if HAS_NOISE:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(half_step.dtype)
    else:
        seed = tl.load(seed_ptr)
        z = tl.randn(seed + step, offs.to(tl.int32)).to(half_step.dtype)  # the counter: n ≤ MAX_RNG_ELEMENTS
    out = x + half_step * s + noise_scale * z
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update is computed in (and the coefficients must have)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def langevin_update(x: Tensor, score: Tensor, coef: Tensor, noise: Optional[Tensor] = None,
                    seed: Optional[Tensor] = None, step: int = 0, out: Optional[Tensor] = None) -> Tensor:  # fmt: skip
    """x + coef[0]·score + coef[1]·z for contiguous x, score (and noise) of one shape and dtype.

    coef: [2] device tensor (α/2, √(αT)) in `compute_dtype(x.dtype)`. Without `noise`, z = Philox normal keyed by
    the int64 device scalar `seed` [1] + `step`. out: the result tensor (may be x itself); a new one by default.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Langevin kernel supports float16, bfloat16, float32 and float64, got {x.dtype}")
    for name, t in (("score", score), ("noise", noise), ("out", out)):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must match x in shape, dtype and device: got {tuple(t.shape)} {t.dtype} "
                             f"{t.device}, x is {tuple(x.shape)} {x.dtype} {x.device}")  # fmt: skip
    for name, t in (("x", x), ("score", score), ("noise", noise), ("out", out)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if coef.shape != (2,) or coef.dtype != compute_dtype(x.dtype) or coef.device != x.device:
        raise ValueError(f"coef must be a [2] {compute_dtype(x.dtype)} tensor on {x.device}")
    n = x.numel()
    if noise is None:
        if seed is None or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
            raise ValueError("without noise, seed must be an int64 tensor [1] on x's device")
        if n > MAX_RNG_ELEMENTS:
            raise ValueError(f"in-kernel noise draws at most {MAX_RNG_ELEMENTS} elements per call, got {n}")
    out = torch.empty_like(x) if out is None else out
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK),)
    _langevin_update_kernel[grid](x, score, noise if noise is not None else x, coef, seed if seed is not None else coef,
                                  out, n, step, HAS_NOISE=noise is not None, BLOCK=BLOCK)  # fmt: skip
    return out
