"""Where the fused SOM Triton path spends a CNN training step: the profile behind benchmarks/ortho.py's overhead rows.

    python -m kexue_fast.benchmarks.som_profile [--device cuda] [--batch 256] [--steps 5] [--sweep [--settings JSON]]
    ncu --nvtx --nvtx-include measure/ --kernel-name regex:_som_ python -m kexue_fast.benchmarks.som_profile \
        --kernels-once [--settings JSON]
    python -m kexue_fast.benchmarks.som_profile --device cpu --batch 32 --steps 20 --cpp-split [--fresh-buffers] \
        [--no-taps] [--recompute-z] [--compare-cores OTHER.so ... [--compare-keep-z]]
    python -m kexue_fast.benchmarks.som_profile --device cpu --batch 32 --host-overhead
    python -m kexue_fast.benchmarks.som_profile --device cpu --batch 32 --steps 30 --host-split
    python -m kexue_fast.benchmarks.som_profile --device cpu --batch 32 --memory-floor
    [MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_MMAP_THRESHOLD_=4000000000] python -m \
        kexue_fast.benchmarks.som_profile --device cpu --batch 32 --steps 60 --faults
    python -m kexue_fast.benchmarks.som_profile --device cpu --batch 32 --taps 5 [--threads 2]
    python -m kexue_fast.benchmarks.som_profile --host-costs [--batch 2]
    python -m kexue_fast.benchmarks.som_profile --device cpu --batch 32 --cpp-layers [--compare-cores OTHER.so ...] \
        [--shapes NxCxS ...] [--cold]
    TRITON_INTERPRET=1 python -m kexue_fast.benchmarks.som_profile --device cpu --batch 32 --host-overhead \
        --route triton

On an H200 the step with SOM measured 34.7 ms on the Triton kernels against 5.1 ms on the torch path at 0cff550;
on an H100 at 1889232 it took 4.22 ms against a 3.42 ms step, on an H200 at 60a352b 3.62 ms against 3.20 (one
round), at 6fdae85 4.56 ms against 3.21 and at 97d765a 3.45 ms against 3.07 (benchmarks/results/ortho-cuda.md), the
kernels' history, launch settings, Nsight Compute profiles and host costs in benchmarks/results/som-sweep-cuda.md.
This prints, for the step of benchmarks/ortho.py without SOM (hooks paused) and with each backend: the wall time per
step and the time the host took to issue it (on CUDA the host runs ahead until a synchronization: the two are close
where the host bounds the step), then torch.profiler's
operators sorted by device time and by host time (kernel launches and Python included), and cProfile's top Python
functions, so a GPU session can tell host overhead (tables built per call, launch cost) from slow kernels.
--sweep (CUDA) times the fused kernels alone under each launch setting instead (with each setting's error against
float64 per layer beside torch's float32 path's), then the training step under the defaults and under the fastest
settings within the tests' bar, 2× torch's float32 error on each layer (--step-rounds rounds; 0 skips the step).
--kernels-once (CUDA) runs the fused kernels once per setting inside an NVTX range "measure", for Nsight Compute
(benchmarks/gpu_check.sh's ncu stage). On CUDA the wall-time line also counts the host synchronizations in one step
(torch.cuda.set_sync_debug_mode): each lets the device idle while the host issues what follows. --host-costs (CUDA)
times the host side of the Triton route's pieces, one kernel launch (through Triton's JITFunction and through its
CompiledKernel) and the whole step at a host-bound batch (2 by default).
On CPU it profiles the torch path and the C++ Gram on one torch thread (--threads N: N) instead (batch 2 by default:
pass --batch 32 for benchmarks/ortho.py's CPU step). --cpp-split (CPU) prints the wall time of the C++ forward and
backward calls inside that step, per step, against the step without SOM (--taps ROUNDS: that step with
SelfOrthogonality's taps and without them, interleaved); --fresh-buffers gives the backward a new ∂R/∂Y buffer per
call instead of kexue_fast.ortho.workspace's kept ones (what the page faults of fresh memory cost). --cpp-layers (CPU)
times the two C++ calls alone on the CNN's layer shapes, with their products' GFLOP/s, interleaved with other builds
of the extension (--compare-cores: copies of build/dev/_core*.so made at other commits). --host-overhead
(CPU) times som_regularizer's forward and forward + backward on the step's four recorded conv outputs with the C++
calls replaced by no-ops: the Python and torch side of the C++ route (--host-split: that side inside the step, piece
by piece, each run from the caches the model's ops left); with --route triton, the same for the Triton
route's launchers (launches as no-ops), through its eager autograd Function and through its torch.library custom ops.
--memory-floor (CPU) prints the bytes the C++ route's calls move per step and their time at the machine's read
bandwidth: what the calls would take if memory alone bounded them. --faults (CPU) counts the minor page faults of the
step without and with SOM, interleaved, with their times: glibc's heap trimming and fresh maps of large tensors, which
move both steps' time from one step to the next.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import functools
import io
import json
import os
import pstats
import re
import statistics
import time
from typing import List, Optional, Sequence

import torch

from .common import time_interleaved
from .ortho import cnn_setup, training_step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_backend(backend: Optional[str], device: str, batch: int, steps: int) -> None:
    """Wall time per step, the host's share of it, then torch.profiler and cProfile tables; backend None: the step
    with the hooks paused (benchmarks/ortho.py's plain step)."""
    model, opt, x, target, som = cnn_setup(device, batch)
    step = training_step(model, x, target, som, backend, opt)
    for _ in range(2):  # compile and fill the caches
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host = time.perf_counter() - start  # on CUDA the host runs ahead of the device until the synchronization
    _sync(device)
    wall = time.perf_counter() - start
    label = "none (hooks paused)" if backend is None else backend
    print(f"\n=== SOM backend {label}: {wall / steps * 1e3:.2f} ms / step ({device}), the host's calls "
          f"{host / steps * 1e3:.2f} ms / step (host-bound where the two are close)"
          f"{_host_syncs(step) if device == 'cuda' else ''}")  # fmt: skip
    if backend is None:
        som.remove()
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    averages = prof.key_averages()
    if device == "cuda":
        print(averages.table(sort_by="self_cuda_time_total", row_limit=15))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    _sync(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    print(text.getvalue())
    som.remove()


def _host_syncs(step) -> str:
    """', N host synchronizations in a step' as torch's sync debug mode counts them (each stalls the host until the
    device catches up: the host then issues the rest of the step while the device idles), and the first's message."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch's words for a sync ("called a synchronizing CUDA operation"), not the debug mode's own prototype notice
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchronizing CUDA operation" in str(w.message)]
    return f", {len(syncs)} host synchronizations in a step" + (f" (first: {syncs[0]})" if syncs else "")


def kernels_once(batch: int, settings: Sequence[dict]) -> None:
    """The fused kernels once each (kernels.penalty, then kernels.gram_backward) on the CNN's float32 conv outputs,
    under each setting in turn (after one untimed call that compiles them): the launches for a kernel profiler, such
    as gpu_check.sh's ncu stage (`ncu --kernel-name regex:_som_ ...`)."""
    from kexue_fast.kernels import som as kernels

    model, _, x, _, som = cnn_setup("cuda", batch)
    model(x)
    ys = [y.detach().contiguous() for y, _ in som.recorder.take()]
    som.remove()
    layouts = [(y.shape[0], y.shape[1], y[0, 0].numel()) for y in ys]
    scale = torch.ones(len(ys), dtype=torch.float64, device="cuda")
    for setting in settings:
        with _Setting(kernels, setting):
            kernels.gram_backward(ys, layouts, 10.0, kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12)[1], scale)
            torch.cuda.synchronize()
            print(f"setting {setting or 'defaults'}: launches follow", flush=True)
            with torch.cuda.nvtx.range("measure"):  # ncu --nvtx --nvtx-include measure/ profiles these only
                a = kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12)[1]
                kernels.gram_backward(ys, layouts, 10.0, a, scale)
            torch.cuda.synchronize()


