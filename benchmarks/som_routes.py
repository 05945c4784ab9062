"""The SOM regularizer's routes on one layer over channel counts and positions: the C++ route (CPU's `auto`) against
the torch path, forward + backward, so that `auto` is not the slower choice for any layer shape.

    python -m kexue_fast.benchmarks.som_routes [--threads 1] [--dtype float32] [--reps 7] [--out benchmarks/results]

For c in 16…512 channels and s in 1…1024 positions per sample (s = 1: a linear layer's [b, c] output, else an NCHW
map [n, c, s]), n samples make about 2^20 elements (at least 2c rows, so that both routes take the k×k Gram);
R = som_regularizer(y) (γ = 10, λ₁ = 100, λ₂ = 1) and ∂R/∂y by torch.autograd.grad, each route timed as the median
of `reps` interleaved repetitions. Writes benchmarks/results/som-routes-cpu.md (som-routes-cpu-float64.md with
--dtype float64; and .csv) with the date, machine, versions and git sha.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Callable, List

import torch

from kexue_fast.ortho import som_regularizer

from .common import metadata, time_interleaved, write_results

CHANNELS = (16, 32, 64, 128, 256, 512)
POSITIONS = (1, 4, 16, 49, 256, 1024)


def layer_shape(c: int, s: int, elements: int = 1 << 20) -> tuple:
    """[n, c] (s = 1) or [n, c, s] with n·c·s ≈ `elements` and n·s ≥ 2c."""
    n = max(1, elements // (c * s), -(-2 * c // s))
    return (n, c) if s == 1 else (n, c, s)


def _forward_backward(y: torch.Tensor, backend: str) -> Callable[[], None]:
    def run() -> None:
        torch.autograd.grad(som_regularizer(y, backend=backend), y)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows: List[list] = []
    for c, s in itertools.product(CHANNELS, POSITIONS):
        shape = layer_shape(c, s)
        y = (torch.randn(shape, generator=torch.Generator().manual_seed(c * 10_000 + s)) * 0.3).to(dtype)
        y.requires_grad_()
        times = time_interleaved({b: _forward_backward(y, b) for b in ("torch", "cpp")}, args.reps)
        ratio = times["torch"] / times["cpp"]
        rows.append([str(list(shape)), f"{times['torch'] * 1e3:.2f}", f"{times['cpp'] * 1e3:.2f}", f"{ratio:.2f}x"])
        print("  ".join(rows[-1]), flush=True)
    notes = (f"{args.dtype}, torch threads {args.threads}; forward + backward of one layer, median of {args.reps} "
             "interleaved repetitions per shape; torch / C++ > 1 where the C++ route is faster.")  # fmt: skip
    stem = "som-routes-cpu" if args.dtype == "float32" else f"som-routes-cpu-{args.dtype}"
    md = write_results(args.out, stem, "SOM on one layer: the C++ route against the torch path", metadata("cpu"),
                       ["layer shape", "torch ms", "C++ ms", "torch / C++"], rows, notes)  # fmt: skip
    print(md.read_text())


if __name__ == "__main__":
    main()
