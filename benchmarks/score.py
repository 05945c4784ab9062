"""Annealed Langevin sampling: one update and a whole NCSN sampling loop, same inputs, one run.

Contestants:
  NCSN-style torch        x = x + (α/2)·s + √α·randn_like(x) with Python-float α, as NCSN's reference code
  kexue_fast torch        langevin_step / annealed_langevin on the torch backend (device-resident coefficients:
                          x + (α/2)s as one addcmul, then += √α z; no host sync)
  kexue_fast Triton       (CUDA) one fused pass, noise drawn in-kernel (Philox), x updated in place
  kexue_fast Triton+graph (CUDA) the whole sampling loop captured once in a CUDA graph and replayed
The loop samples a 2-D mixture of three Gaussians with its exact noisy score (the score is cheap, so the update and
the per-step overhead dominate, as with small score networks); the update alone is timed at two tensor sizes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from kexue_fast.score import AnnealedLangevin, GaussianMixture, geometric_sigmas, langevin_step
from kexue_fast.score.reference import annealed_langevin_reference

from .common import metadata, time_contestants, write_results

SIZES = ((4096, 2), (256, 3 * 32 * 32))


def _triton_ok(device: str) -> bool:
    if device != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def update_contestants(shape, device: str, noise_given: bool) -> Dict[str, Callable[[], object]]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=g)
    s = torch.randn(shape, device=device, generator=g)
    z = torch.randn(shape, device=device, generator=g) if noise_given else None
    alpha = 2e-5

    def ncsn():
        return x + (alpha / 2) * s + math.sqrt(alpha) * (z if noise_given else torch.randn_like(x))

    found = {
        "NCSN-style torch": ncsn,
        "kexue_fast torch": lambda: langevin_step(x, s, alpha, noise=z, backend="torch"),
    }
    if _triton_ok(device):
        out = torch.empty_like(x)
        found["kexue_fast Triton (fused)"] = lambda: langevin_step(x, s, alpha, noise=z, backend="triton", out=out)
    return found


def loop_contestants(device: str, n: int, levels: int, steps: int) -> Dict[str, Callable[[], object]]:
    target = GaussianMixture([0.5, 0.3, 0.2], [[-4.0, -4.0], [4.0, 4.0], [4.0, -4.0]], 0.5, dtype=torch.float32,
                             device=device)  # fmt: skip
    sigmas = geometric_sigmas(10.0, 0.01, levels)
    x0 = torch.rand(n, 2, device=device) * 16 - 8
    sigma_list = [float(v) for v in sigmas]

    def ncsn():
        noises = (torch.randn_like(x0) for _ in range(levels * steps))
        return annealed_langevin_reference(target.score, x0, sigma_list, steps, 2e-5, list(noises))

    torch_sampler = AnnealedLangevin(sigmas, steps, 2e-5, device=device, backend="torch")
    found = {"NCSN-style torch": ncsn, "kexue_fast torch": lambda: torch_sampler(target.score, x0)}
    if _triton_ok(device):
        fused = AnnealedLangevin(sigmas, steps, 2e-5, device=device, backend="triton")
        found["kexue_fast Triton (fused)"] = lambda: fused(target.score, x0)
        static = x0.clone()
        fused(target.score, static.clone(), inplace=True)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fused(target.score, static, inplace=True)

        def replay():
            static.copy_(x0)
            graph.replay()

        found["kexue_fast Triton + CUDA graph"] = replay
    return found


def run(out_dir: Path, quick: bool = True, device: str = "cpu", reps: Optional[int] = None) -> Path:
    reps = reps or (15 if quick else 60)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops: one thread avoids oversubscription noise on a shared machine
    rows: List[list] = []
    try:
        meta = metadata(device)
        for noise_given in (False, True):
            what = "one update, noise given" if noise_given else "one update, noise drawn"
            for shape in SIZES:
                times = time_contestants(update_contestants(shape, device, noise_given), device, reps * 20)
                base = times["NCSN-style torch"]
                for name, t in times.items():
                    rows.append([what, "×".join(map(str, shape)), name, f"{t * 1e6:.1f} µs", f"{base / t:.2f}x"])
        levels, steps = (10, 20) if quick else (10, 100)
        for n in (1024, 16384):
            times = time_contestants(loop_contestants(device, n, levels, steps), device, max(3, reps // 3))
            base = times["NCSN-style torch"]
            for name, t in times.items():
                rows.append([f"sampling loop, {levels}×{steps} steps", f"{n}×2", name, f"{t * 1e3:.1f} ms",
                             f"{base / t:.2f}x"])  # fmt: skip
            print(f"  score/{device}: loop n={n} done", flush=True)
    finally:
        torch.set_num_threads(threads)
    header = ["what", "size", "contestant", "median time", "speed-up vs NCSN-style"]
    timing = ("float32, 1 torch thread; medians of interleaved repetitions. " if device == "cpu"
              else "float32; medians by triton.testing.do_bench. ")  # fmt: skip
    notes = (
        timing + "The loop's score is the exact noisy score of a 3-component 2-D mixture (cheap), so the update "
        "and the per-step overhead dominate."
    )
    return write_results(out_dir, f"score-{device}", "Annealed Langevin: one update and an NCSN sampling loop",
                         meta, header, rows, notes)  # fmt: skip
