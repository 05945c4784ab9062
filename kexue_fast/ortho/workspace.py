"""Reusable CPU buffers for the Self-Orthogonality backward's ∂R/∂Y.

Each backward of som_regularizer on the CPU returns one ∂R/∂Y per layer, as large as the layer's output. A fresh
buffer of that size comes from the operating system as new pages, and first touching them costs page faults: in
benchmarks/ortho.py's CNN step on a 2-core AVX2 EPYC VM (~140 ms), the C++ backward took 12.7 and 12.9 ms per step
with kept buffers against 16.8 and 18.8 ms with fresh ones (two runs each of python -m
kexue_fast.benchmarks.som_profile --device cpu --batch 32 --steps 20 --cpp-split [--fresh-buffers], at the commit
that added this module). So the buffers are kept here and handed out again once nothing else refers to them.

Why reuse is safe: the cache keeps its own tensor of each buffer and hands out aliases (detach(): the same memory);
a buffer is handed out again only while no alias of it is alive (its storage's use count, checked under a lock).
While the cache holds a buffer, autograd never writes into it: summing it with another gradient of the same tensor
writes into the other one (or into a new tensor), and a leaf's .grad gets a copy (its accumulation takes a gradient
over only when nothing else refers to it). A caller still holding a gradient that came from here keeps it to itself.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
from torch import Tensor

# The most bytes kept between calls (least recently used shapes go first), and buffers kept per shape and dtype (a
# model has several layers of one shape, all in flight in one backward).
MAX_BYTES = 1 << 30
PER_SHAPE = 8

_Key = Tuple[Tuple[int, ...], torch.dtype]
_lock = threading.Lock()
_buffers: OrderedDict[_Key, List[Tensor]] = OrderedDict()
_free_storage_count: Optional[int] = None


def _storage_count(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _supported() -> bool:
    return hasattr(Tensor, "_use_count") and hasattr(torch._C, "_storage_Use_Count")


def _is_free(t: Tensor) -> bool:
    global _free_storage_count
    if _free_storage_count is None:  # what a tensor with no alias reports (the temporary storage wrapper counts too)
        _free_storage_count = _storage_count(torch.empty(1))
    return t._use_count() == 1 and _storage_count(t) == _free_storage_count


def _bytes() -> int:
    return sum(b.numel() * b.element_size() for bufs in _buffers.values() for b in bufs)


def grad_buffer(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """An uninitialized contiguous CPU tensor of `shape` and `dtype`: a kept one that nothing else refers to, or a new
    one (kept for next time while the cache has room)."""
    if not _supported():
        return torch.empty(shape, dtype=dtype)
    key = (tuple(shape), dtype)
    with _lock:
        bufs = _buffers.get(key)
        if bufs is not None:
            _buffers.move_to_end(key)
            for b in bufs:
                if _is_free(b):
                    return b.detach()
        fresh = torch.empty(shape, dtype=dtype)
        size = fresh.numel() * fresh.element_size()
        if size > MAX_BYTES or (bufs is not None and len(bufs) >= PER_SHAPE):
            return fresh
        total = _bytes()
        while total + size > MAX_BYTES and _buffers:
            _, evicted = _buffers.popitem(last=False)
            total -= sum(b.numel() * b.element_size() for b in evicted)
            if evicted is bufs:
                bufs = None
        if bufs is None:
            bufs = _buffers.setdefault(key, [])
        bufs.append(fresh)
        return fresh.detach()


def release() -> None:
    """Drops every kept buffer (memory still referred to elsewhere, e.g. a gradient the caller holds, stays with it)."""
    with _lock:
        _buffers.clear()


def kept_bytes() -> int:
    """Bytes of the buffers kept now."""
    with _lock:
        return _bytes()
