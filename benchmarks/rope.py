"""Jacobi elliptic functions and the troposkein: kexue_fast's batched torch (and Triton on CUDA) against SciPy, same
inputs, one run.

Contestants:
  SciPy ellipj / ellipk+ellipe   scipy.special on float64 NumPy arrays (the anchor, C loops)
  kexue_fast torch               the batched Landen/AGM in torch ops (kexue_fast.rope.ellipj, backend="torch")
  kexue_fast C++                 the same algorithms elementwise in the C++ core (backend="cpp", CPU's `auto`), on
                                 1 thread and on every core
  kexue_fast Triton              (CUDA) one elementwise kernel (kernels/jacobi.py)
  troposkein sweep               kexue_fast.rope.troposkein over a batch of L/h values vs a SciPy loop (brentq on
                                 2E/(m'K) − 1 = L/h, then ellipj on the grid) per value
Accuracy columns: the maximum absolute difference from SciPy on the same inputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from kexue_fast.rope import ellipj, ellipke, troposkein

from .common import metadata, time_contestants, write_results


def _scipy():
    try:
        import scipy.special as sp
        from scipy.optimize import brentq
    except ImportError:
        print("  (scipy not installed: pip install 'kexue-fast[bench]')")
        return None, None
    return sp, brentq


def _on_threads(threads: int, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with torch's intra-op thread count (which the C++ core follows) set to `threads`."""

    def run() -> object:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def _cpp_variants(fn: Callable[[str], object]) -> Dict[str, Callable[[], object]]:
    cores = os.cpu_count() or 1
    found = {"kexue_fast C++, 1 thread": _on_threads(1, lambda: fn("cpp"))}
    if cores > 1:
        found[f"kexue_fast C++, {cores} threads"] = _on_threads(cores, lambda: fn("cpp"))
    return found


def jacobi_contestants(n: int, device: str, sp) -> Dict[str, Callable[[], object]]:
    g = np.random.default_rng(n)
    m_np, u_np = g.random(n), (g.random(n) - 0.5) * 20
    u, m = torch.from_numpy(u_np).to(device), torch.from_numpy(m_np).to(device)
    found: Dict[str, Callable[[], object]] = {"kexue_fast torch": lambda: ellipj(u, m, backend="torch")}
    if device == "cuda":
        found["kexue_fast Triton"] = lambda: ellipj(u, m, backend="triton")
    else:
        found.update(_cpp_variants(lambda backend: ellipj(u, m, backend=backend)))
    if sp is not None:
        found["SciPy ellipj"] = lambda: sp.ellipj(u_np, m_np)
    return found


def troposkein_scipy(ratios: np.ndarray, n_points: int, sp, brentq) -> np.ndarray:
    out = np.empty((len(ratios), n_points))
    y = np.linspace(0, 1, n_points)

    def excess(m: float, ratio: float) -> float:
        return 2 * sp.ellipe(m) / ((1 - m) * sp.ellipk(m)) - 1 - ratio

    for i, r in enumerate(ratios):
        m = brentq(excess, 0.0, 1 - 1e-15, args=(r,), xtol=1e-16)
        k = sp.ellipk(m)
        out[i] = np.sqrt(m) / ((1 - m) * k) * sp.ellipj(2 * k * y, m)[0]
    return out


def run(out_dir: Path, quick: bool = True, device: str = "cpu", reps: Optional[int] = None) -> Path:
    reps = reps or (7 if quick else 30)
    sp, brentq = _scipy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # SciPy is single-threaded; and on a shared machine, idle intra-op threads spin
    try:
        meta = metadata(device)
        rows = _rows(device, reps, quick, sp, brentq)
    finally:
        torch.set_num_threads(threads)
    header = ["what", "n", "contestant", "ms (median)", "speed-up vs SciPy", "max |diff| vs SciPy"]
    notes = "float64, 1 torch thread (SciPy is single-threaded); " + (
        "medians of interleaved repetitions." if device == "cpu" else "medians by triton.testing.do_bench."
    )
    return write_results(out_dir, f"rope-{device}", "Jacobi elliptic functions and the troposkein vs SciPy",
                         meta, header, rows, notes)  # fmt: skip


def _rows(device: str, reps: int, quick: bool, sp, brentq) -> List[list]:
    rows: List[list] = []
    for n in (10_000, 1_000_000):
        contestants = jacobi_contestants(n, device, sp)
        times = time_contestants(contestants, device, reps)
        results = {name: fn() for name, fn in contestants.items()}
        anchor = results.get("SciPy ellipj")
        base = times.get("SciPy ellipj")
        for name, t in times.items():
            err = ""
            if anchor is not None and name != "SciPy ellipj":
                err = f"{max(float(np.abs(a.cpu().numpy() - b).max()) for a, b in zip(results[name], anchor)):.1e}"
            rows.append(["sn, cn, dn, am", n, name, f"{t * 1e3:.2f}", f"{base / t:.2f}x" if base else "", err])
    m_np = np.random.default_rng(0).random(1_000_000)
    m_t = torch.from_numpy(m_np).to(device)
    ke: Dict[str, Callable[[], object]] = {"kexue_fast torch": lambda: ellipke(m_t, backend="torch")}
    if device == "cpu":
        ke.update(_cpp_variants(lambda backend: ellipke(m_t, backend=backend)))
    if sp is not None:
        ke["SciPy ellipk + ellipe"] = lambda: (sp.ellipk(m_np), sp.ellipe(m_np))
    times = time_contestants(ke, device, reps)
    for name, t in times.items():
        base = times.get("SciPy ellipk + ellipe")
        err = ""
        if sp is not None and name.startswith("kexue"):
            k, e = ke[name]()
            err = f"{max(np.abs(k.cpu().numpy() / sp.ellipk(m_np) - 1).max(), np.abs(e.cpu().numpy() / sp.ellipe(m_np) - 1).max()):.1e} rel"  # noqa: E501
        rows.append(["K, E", len(m_np), name, f"{t * 1e3:.2f}", f"{base / t:.2f}x" if base else "", err])
    for count in (200, 2000):
        ratios = np.linspace(1.01, 5.0, count)
        r_t = torch.from_numpy(ratios).to(device)
        sweep: Dict[str, Callable[[], object]] = {
            "kexue_fast troposkein (batched)": lambda r_t=r_t: troposkein(r_t, 1.0, 129).x
        }
        if sp is not None:
            sweep["SciPy loop (brentq + ellipj)"] = lambda ratios=ratios: troposkein_scipy(ratios, 129, sp, brentq)
        times = time_contestants(sweep, device, max(3, reps // 2))
        base = times.get("SciPy loop (brentq + ellipj)")
        ours = sweep["kexue_fast troposkein (batched)"]().cpu().numpy()
        err = f"{np.abs(ours - troposkein_scipy(ratios, 129, sp, brentq)).max():.1e}" if sp is not None else ""
        for name, t in times.items():
            rows.append(["troposkein sweep, L/h × 129 points", count, name, f"{t * 1e3:.2f}",
                         f"{base / t:.2f}x" if base else "", err if name.startswith("kexue") else ""])  # fmt: skip
    return rows
