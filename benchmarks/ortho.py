"""The Self-Orthogonality regularizer: its cost inside a small CNN's training step, and the cheap vs direct formula.

1. Overhead: one SGD step of a small CIFAR-shaped CNN (4 conv + BN + ReLU, 2 max-pools, a linear head; float32,
   batch 32 at 32×32) with and without SOM on its four convolution outputs (kexue_fast.nn.SelfOrthogonality,
   γ = 10, λ₁ = 100, λ₂ = 1). Reported: ms per step and the overhead (with / without − 1); with --full over 5 rounds
   (each contestant's median time, and the median of the rounds' ratios with their range); the issue's goal is ≤ 10%.
   On the CPU the step with SOM runs twice: the torch backend and the C++ core (csrc/ortho/som_gram.cpp, `auto`'s
   choice there). On CUDA three times: the torch backend, the fused Triton kernel with IEEE float32 dots (torch's
   default for matmuls), and the kernel with TF32 dots (torch.backends.cuda.matmul.allow_tf32 = True); then the step
   and the step with SOM on the Triton kernels each captured in a CUDA graph and replayed (`graphed`), their overhead
   against each other: the device's share alone, where the eager rows carry the host's too (the lent machines' hosts
   bound the eager step in some runs: benchmarks/results/ortho-cuda.md). Then the same CNN channels_last (model and
   inputs; the NHWC maps that mixed-precision GPU training uses), its step with and without SOM on the fast route
   (C++ or Triton, and the CUDA graphs): its outputs are read as rows [N·H·W, C] in place.
2. FLOPs of the step without and with SOM (torch.utils.flop_counter): the regularizer's Gram products are the floor
   of its overhead, whatever the elementwise work costs.
3. Formula: forward + backward of R for one layer output Y [b, k] by the definition (Θ = ẐᵀẐ materialized,
   kexue_fast.ortho.reference.som_direct) and by som_regularizer (the ẐẐᵀ identity when b < k; the k×k Gram with
   off-diagonal sums on Θ when b ≥ k; the C++ core on the CPU, the Triton kernel on CUDA).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from kexue_fast.nn.self_orthogonality import SelfOrthogonality
from kexue_fast.ortho import reference, som_regularizer

from .common import markdown_table, metadata, time_contestants, write_results


def small_cnn() -> nn.Sequential:
    def block(cin: int, cout: int) -> List[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 10))  # fmt: skip


def training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, som: SelfOrthogonality,
                  backend: Optional[str], opt: torch.optim.Optimizer) -> Callable[[], None]:  # fmt: skip
    """One SGD step; with backend=None the hooks are paused (som.enabled = False): the plain step, as if unhooked."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        som.enabled = backend is not None
        if backend is not None:
            som.backend = backend.split()[0]
        try:
            loss = nn.functional.cross_entropy(model(x), target)
        finally:
            som.enabled = True
        if backend is not None:
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = backend.endswith("tf32")  # the kernel's dots follow torch's flag
            try:
                loss = loss + som.loss()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
        loss.backward()
        opt.step()

    return step