def host_costs(batch: int, reps: int = 300) -> None:
    """CUDA: the host's µs per call (median of `reps` interleaved calls, the device synchronized after each round so
    that no launch queue fills up and blocks the host) of each piece of the SOM Triton route, at a batch small enough
    that the device keeps up (host-bound): the launchers and the autograd Function, with the kernels launched through
    Triton's JIT and directly (kernels/_launch.py), one backward kernel launch each way, and the CNN's whole step
    without SOM, with it on both launch routes, and on the torch path."""
    from kexue_fast.kernels import _launch
    from kexue_fast.kernels import som as kernels
    from kexue_fast.ortho import som_regularizer

    model, opt, x, target, som = cnn_setup("cuda", batch)
    model(x)
    ys = [y.detach().contiguous() for y, _ in som.recorder.take()]
    leaves = [y.clone().requires_grad_() for y in ys]
    layouts = [(y.shape[0], y.shape[1], y[0, 0].numel()) for y in ys]
    scale = torch.ones(len(ys), dtype=torch.float64, device="cuda")
    a = kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12)[1]
    launches = []
    real = kernels._som_grad_kernel

    class Capture:  # records the backward's first launch (grid, arguments) as it goes through
        arg_names = real.arg_names

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, args, kwargs))
                return real[grid](*args, **kwargs)

            return launch

    kernels._som_grad_kernel = Capture()
    try:
        kernels.gram_backward(ys, layouts, 10.0, a, scale)
    finally:
        kernels._som_grad_kernel = real
    grid, args, kwargs = launches[0]
    enabled = _launch.ENABLED

    def through_jit(fn):
        def run() -> None:
            _launch.ENABLED = False
            try:
                fn()
            finally:
                _launch.ENABLED = enabled

        return run

    def both() -> None:
        torch.autograd.grad(som_regularizer(leaves, backend="triton"), leaves)

    kept = som_regularizer(leaves, backend="triton")  # a forward whose graph is kept, for backward alone

    def backward_only() -> None:
        torch.autograd.grad(kept, leaves, retain_graph=True)

    plain = leaves[0].sum()  # autograd's own cost on CUDA: a one-node graph

    def engine_only() -> None:
        torch.autograd.grad(plain, leaves[0], retain_graph=True)

    pieces = {}
    for route, wrap in (("JIT", through_jit), ("direct", lambda fn: fn)):
        pieces[f"kernels.penalty (2 Gram launches, chunk sum, finish), {route}"] = wrap(
            lambda: kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12)
        )
        pieces[f"kernels.gram_backward (2 launches), {route}"] = wrap(
            lambda: kernels.gram_backward(ys, layouts, 10.0, a, scale)
        )
        pieces[f"som_regularizer forward + autograd.grad, {route}"] = wrap(both)
        pieces[f"autograd.grad of a kept som_regularizer forward, {route}"] = wrap(backward_only)
    pieces["autograd.grad of y.sum() (the engine alone)"] = engine_only
    pieces["one _som_grad_kernel launch through Triton's JIT"] = lambda: real[grid](*args, **kwargs)
    try:  # Triton 3.3+: the CompiledKernel's runner takes every parameter in order (the launcher skips constexprs)
        compiled = real[grid](*args, **kwargs)
        named = {**dict(zip(real.arg_names, args)), **kwargs}
        ordered = [named[n] for n in real.arg_names]
        runner = compiled[(grid[0], 1, 1)]
        runner(*ordered)
        pieces["the same launch through its CompiledKernel"] = lambda: runner(*ordered)
    except Exception as e:  # another Triton's launcher: that row is left out
        print(f"CompiledKernel launch unavailable here: {type(e).__name__}: {e}")
    pieces["training step, hooks paused"] = training_step(model, x, target, som, None, opt)
    pieces["training step + SOM (triton), JIT"] = through_jit(training_step(model, x, target, som, "triton", opt))
    pieces["training step + SOM (triton), direct"] = training_step(model, x, target, som, "triton", opt)
    pieces["training step + SOM (torch)"] = training_step(model, x, target, som, "torch", opt)
    samples = {name: [] for name in pieces}
    for i in range(reps + 3):
        for name, fn in pieces.items():
            start = time.perf_counter()
            fn()
            if i >= 3:  # three warm-up rounds
                samples[name].append(time.perf_counter() - start)
        torch.cuda.synchronize()
    som.remove()
    print(f"\n=== host µs per call, CUDA, CNN at batch {batch} (median of {reps} interleaved rounds):")
    for name, t in samples.items():
        print(f"  {name:70} {statistics.median(t) * 1e6:8.1f} µs")


# launch settings tried by --sweep (module-level constants of kernels/som.py, over its defaults; torch's allow_tf32 off,
# or on with "tf32": True); each new combination compiles the kernels again (seconds each on a fresh machine)
PREVIOUS_DEFAULTS = {"GRAM_DOTS": "ieee", "GRAD_DOTS": "ieee", "GRAM_STAGES": None}  # before 2f1a310
SWEEP_SETTINGS: List[dict] = [  # around the defaults; the H200 runs of 2026-11-27 are in som-sweep-cuda.md
    {},
    PREVIOUS_DEFAULTS,
    {"GRAM_DOTS": "ieee"},
    {"GRAM_WAVES": 8},
    {"GRAM_WAVES": 2},
    {"GRAM_ROWS": 32},
    {"GRAM_WARPS": 2},
    {"GRAM_ROWS": 128, "GRAM_WARPS": 8},
    {"GRAD_ROWS": 32, "GRAD_WARPS": 4},
    {"GRAD_DOTS": "tf32x3", "GRAD_WARPS": 4},
]
_KNOBS = ("GRAM_WARPS", "GRAD_WARPS", "GRAM_ROWS", "GRAD_ROWS", "GRAM_WAVES", "GRAM_STAGES", "GRAD_STAGES", "GRAM_DOTS",
          "GRAD_DOTS", "GRAM_PREFETCH", "GRAD_PERSIST")  # fmt: skip


