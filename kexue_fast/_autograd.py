"""`first_order`: for autograd.Functions whose backward is written out without a graph of its own; `no_autocast`: a
region computed in its inputs' dtypes under mixed precision; `transformed`: tensors of a torch.func transform."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch


def first_order(backward: Optional[Callable] = None, *, op: str = "", instead: str = "") -> Callable:
    """Wraps a Function's backward so that double backward (backward with create_graph=True) raises a clear error,
    naming the public `op` and what supports it `instead` where given (@first_order(op=..., instead=...)).

    torch's once_differentiable only errors when the incoming gradient itself has a graph; with a plain upstream
    gradient the result would carry no graph, and a second-order term through this Function would be silently
    missing from any larger expression (a gradient penalty, a Hessian-vector product)."""
    if backward is None:
        return functools.partial(first_order, op=op, instead=instead)

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            name = op or f"kexue_fast's {type(ctx).__name__.removesuffix('Backward')}"
            raise RuntimeError(
                f"double backward (create_graph=True) through {name} is not supported: its gradient is computed in "
                "closed form without a graph of its own" + (f"; {instead}" if instead else "")
            )
        return backward(ctx, *grads)

    return checked


def no_autocast(device_type: str):
    """torch.autocast(device_type, enabled=False), or a null context where autocast is off on that device already
    (entering torch.autocast costs microseconds of host time on every call: a spectral norm's forward, each SOM loss)
    or where the device has none (meta: shape inference). Under torch.compile only meta is told apart: torch 2.11's
    dynamo cannot trace the availability query (torch._C._is_autocast_available), which broke every compiled graph
    through it (a spectral norm's σ̂)."""
    if device_type == "meta":
        return contextlib.nullcontext()
    if torch.compiler.is_compiling():
        return torch.autocast(device_type, enabled=False)
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def transformed(*tensors: object) -> bool:
    """Whether any of `tensors` is a torch.func transform's (grad, vjp, jacrev, vmap...: functorch-wrapped), where
    autograd.Functions without setup_context, the C++ core (data pointers) and host reads of the values cannot run.
    False under torch.compile, which cannot trace the query (and handles the transforms itself)."""
    if torch.compiler.is_compiling():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(isinstance(t, torch.Tensor) and wrapped(t) for t in tensors)
