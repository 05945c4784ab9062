"""Reusable CPU buffers for the Self-Orthogonality backward's ∂R/∂Y (and for the Z that the C++ route keeps from its
forward for its backward: som.KEEP_Z).

Each backward of som_regularizer on the CPU returns one ∂R/∂Y per layer, as large as the layer's output. A fresh
buffer of that size comes from the operating system as new pages, and first touching them costs page faults: in
benchmarks/ortho.py's CNN step on a 2-core AVX2 EPYC VM (~140 ms), the C++ backward took 12.7 and 12.9 ms per step
with kept buffers against 16.8 and 18.8 ms with fresh ones (two runs each of python -m
kexue_fast.benchmarks.som_profile --device cpu --batch 32 --steps 20 --cpp-split [--fresh-buffers], at the commit
that added this module). So the buffers are kept here and handed out again once nothing else refers to them.

Why reuse is safe: the cache keeps its own tensor of each buffer and hands out aliases (detach(): the same memory);
a buffer is handed out again only while no alias of it is alive (its storage's use count, checked under a lock).
While the cache holds a buffer, autograd never writes into it on its own: summing it with another gradient of the
same tensor writes into the other one (or into a new tensor). A gradient that came from here and is still held — by
the caller, as a leaf's .grad (autograd may take the alias over as .grad), in another process (a buffer moved to
shared memory is dropped from the cache) — keeps its buffer to itself. Under torch.compile the cache is not used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
from torch import Tensor

# The most bytes kept between calls: past it, free buffers of the least recently used shapes are dropped, and a
# buffer that still does not fit is handed out without being kept.
MAX_BYTES = 1 << 30

_Key = Tuple[Tuple[int, ...], torch.dtype]
_lock = threading.Lock()
_buffers: OrderedDict[_Key, List[Tensor]] = OrderedDict()
_kept = 0  # bytes in _buffers
_free_storage_count: Optional[int] = None


def _storage_count(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _supported() -> bool:
    return hasattr(Tensor, "_use_count") and hasattr(torch._C, "_storage_Use_Count")


def _is_free(t: Tensor) -> bool:
    global _free_storage_count
    if _free_storage_count is None:  # what a tensor with no alias reports (the temporary storage wrapper counts too)
        _free_storage_count = _storage_count(torch.empty(1, device="cpu"))
    return t._use_count() == 1 and _storage_count(t) == _free_storage_count


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _drop(key: _Key, index: int) -> None:
    global _kept
    bufs = _buffers[key]
    _kept -= _nbytes(bufs.pop(index))
    if not bufs:
        del _buffers[key]


def _make_room(size: int) -> None:
    """Drops free buffers, least recently used shapes first, until `size` more bytes fit (buffers in use stay)."""
    for key in list(_buffers):
        bufs = _buffers[key]
        for index in range(len(bufs) - 1, -1, -1):
            if _kept + size <= MAX_BYTES:
                return
            if _is_free(bufs[index]):
                _drop(key, index)


def grad_buffer(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """An uninitialized contiguous CPU tensor of `shape` and `dtype`: an alias of a kept buffer that nothing else
    refers to, or a new one (kept for next time while MAX_BYTES allows)."""
    global _kept
    if not _supported():
        return torch.empty(shape, dtype=dtype, device="cpu")
    key = (tuple(shape), dtype)
    with _lock:
        bufs = _buffers.get(key)
        if bufs is not None:
            _buffers.move_to_end(key)
            for index in range(len(bufs) - 1, -1, -1):
                b = bufs[index]
                if b.untyped_storage().is_shared():  # moved to shared memory: other processes may map it
                    _drop(key, index)
                elif _is_free(b):
                    return b.detach()
        fresh = torch.empty(shape, dtype=dtype, device="cpu")  # whatever torch's default device
        size = _nbytes(fresh)
        if _kept + size > MAX_BYTES:
            _make_room(size)
        if _kept + size <= MAX_BYTES:
            _buffers.setdefault(key, []).append(fresh)
            _buffers.move_to_end(key)
            _kept += size
        return fresh.detach()


def release() -> None:
    """Drops every kept buffer (memory still referred to elsewhere, e.g. a gradient the caller holds, stays with it)."""
    global _kept
    with _lock:
        _buffers.clear()
        _kept = 0


def kept_bytes() -> int:
    """Bytes of the buffers kept now."""
    with _lock:
        return _kept