def parse_settings(text: str) -> List[dict]:
    """--settings: a JSON list of settings (objects of _KNOBS and "tf32"), replacing SWEEP_SETTINGS."""
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--settings must be a JSON list of objects: {e}") from None
    if not isinstance(settings, list) or not all(isinstance(x, dict) for x in settings):
        raise ValueError(f"--settings must be a JSON list of objects, got {text!r}")
    unknown = sorted({k for x in settings for k in x} - {*_KNOBS, "tf32"})
    if unknown:
        raise ValueError(f"--settings names unknown knobs {unknown}; known: {list(_KNOBS)} and tf32")
    return settings


class _Setting:
    """Applies a sweep setting (kernels/som.py constants and torch's allow_tf32) inside a `with` block."""

    def __init__(self, kernels, setting: dict) -> None:
        self.kernels, self.setting = kernels, setting

    def __enter__(self) -> None:
        self.saved = {n: getattr(self.kernels, n) for n in _KNOBS}, torch.backends.cuda.matmul.allow_tf32
        for name, value in self.setting.items():
            if name != "tf32":
                setattr(self.kernels, name, value)
        torch.backends.cuda.matmul.allow_tf32 = bool(self.setting.get("tf32", False))

    def __exit__(self, *exc) -> None:
        knobs, torch.backends.cuda.matmul.allow_tf32 = self.saved
        for name, value in knobs.items():
            setattr(self.kernels, name, value)


def _layer_errors(got: Sequence[torch.Tensor], truth: Sequence[torch.Tensor]) -> List[float]:
    """Per layer: max |got − truth| / max |truth| (one R value, or one layer's ∂R/∂Y)."""
    return [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(got, truth)]


def sweep(batch: int, step_rounds: int, settings: Optional[List[dict]] = None) -> None:
    """The fused kernels on the CNN's four conv outputs (float32, CUDA), forward (kernels.penalty) and backward
    (kernels.gram_backward) timed by triton.testing.do_bench (median) for each launch setting, with the bytes floor:
    Y read once forward, Y read and ∂Y written backward, at the device's copy bandwidth (a Y-sized copy, timed here).
    Each setting's R and ∂ΣR/∂Y are checked against float64 layer by layer, with the tests' bar
    (tests/test_kernels_som.py): within 2× torch's own float32 error on that layer plus 1e-6 of its largest entry. Then
    the whole training step (benchmarks/ortho.py) with SOM under the defaults, the previous ones, the fastest accurate
    setting (forward + backward) and the composition of the fastest accurate forward and backward settings (checked
    the same way), against the step without SOM: `step_rounds` rounds, each contestant timed by do_bench in turn."""
    import triton.runtime.errors
    import triton.testing

    from kexue_fast.kernels import som as kernels
    from kexue_fast.ortho import som_regularizer

    model, opt, x, target, som = cnn_setup("cuda", batch)
    model(x)  # a training forward: the hooks record the conv outputs
    ys = [y.detach().contiguous() for y, _ in som.recorder.take()]
    layouts = [(y.shape[0], y.shape[1], y[0, 0].numel()) for y in ys]
    total = sum(y.numel() for y in ys)
    flat = torch.empty(total, device="cuda")
    src = torch.randn(total, device="cuda")
    copy_ms = triton.testing.do_bench(lambda: flat.copy_(src), return_mode="median")
    per_byte = copy_ms / (2 * 4 * total)
    print(f"layouts (N, C, S): {layouts}; Y = {total * 4 / 1e6:.1f} MB; Y-sized copy {copy_ms * 1e3:.1f} us "
          f"({2 * 4 * total / copy_ms / 1e6:.0f} GB/s)")  # fmt: skip
    print(f"bytes floor at that bandwidth: forward {4 * total * per_byte * 1e3:.1f} us, backward "
          f"{8 * total * per_byte * 1e3:.1f} us")  # fmt: skip
    truth = {}
    for dtype in (torch.float64, torch.float32):
        with _Setting(kernels, {}):
            leaves = [y.detach().to(dtype, copy=True).requires_grad_() for y in ys]
            r = som_regularizer(leaves, reduction="none", backend="torch")
            truth[dtype] = (list(r.detach().double()), [g.double() for g in torch.autograd.grad(r.sum(), leaves)])
    torch_err = [_layer_errors(got, want) for got, want in zip(truth[torch.float32], truth[torch.float64])]
    print(f"torch float32 path (allow_tf32 off), relative error per layer: R {_fmt(torch_err[0])}, dY "
          f"{_fmt(torch_err[1])}")  # fmt: skip
    print(f"kernels.som defaults: { {n: getattr(kernels, n) for n in _KNOBS} }")
    scale = torch.ones(len(ys), dtype=torch.float64, device="cuda")

    def check(setting: dict):
        """(R errors, dY errors, within the tests' bar) of a setting, or None where it is out of resources."""
        with _Setting(kernels, setting):
            try:
                r, a = kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12)
                dy = kernels.gram_backward(ys, layouts, 10.0, a, scale).split([y.numel() for y in ys])
            except triton.runtime.errors.OutOfResources as e:  # a block too large for this GPU: the next setting
                print(f"{setting!s:100} {e}")
                return None
        errs = (_layer_errors(list(r), truth[torch.float64][0]),
                _layer_errors([d.view(y.shape) for d, y in zip(dy, ys)], truth[torch.float64][1]))  # fmt: skip
        ok = all(e <= 2 * t + 1e-6 for got, ref in zip(errs, torch_err) for e, t in zip(got, ref))
        return errs[0], errs[1], ok and not setting.get("tf32")

    results = []
    for setting in SWEEP_SETTINGS if settings is None else settings:
        checked = check(setting)
        if checked is None:
            continue
        err_r, err_dy, accurate = checked
        with _Setting(kernels, setting):
            a = kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12)[1]
            fwd = triton.testing.do_bench(lambda: kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12),
                                          return_mode="median")  # fmt: skip
            bwd = triton.testing.do_bench(lambda a=a: kernels.gram_backward(ys, layouts, 10.0, a, scale),
                                          return_mode="median")  # fmt: skip
        results.append((setting, fwd, bwd, accurate))
        print(f"{setting or 'defaults'!s:100} forward {fwd * 1e3:7.1f} us  backward {bwd * 1e3:7.1f} us  "
              f"error R {max(err_r):.1e} dY {max(err_dy):.1e}"
              f"{'' if accurate else '  (not within the tests bar on some layer)'}")  # fmt: skip
    if step_rounds < 1:
        som.remove()
        return
    candidates = {"defaults": {}, f"previous defaults {PREVIOUS_DEFAULTS}": PREVIOUS_DEFAULTS}
    ok = [res for res in results if res[3]]
    if ok:
        best = min(ok, key=lambda res: res[1] + res[2])[0]
        best_fwd = min(ok, key=lambda res: res[1])[0]
        best_bwd = min(ok, key=lambda res: res[2])[0]
        composed = {**{k: v for k, v in best_fwd.items() if not k.startswith("GRAD_")},
                    **{k: v for k, v in best_bwd.items() if k.startswith("GRAD_")}}  # fmt: skip
        candidates[f"fastest {best}"] = best
        checked = check(composed) if composed != best else None
        if checked is not None and checked[2]:  # the forward's A feeds the backward: the pair is checked together
            candidates[f"composed {composed}"] = composed
        elif checked is not None:
            print(f"composed {composed}: not within the tests' bar on some layer, not timed")
    steps = {"step": training_step(model, x, target, som, None, opt)}
    for name, setting in candidates.items():
        plain = training_step(model, x, target, som, "triton", opt)

        def run(plain=plain, setting=setting) -> None:
            with _Setting(kernels, setting):
                plain()

        steps[f"step + SOM (triton), {name}"] = run
    rounds = [{n: triton.testing.do_bench(fn, return_mode="median") for n, fn in steps.items()}
              for _ in range(step_rounds)]  # fmt: skip
    som.remove()
    print(f"\nCNN step, batch {batch}, {step_rounds} rounds (do_bench medians; overhead: median of the rounds' ratios)")
    for name in steps:
        ms = statistics.median(r[name] for r in rounds)
        ratios = sorted((r[name] / r["step"] - 1) * 100 for r in rounds)
        over = f"  {statistics.median(ratios):+.1f}% ({ratios[0]:+.1f}% to {ratios[-1]:+.1f}%)"
        print(f"{name:120} {ms:6.3f} ms{over if name != 'step' else ''}")


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.1e}" for v in values) + "]"


