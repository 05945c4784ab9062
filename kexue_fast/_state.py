"""Module state that a second evaluation must not disturb: buffers (power-iteration vectors, running statistics)
and the random number generators.

Recomputing a module (a memory-efficient backward) or reading its parametrized weights (a Lipschitz report) runs
code that may update buffers in place, e.g. torch's and kexue_fast's spectral-norm power iterations or BatchNorm's
running statistics, and that may draw random numbers (Dropout). `replaying` runs such code on throwaway copies of
the buffers as they were at a chosen moment, with the random generators as they were then, and leaves the module's
own buffer tensors untouched (same objects, same values, same version counters: graphs that saved them stay valid).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

Slots = List[Tuple[nn.Module, str, Tensor]]


def buffer_slots(module: object) -> Slots:
    """(owner, name, tensor) for every buffer of `module` (nothing for a plain callable)."""
    if not isinstance(module, nn.Module):
        return []
    return [(m, name, t) for m in module.modules() for name, t in m._buffers.items() if t is not None]


@dataclass
class State:
    """Buffers (copies) and random generator states of one moment."""

    buffers: Slots = field(default_factory=list)
    cpu_rng: Optional[Tensor] = None
    cuda_rng: Optional[Tuple[int, Tensor]] = None  # (device index, state)


def capture(module: object, device: Optional[torch.device] = None, rng: bool = True) -> State:
    """Copies of the buffers of `module` and, with rng, the CPU generator's state and that of `device` if CUDA."""
    with torch.no_grad():
        buffers = [(m, name, t.clone()) for m, name, t in buffer_slots(module)]
    state = State(buffers)
    if rng:
        state.cpu_rng = torch.get_rng_state()
        if device is not None and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            state.cuda_rng = (index, torch.cuda.get_rng_state(index))
    return state


# Replays swap module attributes: one at a time across threads (two backward passes of one module from two
# threads would otherwise each "restore" the other's copies); re-entrant for replays nested in a replay.
_REPLAY_LOCK = threading.RLock()


@contextlib.contextmanager
def replaying(state: State) -> Iterator[None]:
    """Within the block, every captured buffer is a fresh copy of its captured value and the random generators
    restart from their captured states; afterwards the original buffer tensors and generator states are back.
    Buffers removed (or set to None) since the capture are left alone."""
    with _REPLAY_LOCK, contextlib.ExitStack() as stack:
        live = [(m, name, saved) for m, name, saved in state.buffers if m._buffers.get(name) is not None]
        originals = [(m, name, m._buffers[name]) for m, name, _ in live]
        devices = [state.cuda_rng[0]] if state.cuda_rng is not None else []
        if state.cpu_rng is not None:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.set_rng_state(state.cpu_rng)
            if state.cuda_rng is not None:
                torch.cuda.set_rng_state(state.cuda_rng[1], state.cuda_rng[0])
        try:
            with torch.no_grad():
                for m, name, saved in live:
                    m._buffers[name] = saved.clone()
            yield
        finally:
            for m, name, original in originals:
                m._buffers[name] = original
