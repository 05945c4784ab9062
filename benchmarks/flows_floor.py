"""What bounds one eager Neumann step of the flows benchmark's block on CPU: its matrix products and its fixed cost.

    python -m kexue_fast.benchmarks.flows_floor [--dim 32 --hidden 128 --terms 5 --reps 400]

Prints, for kexue_fast's Neumann block (benchmarks/flows.py's `ours`, 1 thread):
  - the aten operators one training step dispatches (views excluded: they launch no kernel): ours by `auto` (the
    C++ block on the CPU, kexue_fast.flows.chain_cpp), ours on the torch closed form (backend='torch') on the CPU
    path and on the device path (σ̂ and β kept as tensors, as off the CPU; counted here on CPU tensors) and
    normflows'; the step includes the benchmark's loss and, on the torch path, forward's finite check of x; the same
    for the series gradient (neumann_grad=False): C++ block, torch's graph and the torch closed form;
  - the matrix products the torch closed form's step runs (aten mm/addmm/bmm/addr/mv calls, counted with a
    TorchDispatchMode) and their multiply-adds (the C++ block runs the same products), and this core's rate on the
    step's largest product shape ([B, D] × [D, H], median);
  - the step's median time at B = 256 and at B = 2, where the products cost nothing (what is left is per-op and Python
    cost), for the C++ block, the torch closed form and normflows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .flows import _step, normflows_block, ours

_PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "addr", "mv", "matmul", "baddbmm", "vdot", "dot"}


class _CountProducts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Dict[str, int] = {}
        self.macs = 0
        self.ops = 0  # every dispatched operator but views

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += not func.is_view
        name = func.overloadpacket.__name__
        if name in _PRODUCTS:
            self.calls[name] = self.calls.get(name, 0) + 1
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            if name in ("mm", "addmm", "addmm_"):
                self.macs += a.shape[0] * a.shape[1] * b.shape[1]
        return out


def _median_us(fn: Callable[[], object], reps: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _count(step: Callable[[], None]) -> _CountProducts:
    step()
    counter = _CountProducts()
    with counter:
        step()
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--terms", type=int, default=5)
    parser.add_argument("--reps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from kexue_fast.flows import chain_neumann

    from .flows import OnBackend

    block = ours(args.dim, args.hidden, args.terms, True)
    torch_block = OnBackend(ours(args.dim, args.hidden, args.terms, True), "torch")
    x = torch.randn(256, args.dim)
    cpp_ops = _count(_step(block, x)).ops
    counter = _count(_step(torch_block, x))
    on_host, _series_default = chain_neumann._host_scalars, chain_neumann._series_closed_form
    chain_neumann._host_scalars = lambda x: False
    try:
        device_ops = _count(_step(torch_block, x)).ops
    finally:
        chain_neumann._host_scalars = on_host
    nf = normflows_block(args.dim, args.hidden, args.terms, True)
    a, w = torch.randn(256, args.dim), torch.randn(args.dim, args.hidden)
    product_us = _median_us(lambda: a @ w, args.reps * 5)
    rate = 2 * 256 * args.dim * args.hidden / product_us / 1e3
    print(f"block D={args.dim} H={args.hidden} k={args.terms}, float32, 1 thread")
    print(f"  aten operators per step (views excluded): kexue_fast {cpp_ops} (C++ block), {counter.ops} (torch, CPU "
          f"path), {device_ops} (torch, device path); normflows {_count(_step(nf, x)).ops}")  # fmt: skip
    series = {"C++": _count(_step(ours(args.dim, args.hidden, args.terms, False), x)).ops}
    for closed in (False, True):  # the series gradient on torch: its graph (CPU) or the closed form (off the CPU)
        chain_neumann._series_closed_form = lambda x, closed=closed: closed
        try:
            series[closed] = _count(_step(OnBackend(ours(args.dim, args.hidden, args.terms, False), "torch"), x)).ops
        finally:
            chain_neumann._series_closed_form = _series_default
    nf_series = _count(_step(normflows_block(args.dim, args.hidden, args.terms, False), x)).ops
    print(f"  series gradient, operators per step: kexue_fast {series['C++']} (C++ block), {series[False]} (torch "
          f"graph), {series[True]} (torch closed form); normflows {nf_series}")  # fmt: skip
    print(f"  matrix products per step (torch closed form): {dict(sorted(counter.calls.items()))}; mm/addmm "
          f"multiply-adds {counter.macs / 1e6:.1f}M")  # fmt: skip
    print(f"  [256, {args.dim}] x [{args.dim}, {args.hidden}]: {product_us:.1f} us ({rate:.0f} GFLOP/s)")
    for batch in (256, 2):
        xb = torch.randn(batch, args.dim)
        times = {name: _median_us(_step(b, xb), args.reps) for name, b in
                 (("C++", block), ("torch", torch_block), ("normflows", nf))}  # fmt: skip
        print(f"  step at B={batch}: kexue_fast {times['C++'] / 1e3:.3f} ms (C++ block), {times['torch'] / 1e3:.3f} "
              f"ms (torch closed form); normflows {times['normflows'] / 1e3:.3f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
