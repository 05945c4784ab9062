"""Shared by every benchmark: run metadata, interleaved timing, tables, and writing benchmarks/results/."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    """The short sha (+dirty) of the checkout that holds the kexue_fast being run, or env KEXUE_GIT_SHA where the
    tree travelled without .git (a lent GPU machine); "unknown (installed kexue_fast X)" for an installed package.
    Git runs in the package's own checkout, not the current directory (another repository's sha was recorded)."""
    if os.environ.get("KEXUE_GIT_SHA"):
        return os.environ["KEXUE_GIT_SHA"]
    import kexue_fast

    repo = Path(kexue_fast.__file__).resolve().parent.parent
    unknown = f"unknown (installed kexue_fast {kexue_fast.__version__})"

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5)

    try:
        # the checkout must be the one that tracks this package (an install inside another repository is not)
        if git("ls-files", "--error-unmatch", "kexue_fast/__init__.py").returncode != 0:
            return unknown
        out = git("rev-parse", "--short", "HEAD")
        # results files are outputs, not code: rewriting them does not make the measured code "dirty"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":!/benchmarks/results").stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return unknown


# "quick" or "full" while python -m kexue_fast.bench runs (written into the results' metadata), else None
RUN_MODE: Optional[str] = None


def metadata(device: str) -> Dict[str, str]:
    import kexue_fast

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": cpu_model()
        + f" ({os.cpu_count()} logical cores, {torch.backends.cpu.get_cpu_capability()}, torch threads "
        f"{torch.get_num_threads()})",
        "versions": (
            f"kexue_fast {kexue_fast.__version__}, torch {torch.__version__}, python {platform.python_version()}"
        ),
        "git": git_sha(),
    }
    if RUN_MODE is not None:  # a quick run's file has the same name as a full run's: say which one this is
        meta["mode"] = f"{RUN_MODE} (python -m kexue_fast.bench{' --full' if RUN_MODE == 'full' else ''})"
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    return meta


def time_interleaved(contestants: Dict[str, Callable[[], object]], reps: int, warmup: int = 2,
                     before: Optional[Callable[[], object]] = None) -> Dict[str, float]:  # fmt: skip
    """Median wall seconds per call; contestants alternate within each repetition so that machine noise hits all
    of them alike (ratios from one run are what we report). `before`, if given, runs untimed before each timed call."""
    for fn in contestants.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in contestants}
    for _ in range(reps):
        for name, fn in contestants.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def time_contestants(contestants: Dict[str, Callable[[], object]], device: str, reps: int) -> Dict[str, float]:
    """Median seconds per call: triton.testing.do_bench on CUDA, interleaved wall-clock repetitions on CPU."""
    if device == "cuda":
        import triton.testing

        return {name: triton.testing.do_bench(fn, return_mode="median") / 1e3 for name, fn in contestants.items()}
    return time_interleaved(contestants, reps)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_results(out_dir: Path, stem: str, title: str, meta: Dict[str, str], header: Sequence[str],
                  rows: Sequence[Sequence[object]], notes: str = "") -> Path:  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    if RUN_MODE == "quick":  # never over a committed full run's file (git-ignored: benchmarks/results/*-quick.*)
        stem = f"{stem}-quick"
    md = out_dir / f"{stem}.md"
    body = [f"# {title}", ""] + [f"- {k}: {v}" for k, v in meta.items()] + ["", markdown_table(header, rows), ""]
    if notes:
        body += [notes, ""]
    md.write_text("\n".join(body))
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([f"# {k}: {v}"] for k, v in meta.items())  # one line each: read_csv(comment="#") skips them
        writer.writerow(header)
        writer.writerows(rows)
    return md


def run_script(script: str, args: Sequence[str], label: str, timeout: float) -> Optional[Dict[str, Any]]:
    """Run `python -c script *args` in a fresh process; its last stdout line parsed as JSON, or None (printing why)
    on failure or timeout."""
    try:
        out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {label} timed out after {timeout:.0f} s")
        return None
    if out.returncode != 0:
        print(f"  {label} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else '?'}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])
