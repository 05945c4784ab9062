"""Spectral normalization: one power-iteration update of every layer of a model.

Contestants, on the same freshly built layers in one run:
  kexue_fast            update_spectral_norms(model): one batched call (C++ on CPU, one Triton launch/iter on CUDA)
  torch parametrization torch.nn.utils.parametrizations.spectral_norm: touching each layer's .weight in training
                        mode (its power iteration + W/σ), i.e. what a torch user pays per step
  per-layer loop        Residual Flows' update_lipschitz style: u = normalize(W v), v = normalize(Wᵀu) per layer
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import kexue_fast
from kexue_fast.nn import update_spectral_norms

from .common import markdown_table, metadata, time_contestants, time_interleaved, write_results

WIDTHS = (64, 128, 256, 512, 96, 384)


def layer_shapes(n_layers: int) -> List[tuple]:
    """Mixed sizes, the same for every contestant: (out, in) cycling through WIDTHS."""
    return [(WIDTHS[(i + 1) % len(WIDTHS)], WIDTHS[i % len(WIDTHS)]) for i in range(n_layers)]


def build(n_layers: int, which: str, device: str) -> nn.Sequential:
    layers = []
    for out_f, in_f in layer_shapes(n_layers):
        lin = nn.Linear(in_f, out_f).to(device)
        if which == "torch":
            lin = torch_spectral_norm(lin)
        elif which == "kexue_fast":
            lin = kexue_fast.nn.spectral_norm(lin, coeff=0.97, n_power_iterations=0)
        layers.append(lin)
    return nn.Sequential(*layers)


def _torch_step(model: nn.Module):
    def step():
        for layer in model:
            layer.weight  # noqa: B018  (the parametrization runs on access)

    return step


def _loop_step(model: nn.Module, state: Dict[int, tuple]):
    for i, layer in enumerate(model):
        w = layer.weight
        state[i] = (F.normalize(torch.randn(w.shape[0], device=w.device), dim=0),
                    F.normalize(torch.randn(w.shape[1], device=w.device), dim=0))  # fmt: skip

    @torch.no_grad()
    def step():
        for i, layer in enumerate(model):
            w = layer.weight
            u, v = state[i]
            u = F.normalize(torch.mv(w, v), dim=0)
            v = F.normalize(torch.mv(w.t(), u), dim=0)
            state[i] = (u, v)

    return step


# Peak HBM bandwidth by device name (vendor datasheets), for the fraction-of-peak column on GPU.
PEAK_HBM_BYTES_PER_S = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
                        "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12}  # fmt: skip


def peak_bandwidth(name: str) -> Optional[float]:
    for key, value in PEAK_HBM_BYTES_PER_S.items():
        if key in name:
            return value
    return None


def kernel_bandwidth_rows(shapes_sets: Dict[str, List[tuple]], n_iters: int = 10) -> List[list]:
    """The Triton kernel alone (no Python dispatch): achieved bytes/s against the compulsory traffic
    (W read once per iteration plus the vectors) and the fraction of the device's HBM peak."""
    import triton.testing

    from kexue_fast.kernels import power_iteration as kernel

    name = torch.cuda.get_device_name(0)
    peak = peak_bandwidth(name)
    rows = []
    for label, shapes in shapes_sets.items():
        weights = [torch.randn(m, n, device="cuda") for m, n in shapes]
        us = [torch.empty(m, device="cuda") for m, _ in shapes]
        vs = [torch.randn(n, device="cuda") for _, n in shapes]

        def step(weights=weights, us=us, vs=vs):
            kernel.power_iteration(weights, us, vs, vs, n_iters)

        ms = triton.testing.do_bench(step, return_mode="median")
        rate = kernel.bytes_moved(shapes, 4, n_iters) / (ms / 1e3)
        frac = f"{100 * rate / peak:.0f}%" if peak else "unknown peak"
        rows.append([label, n_iters, f"{ms:.3f}", f"{rate / 1e9:.0f}", frac])
    return rows


