"""Host cost of a differentiable power_iteration call: the eager autograd Function against the torch.library custom op.

    python -m kexue_fast.benchmarks.spectral_host [--device cpu] [--layers 8] [--reps 300]

kexue_fast.power_iteration runs, when its weights need a gradient, the autograd Function _PowerIteration in eager
mode and the custom op kexue_fast::power_iteration under torch.compile (one opaque node). Both run the same body and
gradient; this times σ̂'s forward + backward through each (the custom op called directly, as compiled code would
reach it) on `layers` small matrices (64 × 32, one iteration), interleaved, and prints the medians: the custom op's
Python dispatch and autograd wrapper are the difference.
"""

from __future__ import annotations

import argparse
import sys

import torch

import kexue_fast

from .common import time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    module = sys.modules["kexue_fast.spectral.power_iteration"]
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(64, 32, generator=g).to(args.device).requires_grad_() for _ in range(args.layers)]
    v0 = [torch.randn(32, generator=g).to(args.device) for _ in mats]
    backend = kexue_fast._dispatch.choose(module.OP, mats[0].device, mats[0].dtype, "auto")

    def function() -> None:
        sigma = module._PowerIteration.apply(1, None, 1e-12, backend, len(mats), *mats, *v0)[0]
        torch.autograd.grad(sigma.sum(), mats)

    def custom_op() -> None:
        sigma = module._power_iteration_op(mats, v0, 1, None, 1e-12, backend)[0]
        torch.autograd.grad(sigma.sum(), mats)

    times = time_interleaved({"autograd Function": function, "custom op": custom_op}, args.reps)
    print(f"power_iteration forward + backward, {args.layers} matrices 64 × 32, {args.device} ({backend} backend), "
          f"median of {args.reps}: autograd Function {times['autograd Function'] * 1e6:.0f} µs, custom op "
          f"{times['custom op'] * 1e6:.0f} µs")  # fmt: skip


if __name__ == "__main__":
    main()
