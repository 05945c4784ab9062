"""Relaunching a compiled Triton kernel without JITFunction's per-call work.

`kernel[grid](*args, **constexprs)` binds every argument, computes Triton's specialization of each (pointer alignment,
integer values), hashes them into a cache key and looks the compiled kernel up on every call: on a lent H200 machine's
host one backward launch of the SOM kernels took 81.5 µs of host time that way and 15.7 µs through its CompiledKernel
(`python -m kexue_fast.benchmarks.som_profile --host-costs` at 97d765a), in training steps whose host time can bound
them. `launch` keeps, per call signature, the CompiledKernel that the first JIT launch returned and calls its runner
directly afterwards. The signature holds what Triton specializes on, conservatively: each tensor argument's dtype and
whether its address is 16-byte aligned, each integer's exact value, every constexpr and launch option, the grid and the
current device; floats (annotated tl.float64 in our kernels) are passed as values. The runner takes every parameter in
order, constexprs included (Triton 3.3 and later; the launcher skips the constexprs); older Tritons, ROCm builds, the
interpreter (whose launches return no CompiledKernel) and KEXUE_FAST_DIRECT_LAUNCH=0 take the JIT path every time.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import torch
import triton

_RUNNERS: OrderedDict = OrderedDict()
_MAX_RUNNERS = 256


def _supported() -> bool:
    try:
        major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    # NVIDIA only: the one launcher whose runner convention was checked on a GPU (ROCm builds take the JIT path)
    nvidia = torch.version.hip is None
    return (major, minor) >= (3, 3) and nvidia and os.environ.get("KEXUE_FAST_DIRECT_LAUNCH", "1") != "0"


ENABLED = _supported()
DEVICE_TYPES = ("cuda",)  # where launches return a CompiledKernel (tests add "cpu" with a stand-in kernel)


def _signature(args: Sequence) -> tuple:
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            sig.append(type(a))
        else:
            sig.append(a)
    return tuple(sig)


def launch(kernel, grid: int, args: Sequence, constexprs: dict, options: dict) -> None:
    """kernel[(grid,)](*args, **constexprs, **options): args are the kernel's leading runtime parameters in order
    (the first a tensor on the launch's device), constexprs name every remaining parameter, options the launch
    options (num_warps, num_stages)."""
    device = args[0].device if isinstance(args[0], torch.Tensor) else None
    if not ENABLED or device is None or device.type not in DEVICE_TYPES:
        kernel[(grid,)](*args, **constexprs, **options)
        return
    current = torch.cuda.current_device() if device.type == "cuda" else device.index
    key = (kernel, grid, current, tuple(constexprs.items()), tuple(options.items()), _signature(args))
    entry = _RUNNERS.get(key)
    if entry is not None:
        runner, tail = entry
        runner(*args, *tail)
        return
    compiled = kernel[(grid,)](*args, **constexprs, **options)
    names = kernel.arg_names
    if compiled is None or not hasattr(compiled, "__getitem__") or set(names[len(args) :]) != set(constexprs):
        return
    _RUNNERS[key] = (compiled[(grid, 1, 1)], tuple(constexprs[n] for n in names[len(args) :]))
    if len(_RUNNERS) > _MAX_RUNNERS:
        _RUNNERS.popitem(last=False)


def clear() -> None:
    """Forgets the kept runners (the next launch of each signature goes through the JIT again)."""
    _RUNNERS.clear()