def cpp_split(batch: int, steps: int, fresh_buffers: bool, compare: Sequence[str] = (), taps: bool = True,
              recompute_z: bool = False, compare_keep_z: bool = False) -> None:  # fmt: skip
    """Milliseconds per step in the C++ core's forward and backward calls inside the CNN step (CPU, cpp backend);
    with `compare` (paths of other builds of the extension), the step with SOM also runs on each of them, all
    interleaved step by step, and on NoOpCore (the C++ calls as no-ops: the hooks, taps, autograd nodes and Python of
    the route, whatever the C++ work costs). taps=False: SelfOrthogonality without taps (builds before 3fc4eee cannot
    add ∂R/∂Y into a gradient); the other builds with som.KEEP_Z = False. recompute_z: this build also with
    som.KEEP_Z = False (Z recomputed in the backward instead of kept from the forward). compare_keep_z: the other
    builds with som.KEEP_Z too (builds from 01979df on; those without som_z_stride keep Z in Y's layout)."""
    from kexue_fast.ortho import som, workspace

    cores = {**_cores(som._cpp_core(), compare), "C++ calls as no-ops": NoOpCore()}
    spent = {(label, part): 0.0 for label in cores for part in ("forward", "backward")}
    running = ["this build"]

    class TimedCore:
        def som_penalty(self, *args) -> float:  # packages before b508007 called it once per layer
            start = time.perf_counter()
            value = cores[running[0]].som_penalty(*args)
            spent[running[0], "forward"] += time.perf_counter() - start
            return value

        def som_penalties(self, calls, out) -> None:  # builds before it: one som_penalty call per layer
            start = time.perf_counter()
            core = cores[running[0]]
            if hasattr(core, "som_penalties"):
                core.som_penalties(calls, out)
            else:
                out[:] = [core.som_penalty(*args) for args in calls]
            spent[running[0], "forward"] += time.perf_counter() - start

        def som_penalties_at(self, calls, out, out_double, total=False) -> None:  # builds before it: by arrays
            start = time.perf_counter()
            _penalties_at(cores[running[0]], calls, out, out_double, total)
            spent[running[0], "forward"] += time.perf_counter() - start

        def som_gram_backward(self, *args) -> None:
            start = time.perf_counter()
            cores[running[0]].som_gram_backward(*args)
            spent[running[0], "backward"] += time.perf_counter() - start

        def som_gram_backward_at(self, *args) -> None:
            start = time.perf_counter()
            _gram_backward_at(cores[running[0]], *args)
            spent[running[0], "backward"] += time.perf_counter() - start

        def omp_team(self) -> bool:  # builds before omp_team ran on the calling thread alone
            return getattr(cores[running[0]], "omp_team", lambda: False)()

        def som_z_stride(self, s: int, itemsize: int) -> int:  # builds before it kept Z in Y's layout
            return getattr(cores[running[0]], "som_z_stride", lambda s, itemsize: s)(s, itemsize)

    model, opt, x, target, hooks = cnn_setup("cpu", batch)
    hooks.taps = taps
    plain = training_step(model, x, target, hooks, None, opt)
    with_som = training_step(model, x, target, hooks, "cpp", opt)
    loss_spent: dict = {}
    loss_of = hooks.loss

    def timed_loss(**kwargs):  # the step's loss() (its host side: this less the C++ forward)
        start = time.perf_counter()
        try:
            return loss_of(**kwargs)
        finally:
            loss_spent[running[0]] = loss_spent.get(running[0], 0.0) + time.perf_counter() - start

    hooks.loss = timed_loss
    original = (som._cpp_core, workspace.grad_buffer)
    som._cpp_core = TimedCore
    if fresh_buffers:
        workspace.grad_buffer = lambda shape, dtype: torch.empty(shape, dtype=dtype)

    def on(label: str, keep_z: bool = True):
        def step() -> None:
            running[0] = label
            som.KEEP_Z = keep_z
            try:
                with_som()
            finally:
                som.KEEP_Z = True

        return step

    recompute = "this build, Z recomputed"
    if recompute_z:
        cores[recompute] = cores["this build"]
        spent.update({(recompute, part): 0.0 for part in ("forward", "backward")})
    # other builds recompute Z unless compare_keep_z (those from before som.KEEP_Z, 01979df, take no Z)
    contestants = {"plain": plain, **{label: on(label, (compare_keep_z or label not in compare) and label != recompute)
                                       for label in cores}}  # fmt: skip
    try:
        for _ in range(2):
            for fn in contestants.values():
                fn()
        spent.update({key: 0.0 for key in spent})
        loss_spent.clear()
        walls: dict = {name: [] for name in contestants}
        for _ in range(steps):
            for name, fn in contestants.items():
                start = time.perf_counter()
                fn()
                walls[name].append(time.perf_counter() - start)
    finally:
        som._cpp_core, workspace.grad_buffer = original
        hooks.remove()
    median = {name: sorted(w)[len(w) // 2] * 1e3 for name, w in walls.items()}
    buffers = "fresh ∂R/∂Y buffers" if fresh_buffers else "kept ∂R/∂Y buffers"
    buffers += "" if taps else ", no taps"
    print(f"CPU step, batch {batch}, {steps} steps, {buffers}: median {median['plain']:.2f} ms without SOM")
    for label in cores:
        forward = spent[label, "forward"] / steps
        host = loss_spent.get(label, 0.0) / steps - forward
        note = " (Z recomputed: without --compare-keep-z)" if label in compare and not compare_keep_z else ""
        print(f"  {label}{note}: {median[label]:.2f} ms with SOM; C++ forward {forward * 1e3:.2f} ms and backward "
              f"{spent[label, 'backward'] / steps * 1e3:.2f} ms per step; loss() besides the C++ forward "
              f"{host * 1e6:.0f} µs")  # fmt: skip


def host_split(batch: int, steps: int) -> None:
    """Microseconds per step of the C++ route's Python and torch side inside benchmarks/ortho.py's CPU step, piece by
    piece: the hooked layers' forward hooks (recording, making the taps), loss() less its C++ call, the penalty's
    backward and the taps' gradient hooks less theirs; with the C++ calls' own time beside them. Each piece runs
    between the model's ops, from caches those ops flushed, unlike the same code run in a loop (--host-overhead);
    the wrapper around each piece adds its own call to what it reports."""
    from kexue_fast.ortho import hooks as hooks_module
    from kexue_fast.ortho import som

    spent: dict = {}
    inside = [0.0]  # C++ seconds so far, to take out of the piece that called it

    def timed(label: str, fn):
        def run(*args):
            start, cpp = time.perf_counter(), inside[0]
            try:
                return fn(*args)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start - (inside[0] - cpp)

        return run

    core = som._cpp_core()

    class TimedCore:
        def __getattr__(self, name: str):
            call = getattr(core, name)
            if not name.startswith(("som_penalties", "som_gram_backward")):
                return call
            label = "C++ forward" if name.startswith("som_penalties") else "C++ backward"

            def run(*args):
                start = time.perf_counter()
                try:
                    return call(*args)
                finally:
                    took = time.perf_counter() - start
                    inside[0] += took
                    spent[label] = spent.get(label, 0.0) + took

            return run

    model, opt, x, target, hooks = cnn_setup("cpu", batch)
    plain = training_step(model, x, target, hooks, None, opt)
    with_som = training_step(model, x, target, hooks, "cpp", opt)
    patched = [(hooks_module._RecordHook, "__call__"), (som._TapSlot, "__call__"), (som._Probe, "__call__")]
    originals = [getattr(owner, name) for owner, name in patched] + [som._cpp_core, som._GRAD_USES]
    backward = som._CppPenalty.__dict__["backward"]
    timed_core = TimedCore()
    # a wrapped tap hook sees one more reference to its gradient: the probe that calibrates what a hook's own
    # gradient looks like (som._calibrate_grad_uses) runs wrapped alike, afresh
    for (owner, name), label in zip(patched, ("forward hooks", "tap hooks", "probe")):
        setattr(owner, name, timed(label, getattr(owner, name)))
    som._CppPenalty.backward = staticmethod(timed("penalty backward", backward.__func__))
    som._cpp_core, som._GRAD_USES = (lambda: timed_core), None
    hooks.loss = timed("loss()", hooks.loss)
    try:
        for _ in range(3):
            plain()
            with_som()
        spent.clear()
        walls: dict = {"plain": [], "SOM": []}
        for _ in range(steps):
            for name, fn in (("plain", plain), ("SOM", with_som)):
                start = time.perf_counter()
                fn()
                walls[name].append(time.perf_counter() - start)
    finally:
        for (owner, name), original in zip(patched, originals):
            setattr(owner, name, original)
        som._cpp_core, som._GRAD_USES = originals[-2], originals[-1]
        som._CppPenalty.backward = backward
        hooks.remove()
    median = {name: statistics.median(w) * 1e3 for name, w in walls.items()}
    print(f"CPU step, batch {batch}, {steps} interleaved steps each: median {median['plain']:.2f} ms without SOM, "
          f"{median['SOM']:.2f} ms with it (C++ route, wrapped pieces); µs per step:")  # fmt: skip
    host = 0.0
    for label in ("forward hooks", "loss()", "penalty backward", "tap hooks", "C++ forward", "C++ backward"):
        us = spent.get(label, 0.0) / steps * 1e6
        host += us if not label.startswith("C++") else 0.0
        print(f"  {label}{' (less the C++ calls in it)' if label in ('loss()', 'tap hooks') else ''}: {us:.0f}")
    print(
        f"  Python and torch in those pieces: {host:.0f} (not counted: torch's hook dispatch, the taps' autograd "
        "nodes, the loss sum)"
    )


class NoOpCore:
    """The C++ core's calls as no-ops (R = 0, A = 0): what the route costs besides the C++ work."""

    def som_penalty(self, y, n, c, s, gamma, lambda1, lambda2, eps, a, n_threads, z=None) -> float:
        if a is not None:
            a.fill(0.0)
        return 0.0

    def som_penalties(self, calls, out) -> None:
        out[:] = [self.som_penalty(*args) for args in calls]

    def som_penalties_at(self, calls, out, out_double, total=False) -> None:
        for call in calls:
            if call[9]:
                ctypes.memset(call[9], 0, 8 * call[3] * call[3])
        ctypes.memset(out, 0, (8 if out_double else 4) * (1 if total else len(calls)))

    def som_gram_backward(self, *args) -> None:
        pass

    def som_gram_backward_at(self, *args) -> None:
        pass

    def omp_team(self) -> bool:
        return False

    def som_z_stride(self, s: int, itemsize: int) -> int:
        return s


def _array_at(address: int, count: int, is_double: bool):
    """A numpy view of `count` float64 (is_double) or float32 values at `address` (memory its owner keeps alive)."""
    import numpy as np

    kind = ctypes.c_double if is_double else ctypes.c_float
    return np.ctypeslib.as_array((kind * count).from_address(address))


def _z_stride_of(core, s: int, is_double: bool) -> int:
    """The row stride of a kept Z in `core`'s layout (s on builds before som_z_stride)."""
    return getattr(core, "som_z_stride", lambda s, itemsize: s)(s, 8 if is_double else 4)


def _penalties_at(core, calls, out: int, out_double: bool, total: bool) -> None:
    """core.som_penalties_at(calls, out, out_double, total), through the array calls on builds before it (compared
    builds: --compare-cores)."""
    import numpy as np

    if hasattr(core, "som_penalties_at"):
        return core.som_penalties_at(calls, out, out_double, total)
    arrays = []
    for y, is_double, n, c, s, gamma, lambda1, lambda2, eps, a, threads, z in calls:
        stride = _z_stride_of(core, s, is_double)
        arrays.append((_array_at(y, n * c * s, is_double), n, c, s, gamma, lambda1, lambda2, eps,
                       _array_at(a, c * c, True).reshape(c, c) if a else None, threads,
                       _array_at(z, n * c * stride, is_double) if z else None))  # fmt: skip
    values = np.empty(len(calls))
    if hasattr(core, "som_penalties"):
        core.som_penalties(arrays, values)
    else:  # builds before b508007: one call per layer
        values[:] = [core.som_penalty(*args) for args in arrays]
    target = _array_at(out, 1 if total else len(calls), out_double)
    target[:] = values.sum() if total else values


def _gram_backward_at(core, y, is_double, n, c, s, gamma, a, dy, threads, scale, add, from_z) -> None:
    """core.som_gram_backward_at(...), through the array call on builds before it (--compare-cores)."""
    if hasattr(core, "som_gram_backward_at"):
        return core.som_gram_backward_at(y, is_double, n, c, s, gamma, a, dy, threads, scale, add, from_z)
    stride = _z_stride_of(core, s, is_double) if from_z else s
    flags = (add, True) if from_z else (add,) if add else ()  # builds before add / from_z took fewer arguments
    core.som_gram_backward(_array_at(y, n * c * stride, is_double), n, c, s, gamma,
                           _array_at(a, c * c, True).reshape(c, c), _array_at(dy, n * c * s, is_double), threads,
                           scale, *flags)  # fmt: skip


def _cores(this, compare: Sequence[str]) -> dict:
    """{"this build": this, path: that build's extension for each path in compare}."""
    return {"this build": this, **{path: _load_core(path) for path in compare}}


def _load_core(path: str):
    """Another build of kexue_fast's _core extension (e.g. build/dev/_core*.so of an earlier commit, copied aside),
    loaded beside this one under a private name for an interleaved comparison."""
    import importlib.util

    name = f"_kexue_compare_{abs(hash(path))}._core"  # the last part names its PyInit__core
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ValueError(f"--compare-cores: {path!r} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def cpp_layers(batch: int, compare: Sequence[str] = (), shapes: Sequence[str] = (), reps: int = 30,
               cold: bool = False) -> None:  # fmt: skip
    """Median ms of the C++ core's two calls alone (interleaved repetitions, warm caches, the calling thread) on
    float32 outputs shaped as the CNN's convolutions (benchmarks/ortho.py's small_cnn at `batch`), with the rate of
    their products over the whole call (tanh, R and the finishing pass included): the forward's upper-triangle Gram,
    n·s·c(c + 1) FLOPs, and the backward's A·Z, 2·n·s·c² FLOPs, writing ∂R/∂Y and (`add`, where the build has it)
    adding it into a gradient, as SelfOrthogonality's taps do; and (builds with som_z_stride) the step's own two calls:
    the forward keeping Z (som.KEEP_Z) and the backward adding ∂R/∂Y from that Z. `compare`: paths of other builds of
    the extension, timed interleaved with this one (ratios from one run are what to compare on a noisy machine).
    `shapes`: "NxCxS" layouts to time instead of the CNN's (rows of odd lengths, say). `cold`: a 512 MiB buffer written
    before each timed call (no timing of its own), so that the call reads its inputs from memory, as in a training
    step where the model's other layers ran in between, instead of from the caches its previous repetition warmed."""
    from kexue_fast.ortho import som

    cores = _cores(som._cpp_core(), compare)
    flush = torch.zeros((512 << 20) // 4) if cold else None
    torch.manual_seed(0)
    layouts = [tuple(int(v) for v in shape.split("x")) for shape in shapes] or [(batch, 32, 1024), (batch, 64, 256)]
    for n, c, s in layouts:
        y = (torch.randn(n * c * s) * 0.3).numpy()
        a = torch.empty((c, c), dtype=torch.float64).numpy()
        dy = torch.empty(n * c * s).numpy()
        grad = torch.zeros(n * c * s).numpy()
        core = next(iter(cores.values()))
        core.som_penalty(y, n, c, s, 10.0, 100.0, 1.0, 1e-12, a, 1)  # A, which the backward calls read
        calls = {}
        for label, core in cores.items():
            calls[label, "forward"] = functools.partial(core.som_penalty, y, n, c, s, 10.0, 100.0, 1.0, 1e-12, a, 1)
            calls[label, "backward"] = functools.partial(core.som_gram_backward, y, n, c, s, 10.0, a, dy, 1, 1.0)
            add = functools.partial(core.som_gram_backward, y, n, c, s, 10.0, a, grad, 1, 1.0, True)
            try:
                add()
                calls[label, "add"] = add
            except TypeError:  # a build from before the add mode
                pass
            try:  # the step's calls (som.KEEP_Z): the forward keeps Z, the backward adds ∂R/∂Y from it
                z = torch.empty(n * c * core.som_z_stride(s, 4)).numpy()
                kept = functools.partial(core.som_penalty, y, n, c, s, 10.0, 100.0, 1.0, 1e-12, a, 1, z)
                from_z = functools.partial(core.som_gram_backward, z, n, c, s, 10.0, a, grad, 1, 1.0, True, True)
                kept()
                from_z()
                calls[label, "forward, Z kept"], calls[label, "adding from Z"] = kept, from_z
            except (AttributeError, TypeError):  # a build from before som_z_stride
                pass
        t = time_interleaved(calls, reps, before=(lambda: flush.add_(1.0)) if flush is not None else None)
        gram, product = n * s * c * (c + 1), 2 * n * s * c * c
        for label in cores:
            forward, backward = t[label, "forward"], t[label, "backward"]
            added = f", adding {t[label, 'add'] * 1e3:.3f} ms" if (label, "add") in t else ""
            if (label, "adding from Z") in t:
                added += (f"; as in the step: forward keeping Z {t[label, 'forward, Z kept'] * 1e3:.3f} ms, adding "
                          f"from Z {t[label, 'adding from Z'] * 1e3:.3f} ms")  # fmt: skip
            print(f"[{n}, {c}, {s}] float32{', cold' if cold else ''}, {label}: forward {forward * 1e3:.3f} ms "
                  f"({gram / forward / 1e9:.1f} GFLOP/s of the Gram), backward {backward * 1e3:.3f} ms "
                  f"({product / backward / 1e9:.1f} GFLOP/s of A·Z){added}", flush=True)  # fmt: skip


def taps_ab(batch: int, rounds: int, reps: int = 20) -> None:
    """The CPU step on the C++ route with SelfOrthogonality's taps (each hooked layer returns an alias whose gradient
    hook adds ∂R/∂Y into the model's gradient) and without them (taps=False: ∂R/∂Y returned to autograd, which adds
    it), against the step without SOM; `rounds` rounds of `reps` interleaved repetitions on torch's
    current threads, each round's medians and overheads printed."""
    model, opt, x, target, hooks = cnn_setup("cpu", batch)
    tapped = training_step(model, x, target, hooks, "cpp", opt)

    def untapped() -> None:
        hooks.taps = False
        try:
            tapped()
        finally:
            hooks.taps = True

    steps = {"step": training_step(model, x, target, hooks, None, opt), "taps": tapped, "no taps": untapped}
    print(f"CPU step, batch {batch}, torch threads {torch.get_num_threads()}, {reps} interleaved repetitions a round")
    for r in range(rounds):
        t = time_interleaved(steps, reps)
        over = {name: (t[name] / t["step"] - 1) * 100 for name in ("taps", "no taps")}
        print(f"  round {r + 1}: step {t['step'] * 1e3:.2f} ms, with SOM and taps {t['taps'] * 1e3:.2f} ms "
              f"({over['taps']:+.1f}%), without taps {t['no taps'] * 1e3:.2f} ms ({over['no taps']:+.1f}%)",
              flush=True)  # fmt: skip
    hooks.remove()


def memory_floor(batch: int, reps: int = 5) -> None:
    """The C++ route's memory traffic per step of benchmarks/ortho.py's CPU step (batch `batch`) and what it costs at
    this machine's read bandwidth on torch's current threads: the forward reads each hooked output Y and writes Z
    (som.KEEP_Z: rows padded as som_z_stride says), the backward reads Z and the model's gradient ∂Y and writes ∂Y
    back (the taps' in-place add). Bandwidth: a 1 GiB float32 tensor summed by torch, median of `reps`; writes are
    counted at the read rate. Beside --cpp-layers (the calls on warm caches) and --cpp-split (in the step), this tells
    how much of the in-step time memory alone would take if every byte came from DRAM."""
    from kexue_fast.ortho import som

    core = som._cpp_core()
    model, _, x, _, hooks = cnn_setup("cpu", batch)
    model(x)  # training mode, gradients on: the hooks record
    records = hooks.recorder.take()
    hooks.remove()
    forward = backward = 0
    for y, dim in records:
        n, c, s = som._layout(y, dim % y.dim())
        z = n * c * core.som_z_stride(s, y.element_size()) * y.element_size()
        forward += y.numel() * y.element_size() + z
        backward += z + 2 * y.numel() * y.element_size()
    big = torch.ones((1 << 30) // 4)
    rate = big.numel() * 4 / time_interleaved({"sum": big.sum}, reps)["sum"]
    del big
    print(f"CPU step, batch {batch}, {len(records)} hooked layers: the C++ route moves {forward / 1e6:.1f} MB forward "
          f"(Y read, Z written) and {backward / 1e6:.1f} MB backward (Z and ∂Y read, ∂Y written) per step; read "
          f"bandwidth {rate / 1e9:.1f} GB/s on {torch.get_num_threads()} thread(s) (1 GiB torch.sum, median of "
          f"{reps}): {forward / rate * 1e3:.2f} ms forward and {backward / rate * 1e3:.2f} ms backward if all of it "
          "came from memory")  # fmt: skip


def page_faults(batch: int, steps: int) -> None:
    """Minor page faults and wall time per step of benchmarks/ortho.py's CPU step without SOM and with it on the C++
    route, interleaved step by step: a page touched for the first time since the allocator took it from the system
    (glibc's malloc maps large blocks afresh and trims its heap as tensors come and go) costs a fault and a zeroed
    page, and how many a step takes moves with the heap's state, both steps' time with it. Run it under
    MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ (say 4000000000 each: no trimming, no per-tensor maps) to time
    both steps without those faults."""
    import resource

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    model, opt, x, target, hooks = cnn_setup("cpu", batch)
    steps_by_name = {"step": training_step(model, x, target, hooks, None, opt),
                     "step + SOM (cpp)": training_step(model, x, target, hooks, "cpp", opt)}  # fmt: skip
    for step in steps_by_name.values():  # warm-up: buffers kept, caches filled
        for _ in range(3):
            step()
    seen = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            before, start = faults(), time.perf_counter()
            step()
            seen[name].append((faults() - before, time.perf_counter() - start))
    hooks.remove()
    print(f"CPU step, batch {batch}, {steps} interleaved steps each, torch threads {torch.get_num_threads()}")
    for name, pairs in seen.items():
        counts = sorted(f for f, _ in pairs)
        print(f"  {name}: {statistics.median(t for _, t in pairs) * 1e3:.2f} ms (median), minor page faults per step "
              f"median {statistics.median(counts):.0f}, range {counts[0]}-{counts[-1]}")  # fmt: skip
    ratios = [b / a - 1 for (_, a), (_, b) in zip(seen["step"], seen["step + SOM (cpp)"])]
    print(f"  overhead: {statistics.median(ratios) * 100:+.1f}% (median of the step-by-step ratios)")


def host_overhead(batch: int, reps: int = 200) -> None:
    """Median µs of som_regularizer(backend="cpp") forward, and forward + backward (interleaved repetitions), on the
    CNN's recorded conv outputs with the C++ core's calls replaced by no-ops (everything but the C++ work)."""
    from kexue_fast.ortho import som

    original = som._cpp_core
    som._cpp_core = NoOpCore
    try:
        times, layers = _host_side_times("cpp", batch, reps)
    finally:
        som._cpp_core = original
    fwd, both_us = times["forward"] * 1e6, times["forward + backward"] * 1e6
    print(f"CPU, batch {batch}: som_regularizer's host side on {layers} layers (C++ calls as no-ops), median of "
          f"{reps}: forward {fwd:.0f} µs, forward + backward {both_us:.0f} µs")  # fmt: skip


def _host_side_times(backend: str, batch: int, reps: int):
    """({"forward", "forward + backward"}: median seconds of som_regularizer(backend=...) on the CNN's recorded conv
    outputs, interleaved), number of layers; the caller has replaced the heavy work by no-ops."""
    from kexue_fast.ortho import som_regularizer

    model, _, x, _, hooks = cnn_setup("cpu", batch)
    model(x)
    ys = [y.detach().requires_grad_() for y, _ in hooks.recorder.take()]
    hooks.remove()

    def forward() -> None:
        som_regularizer(ys, backend=backend)

    def both() -> None:
        torch.autograd.grad(som_regularizer(ys, backend=backend), ys)

    return time_interleaved({"forward": forward, "forward + backward": both}, reps), len(ys)


def host_overhead_triton(batch: int, reps: int = 200) -> None:
    """Median µs of som_regularizer(backend="triton") forward, and forward + backward (interleaved repetitions), on
    the CNN's recorded conv outputs (CPU tensors, TRITON_INTERPRET=1) with the three kernels' launches as no-ops: the
    launchers' and autograd's host side, through the eager autograd Function (what runs outside torch.compile) and
    through the torch.library custom ops (what torch.compile runs; forced here by making is_compiling() true)."""
    from kexue_fast.kernels import som as kernels

    class NoOpKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    names = ("_som_gram_kernel", "_som_grad_kernel", "_som_finish_kernel")
    originals = {name: getattr(kernels, name) for name in names}
    is_compiling = torch.compiler.is_compiling
    times = {}
    try:
        for name in names:
            setattr(kernels, name, NoOpKernel())
        for route, compiling in (("autograd Function", False), ("custom ops", True)):
            torch.compiler.is_compiling = lambda c=compiling: c
            times[route], layers = _host_side_times("triton", batch, reps)
    finally:
        torch.compiler.is_compiling = is_compiling
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)
    for route, t in times.items():
        print(f"CPU, batch {batch}: som_regularizer(backend='triton')'s host side through the {route} on {layers} "
              f"layers (launches as no-ops), median of {reps}: forward {t['forward'] * 1e6:.0f} µs, forward + "
              f"backward {t['forward + backward'] * 1e6:.0f} µs")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 2 on CPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="CUDA: time the fused kernels' launch settings instead")
    parser.add_argument("--settings", default="", help="with --sweep or --kernels-once: a JSON list such as '[{}, "
                        "{\"GRAD_ROWS\": 32}]'")  # fmt: skip
    parser.add_argument("--kernels-once", action="store_true", help="CUDA: each setting's kernels once, for ncu")
    parser.add_argument("--host-costs", action="store_true", help="CUDA: host µs per call of the Triton route's pieces")
    parser.add_argument("--step-rounds", type=int, default=3, help="with --sweep: rounds of the step with the best")
    parser.add_argument("--cpp-split", action="store_true", help="CPU: time the C++ calls inside the step instead")
    parser.add_argument("--fresh-buffers", action="store_true", help="with --cpp-split: no kept ∂R/∂Y buffers")
    parser.add_argument("--no-taps", action="store_true", help="with --cpp-split: SelfOrthogonality(taps=False)")
    parser.add_argument("--recompute-z", action="store_true", help="with --cpp-split: also with som.KEEP_Z = False")
    parser.add_argument("--compare-keep-z", action="store_true",
                        help="with --cpp-split --compare-cores: the other builds with som.KEEP_Z too")  # fmt: skip
    parser.add_argument("--host-overhead", action="store_true", help="CPU: the C++ route's Python and torch side")
    parser.add_argument("--host-split", action="store_true", help="CPU: that side in the step, piece by piece")
    parser.add_argument("--cpp-layers", action="store_true", help="CPU: the C++ calls alone on the CNN's layer shapes")
    parser.add_argument("--memory-floor", action="store_true", help="CPU: the C++ route's bytes per step, bandwidth")
    parser.add_argument("--faults", action="store_true", help="CPU: page faults and time per step, SOM and without")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch's threads (the C++ core's on its team)")
    parser.add_argument(
        "--taps",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="CPU: ROUNDS rounds of the C++ route's step with and without SelfOrthogonality's taps",
    )
    parser.add_argument("--shapes", nargs="*", default=[], help="with --cpp-layers: NxCxS layouts instead")
    parser.add_argument("--cold", action="store_true", help="with --cpp-layers: inputs read from memory, not caches")
    parser.add_argument("--compare-cores", nargs="*", default=[], help="--cpp-layers/--cpp-split: other _core builds")
    parser.add_argument(
        "--route",
        choices=("cpp", "triton"),
        default="cpp",
        help="with --host-overhead: triton times the Triton launchers' host side (TRITON_INTERPRET=1)",
    )
    args = parser.parse_args()
    batch = args.batch or (256 if args.device == "cuda" else 2)
    if args.device == "cpu":  # one by default: the setting of benchmarks/ortho.py's CPU rows
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.settings and not (args.sweep or args.kernels_once):
        parser.error("--settings goes with --sweep or --kernels-once")
    if args.sweep or args.kernels_once:
        if args.device != "cuda":
            parser.error("--sweep and --kernels-once run the Triton kernels: they need --device cuda")
        try:
            settings = parse_settings(args.settings) if args.settings else None
        except ValueError as e:
            parser.error(str(e))
        if args.kernels_once:
            kernels_once(batch, settings or [{}])
        else:
            sweep(batch, args.step_rounds, settings)
        return
    if args.host_costs:
        if args.device != "cuda":
            parser.error("--host-costs times the Triton route's host side on a GPU: it needs --device cuda")
        host_costs(args.batch or 2)
        return
    if args.host_overhead:
        if args.device != "cpu":
            parser.error("--host-overhead times the routes' host side on CPU tensors: it needs --device cpu")
        if args.route == "triton":
            if os.environ.get("TRITON_INTERPRET") != "1":
                parser.error("--route triton on CPU tensors needs TRITON_INTERPRET=1 (the launches are no-ops)")
            host_overhead_triton(batch)
        else:
            host_overhead(batch)
        return
    if args.host_split:
        if args.device != "cpu":
            parser.error("--host-split times the C++ route's host side in the CPU step: it needs --device cpu")
        host_split(batch, args.steps)
        return
    if args.taps:
        if args.device != "cpu":
            parser.error("--taps times the C++ route's step: it needs --device cpu")
        taps_ab(batch, args.taps)
        return
    if args.recompute_z and not args.cpp_split:
        parser.error("--recompute-z goes with --cpp-split")
    if args.compare_keep_z and not (args.cpp_split and args.compare_cores):
        parser.error("--compare-keep-z goes with --cpp-split --compare-cores")
    if args.compare_cores and not (args.cpp_layers or args.cpp_split):
        parser.error("--compare-cores goes with --cpp-layers or --cpp-split")
    if args.shapes and not args.cpp_layers:
        parser.error("--shapes goes with --cpp-layers")
    if args.cold and not args.cpp_layers:
        parser.error("--cold goes with --cpp-layers")
    if args.cpp_layers:
        if args.device != "cpu":
            parser.error("--cpp-layers times the C++ core: it needs --device cpu")
        bad = [shape for shape in args.shapes if not re.fullmatch(r"[1-9]\d*x[1-9]\d*x[1-9]\d*", shape)]
        if bad:
            parser.error(f"--shapes takes NxCxS layouts of positive integers (such as 32x16x9001), got {bad}")
        cpp_layers(batch, args.compare_cores, args.shapes, cold=args.cold)
        return
    if args.faults:
        if args.device != "cpu":
            parser.error("--faults counts the CPU step's page faults: it needs --device cpu")
        page_faults(batch, args.steps)
        return
    if args.memory_floor:
        if args.device != "cpu":
            parser.error("--memory-floor measures the C++ route's traffic: it needs --device cpu")
        memory_floor(batch)
        return
    if args.cpp_split:
        if args.device != "cpu":
            parser.error("--cpp-split times the C++ core: it needs --device cpu")
        cpp_split(
            batch,
            args.steps,
            args.fresh_buffers,
            args.compare_cores,
            taps=not args.no_taps,
            recompute_z=args.recompute_z,
            compare_keep_z=args.compare_keep_z,
        )
        return
    for backend in (None, "torch", "triton") if args.device == "cuda" else (None, "torch", "cpp"):
        profile_backend(backend, args.device, batch, args.steps)


if __name__ == "__main__":
    main()