def graphed(step: Callable[[], None]) -> Callable[[], None]:
    """The training step captured in one CUDA graph (torch's whole-network capture: three warm-up steps on a side
    stream, then torch.cuda.graph), as its replay: no host work per step, so what it times is the device's. Relaxed
    capture mode: the SOM kernels' pointer tables for the capture's own (graph-pool) addresses are built during the
    capture, from pinned host memory that the table cache keeps for the replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="relaxed"):
        step()
    return graph.replay


def cnn_setup(device: str, batch: int, memory_format: torch.memory_format = torch.contiguous_format):
    """(model, SGD optimizer, x, target, SelfOrthogonality hooked on the four convolutions), seeded; model and x in
    `memory_format` (channels_last: NHWC maps, as in mixed-precision training on GPUs)."""
    torch.manual_seed(0)
    model = small_cnn().to(device, memory_format=memory_format)
    # lr 1e-3: the SOM term's large gradient (λ₁ = 100) moves some BatchNorm weights far in the first step; the
    # values stay finite and the costs do not depend on them
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, 10, (batch,), device=device)
    return model, opt, x, target, SelfOrthogonality(model)


def step_flops(device: str, batch: int) -> Dict[str, float]:
    """FLOPs of one training step without and with SOM (torch.utils.flop_counter: convolutions, their backward and
    the matrix products): what the regularizer adds before any elementwise work, so the floor of its overhead."""
    from torch.utils.flop_counter import FlopCounterMode

    model, opt, x, target, som = cnn_setup(device, batch)
    counts = {}
    for name, backend in (("step", None), ("step + SOM (torch)", "torch")):
        with FlopCounterMode(display=False) as counter:
            training_step(model, x, target, som, backend, opt)()
        counts[name] = counter.get_total_flops()
    som.remove()
    return counts


def gram_flops(device: str, batch: int) -> int:
    """FLOPs of the exact regularizer's products at their least, from the hooked outputs' shapes: the Gram's upper
    triangle forward (b·k(k+1)) and ∂Y = (A Z) ⊙ (1 − Z²) backward (2bk²) per layer, what the C++ and Triton paths
    compute (the torch path's full Gram adds b·k² more)."""
    model, _, x, _, som = cnn_setup(device, batch)
    model(x)
    total = 0
    for y, dim in som.recorder.take():
        k = y.shape[dim]
        b = y.numel() // k
        total += b * k * (k + 1) + 2 * b * k * k
    som.remove()
    return total


def overhead_rows(device: str, batch: int, reps: int, rounds: int = 1) -> List[list]:
    """Per model and contestant: ms per step (median over `rounds` rounds, each the median of `reps` interleaved
    repetitions) and the overhead vs that model's plain step (the median of the rounds' ratios, with their range when
    rounds > 1: on a shared machine one round's ratio can be far from the others'). The models: the CNN in NCHW (the
    default memory format: issue 7's goal) and the same CNN channels_last, on the fast route alone."""
    fast = "triton" if device == "cuda" else "cpp"
    backends = ["torch", fast] + (["triton tf32"] if fast == "triton" else [])
    setups = [(f"CNN, batch {batch}", torch.contiguous_format, backends),
              (f"CNN, batch {batch}, channels_last", torch.channels_last, [fast])]  # fmt: skip
    steps: Dict[Tuple[str, str], Callable[[], None]] = {}
    hooks = []
    for label, memory_format, backends in setups:
        model, opt, x, target, som = cnn_setup(device, batch, memory_format)
        hooks.append(som)
        steps[label, "step"] = training_step(model, x, target, som, None, opt)
        for backend in backends:
            steps[label, f"step + SOM ({backend})"] = training_step(model, x, target, som, backend, opt)
        if device == "cuda":  # the same steps without their host side: each captured in a CUDA graph and replayed
            try:
                for name in ("step", f"step + SOM ({fast})"):
                    steps[label, f"{name}, CUDA graph"] = graphed(steps[label, name])
            except RuntimeError as e:  # reported, not fatal: the eager rows stand on their own
                print(f"  ortho/cuda: {label}: the CUDA-graph rows are left out, capture failed: {e}", flush=True)
    named = {f"{label}: {name}": fn for (label, name), fn in steps.items()}
    per_round = [time_contestants(named, device, reps) for _ in range(rounds)]
    for som in hooks:
        som.remove()
    rows = []
    for label, name in steps:
        t = statistics.median(times[f"{label}: {name}"] for times in per_round)
        over = ""
        base = "step, CUDA graph" if name.endswith("CUDA graph") else "step"
        if name != base and (label, base) in steps:
            ratios = sorted((times[f"{label}: {name}"] / times[f"{label}: {base}"] - 1) * 100 for times in per_round)
            over = f"{statistics.median(ratios):+.1f}%"
            if rounds > 1:
                over += f" ({ratios[0]:+.1f}% to {ratios[-1]:+.1f}%)"
        rows.append([label, name, f"{t * 1e3:.2f}", over])
    return rows


def _grad_of(fn: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        torch.autograd.grad(fn(y), y)

    return run


def formula_rows(device: str, shapes, reps: int) -> List[list]:
    rows = []
    for b, k in shapes:
        y = (torch.randn(b, k, device=device) * 0.3).requires_grad_()
        contestants = {
            "direct": _grad_of(reference.som_direct, y),
            "som_regularizer (torch)": _grad_of(lambda t: som_regularizer(t, backend="torch"), y),
        }
        if device == "cuda":
            contestants["som_regularizer (triton)"] = _grad_of(lambda t: som_regularizer(t, backend="triton"), y)
        elif b >= k:  # b < k takes the ẐẐᵀ form in torch on every backend: a cpp row would time the same code
            contestants["som_regularizer (cpp)"] = _grad_of(lambda t: som_regularizer(t, backend="cpp"), y)
        times = time_contestants(contestants, device, reps)
        for name, t in times.items():
            speed = "" if name == "direct" else f"{times['direct'] / t:.2f}x"
            rows.append([f"b={b} k={k}", name, f"{t * 1e3:.3f}", speed])
    return rows


def run(out_dir: Path, quick: bool = True, device: str = "cpu") -> Path:
    reps = 10 if quick else 40
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # one thread: less noise from other processes on a shared machine
    meta = metadata(device)
    try:
        batch = 32 if device == "cpu" else 256
        rounds = 1 if quick else 5
        rows = overhead_rows(device, batch, reps, rounds)
        flops = step_flops(device, batch)
        print(f"  ortho/{device}: overhead done", flush=True)
        shapes = [(64, 1024), (128, 4096), (4096, 64), (16384, 128), (4096, 256)]
        if device == "cuda":
            shapes += [(131072, 64), (32768, 256), (16384, 512), (8192, 1024)]  # the last two: TRITON_AUTO_MAX_CHANNELS
        formula = formula_rows(device, shapes, reps)
    finally:
        torch.set_num_threads(threads)
    added = flops["step + SOM (torch)"] - flops["step"]
    least = gram_flops(device, batch)
    notes = (
        f"FLOPs of one step (torch.utils.flop_counter): {flops['step'] / 1e9:.3f} G without SOM, SOM on the torch path "
        f"adds {added / 1e9:.3f} G ({added / flops['step']:.1%}); the Gram's upper triangle and the backward product "
        f"alone, as the C++ and Triton paths compute them, are {least / 1e9:.3f} G ({least / flops['step']:.1%}): the "
        "floor of the overhead at the convolutions' efficiency, before any elementwise pass (tanh, twice where the "
        "backward recomputes Z; 1 − Z²) and memory pass (Y read, then read again or Z written and read; ∂Y written "
        "and added).\n\n"
        "Formula: forward + backward of R for one float32 Y [b, k] (γ = 10, λ₁ = 100, λ₂ = 1), median of "
        f"{reps} interleaved repetitions"
        + (" (1 thread)" if device == "cpu" else " (triton.testing.do_bench)")
        + "; direct = Θ = ẐᵀẐ materialized (kexue_fast.ortho.reference.som_direct).\n\n"
        + markdown_table(["shape", "contestant", "ms", "speed-up vs direct"], formula)
    )
    header = ["model", "contestant", "ms / step", "overhead vs step"]
    if rounds > 1:  # two statistics: a contestant's median time, and the median of the rounds' own ratios
        header[2:] = [f"ms / step (median of {rounds} rounds)", "overhead (median of the rounds' ratios, range)"]
    title = "Self-Orthogonality regularizer: training-step overhead and formula cost"
    return write_results(out_dir, f"ortho-{device}", title, meta, header, rows, notes)
