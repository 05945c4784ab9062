"""Threads for the C++ cores inside a torch training step: the C++ flows block and the C++ SOM Gram on one thread
and on torch's thread count, against torch's own (multithreaded) path, all at torch's thread count.

    python -m kexue_fast.benchmarks.cpp_threads [--threads 2] [--reps 15] [--out benchmarks/results]

The C++ flows block starts its own threads (csrc/common/parallel.hpp); torch's OpenMP workers keep spinning after
each parallel op, so within a step the two pools contend for the cores. The C++ SOM core runs on torch's own OpenMP
team where it finds one loaded (csrc/common/omp_team.hpp; its own threads before). This prints the medians
(interleaved repetitions) that set kexue_fast.flows.chain_cpp.THREADS / MULTITHREAD_WORK and
kexue_fast.ortho.som.CPP_THREADS (som.cpp_threads() where unset):
  - a flows step (benchmarks/flows.py's Neumann block, k = 5) at three sizes: the C++ block on 1 and on T threads,
    and the torch closed form (backend='torch');
  - the CNN step of benchmarks/ortho.py (batch 32): without SOM, with SOM on torch, on the C++ Gram on 1 and on T
    threads.
Writes benchmarks/results/cpp-threads-cpu.md (and .csv) with the date, machine, versions and git sha.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Dict, List

import torch

from .common import metadata, time_interleaved, write_results


def _medians(steps: Dict[str, Callable[[], None]], reps: int) -> Dict[str, float]:
    return {name: t * 1e3 for name, t in time_interleaved(steps, reps).items()}


def _with(module, attr: str, value, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        before = getattr(module, attr)
        setattr(module, attr, value)
        try:
            step()
        finally:
            setattr(module, attr, before)

    return run


def _backend(name: str, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        before = os.environ.get("KEXUE_FAST_BACKEND")
        os.environ["KEXUE_FAST_BACKEND"] = name
        try:
            step()
        finally:
            if before is None:
                del os.environ["KEXUE_FAST_BACKEND"]
            else:
                os.environ["KEXUE_FAST_BACKEND"] = before

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=max(2, torch.get_num_threads()))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t = args.threads
    from kexue_fast.flows import chain_cpp
    from kexue_fast.ortho import som

    from .flows import _step, ours
    from .ortho import cnn_setup, training_step

    rows: List[list] = []
    for dim, hidden, batch in ((32, 128, 256), (32, 128, 1024), (64, 512, 512)):
        torch.manual_seed(0)
        x = torch.randn(batch, dim)
        cpp, torch_path = _step(ours(dim, hidden, 5, True), x), _step(ours(dim, hidden, 5, True), x)
        times = _medians({"C++ block, 1 thread": _backend("cpp", _with(chain_cpp, "THREADS", 1, cpp)),
                          f"C++ block, {t} threads": _backend("cpp", _with(chain_cpp, "THREADS", t, cpp)),
                          "torch closed form": _backend("torch", torch_path)}, args.reps)  # fmt: skip
        work = batch * 2 * dim * hidden
        for name, ms in times.items():
            rows.append([f"flows step D={dim} H={hidden} B={batch} (B·Σ out·in {work / 1e6:.1f}M)", name, f"{ms:.2f}"])
    model, opt, x, target, hooks = cnn_setup("cpu", 32)
    cpp_step = training_step(model, x, target, hooks, "cpp", opt)
    times = _medians({"step": training_step(model, x, target, hooks, None, opt),
                      "step + SOM (torch)": training_step(model, x, target, hooks, "torch", opt),
                      "step + SOM (C++ Gram, 1 thread)": _with(som, "CPP_THREADS", 1, cpp_step),
                      f"step + SOM (C++ Gram, {t} threads)": _with(som, "CPP_THREADS", t, cpp_step)},
                     args.reps)  # fmt: skip
    hooks.remove()
    base = times["step"]
    for name, ms in times.items():
        over = "" if name == "step" else f" ({(ms / base - 1) * 100:+.1f}%)"
        rows.append(["CNN step, batch 32", name, f"{ms:.2f}{over}"])
    from kexue_fast import _core

    team = "on torch's OpenMP team" if _core.omp_team() else "on threads of its own (no OpenMP team found)"
    notes = (f"torch threads {t}; median of {args.reps} interleaved repetitions per row group. The C++ flows block's "
             "threads start per call (csrc/common/parallel.hpp) beside torch's OpenMP workers; the C++ SOM core runs "
             f"{team} (csrc/common/omp_team.hpp).")  # fmt: skip
    md = write_results(args.out, "cpp-threads-cpu", "C++ cores' threads inside a torch step", metadata("cpu"),
                       ["case", "contestant", "ms / step"], rows, notes)  # fmt: skip
    print(md.read_text())


if __name__ == "__main__":
    main()