def cpu_kernel_rows(layer_counts: Sequence[int], reps: int) -> List[list]:
    """The C++ kernel alone on warm caches (one call on NumPy views) against the torch loop on the same matrices:
    the compute rate once Python overhead and cache misses are taken out."""
    from kexue_fast import _core

    rows = []
    for n_layers in layer_counts:
        torch.manual_seed(0)
        weights = [torch.randn(o, i) for o, i in layer_shapes(n_layers)]
        us = [torch.empty(w.shape[0]) for w in weights]
        vs = [torch.randn(w.shape[1]) for w in weights]
        arrays = ([w.numpy() for w in weights], [u.numpy() for u in us], [v.numpy() for v in vs])

        def ours(arrays=arrays):
            _core.power_iteration(*arrays, 1)

        @torch.no_grad()
        def loop(weights=weights, vs=vs):
            for w, v in zip(weights, vs):
                u = F.normalize(torch.mv(w, v), dim=0)
                F.normalize(torch.mv(w.t(), u), dim=0)

        for _ in range(3):
            ours()
            loop()
        t_ours = time_interleaved({"ours": ours}, reps, warmup=0)["ours"]
        t_loop = time_interleaved({"loop": loop}, reps, warmup=0)["loop"]
        nbytes = 4 * sum(o * i for o, i in layer_shapes(n_layers))
        rows.append([n_layers, f"{t_ours * 1e3:.3f}", f"{nbytes / t_ours / 1e9:.1f}", f"{t_loop * 1e3:.3f}",
                     f"{t_loop / t_ours:.1f}x"])  # fmt: skip
    return rows


def run(
    out_dir: Path,
    quick: bool = True,
    device: str = "cpu",
    layer_counts: Sequence[int] = (1, 48, 156),
    reps: Optional[int] = None,
) -> Path:
    reps = reps or (30 if quick else 200)
    rows = []
    for n_layers in layer_counts:
        torch.manual_seed(0)
        ours = build(n_layers, "kexue_fast", device)
        theirs = build(n_layers, "torch", device)
        plain = build(n_layers, "plain", device)
        contestants = {
            "kexue_fast": lambda m=ours: update_spectral_norms(m),
            "torch parametrization": _torch_step(theirs),
            "per-layer loop": _loop_step(plain, {}),
        }
        times = time_contestants(contestants, device, reps)
        params = sum(o * i for o, i in layer_shapes(n_layers))
        base = times["kexue_fast"]
        rows.append([
            n_layers, f"{params / 1e6:.2f}M",
            f"{base * 1e3:.3f}",
            f"{times['torch parametrization'] * 1e3:.3f}", f"{times['torch parametrization'] / base:.1f}x",
            f"{times['per-layer loop'] * 1e3:.3f}", f"{times['per-layer loop'] / base:.1f}x",
        ])  # fmt: skip
        print(f"  spectral/{device}: {n_layers} layers done", flush=True)
    header = ["layers", "weights", "kexue_fast ms", "torch param. ms", "torch / ours", "per-layer loop ms",
              "loop / ours"]  # fmt: skip
    backend = kexue_fast._dispatch.choose("power_iteration", torch.device(device), torch.float32)
    timing = f"median over {reps} interleaved repetitions" if device == "cpu" else "median by triton.testing.do_bench"
    notes = (
        f"One power iteration of every layer (float32, Linear layers of sizes cycling {WIDTHS}), {timing}. "
        f"kexue_fast ran on its '{backend}' backend. 'torch param.' includes torch's W/σ division per layer, as every "
        "training forward does."
    )
    if device == "cpu" and kexue_fast._dispatch.core_status()[0]:
        kernel_header = ["layers", "C++ kernel ms", "GB/s (W once)", "torch loop ms", "loop / kernel"]
        notes += (
            "\n\nThe C++ kernel alone, warm caches (each contestant repeated back to back), same matrices:\n\n"
            + markdown_table(kernel_header, cpu_kernel_rows(layer_counts, reps))
        )
    if device == "cuda":
        bw_header = ["matrices", "iterations", "ms", "GB/s", "of HBM peak"]
        bw_rows = kernel_bandwidth_rows({
            "48 mixed": layer_shapes(48), "156 mixed": layer_shapes(156), "1 x 4096x4096": [(4096, 4096)],
            "64 x 1024x1024": [(1024, 1024)] * 64,
        })  # fmt: skip
        notes += "\n\nTriton kernel alone, float32, compulsory traffic W once per iteration:\n\n" + markdown_table(
            bw_header, bw_rows
        )
    return write_results(out_dir, f"spectral-{device}", "Spectral normalization: update every layer once",
                         metadata(device), header, rows, notes)  # fmt: skip
