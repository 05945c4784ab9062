"""Gradient taps: a regularizer of a layer output Y whose gradient is added into the model's own gradient of Y by the
pass that computes it, instead of by autograd in a separate pass over both.

A tap is an identity node placed right after the layer (its output, sharing Y's storage, is what the model and the
regularizer consume). The regularizer's backward, which runs first, does not return ∂R/∂Y: it leaves a pending
function on the tap's node; the tap's backward then receives the model's gradient g and returns pending(g) = g + ∂R/∂Y
from one pass (the SOM's C++ core with its `base`, csrc/ortho/som_gram.cpp), or ∂R/∂Y alone when the model sends none,
or g as is when nothing is pending. The regularizer consumes an alias of the tapped output; it defers only where
autograd will run the tap in this backward (torch._C._will_engine_execute_node); an output modified in place after
the tap has another grad_fn, and the plain route runs.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)  # a regularizer-only backward: None from the model, ∂R/∂Y from pending
        ctx.pending = []
        # y.detach(), not y or a view of it: a custom Function's view output may not be modified in place (an
        # nn.ReLU(inplace=True) right after the layer), a detached alias may (then tap_node() no longer sees a tap)
        return y.detach()

    @staticmethod
    def backward(ctx, grad: Optional[Tensor]) -> Optional[Tensor]:
        pending: List[Callable[[Optional[Tensor]], Tensor]] = ctx.pending
        ctx.pending = []
        if pending and torch.is_grad_enabled():
            raise RuntimeError(
                "double backward (create_graph=True) through a regularizer fused into kexue_fast's gradient tap is not "
                "supported: its gradient is computed in closed form without a graph of its own"
            )
        for add in pending:
            grad = add(grad)
        return grad


_TapBackward = _Tap._backward_cls  # type: ignore[attr-defined]


def tap(y: Tensor) -> Tensor:
    """y through a gradient tap: the same values and storage, an identity node for autograd (see the module). Give
    the model the result, and a regularizer an alias of it (result.view_as(result))."""
    return _Tap.apply(y)


def tap_node(y: Tensor):
    """The tap node behind y, an alias of a tapped output (or the tapped output itself), or None (not tapped, or
    modified in place since)."""
    node = y.grad_fn
    if type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return node if isinstance(node, _TapBackward) else None


def will_run(node) -> bool:
    """Whether the running backward will execute `node` (only meaningful inside a backward)."""
    return bool(torch._C._will_engine_execute_node(node))
