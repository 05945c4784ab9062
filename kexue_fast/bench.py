"""`python -m kexue_fast.bench`: our backends vs the anchors on the same inputs, in one run.

Prints each suite's table and writes it (markdown + CSV, with date, machine, versions and git sha) under --out.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import List

import torch

SUITES = ("spectral", "flows", "hsic", "infomap", "jose", "ortho", "score", "rope")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kexue_fast.bench", description=__doc__)
    parser.add_argument("--suite", choices=SUITES, action="append", help="run only this suite (repeatable)")
    parser.add_argument("--full", action="store_true", help="more repetitions (default: a quick run)")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="cpu, cuda, or all available (default)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="results folder, relative to the current directory (default: benchmarks/results); a "
                        "quick run writes <suite>-<device>-quick.md/.csv there, --full the names the committed "
                        "results have")  # fmt: skip
    args = parser.parse_args(argv)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            parser.error("--device cuda: no CUDA device is available")
        devices.remove("cuda")
    try:  # before any measuring: a bad --out once failed only after a suite had run
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {args.out}: {exc}")
    from .benchmarks import common

    common.RUN_MODE = "full" if args.full else "quick"
    try:
        failed = _run_suites(args, devices)
    finally:
        common.RUN_MODE = None
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _run_suites(args, devices: List[str]) -> List[str]:
    """Runs the chosen suites on those of `devices` they have; returns the ones that failed ("suite (device)")."""
    failed = []
    for suite in args.suite or SUITES:
        module = __import__(f"kexue_fast.benchmarks.{suite}", fromlist=["run"])
        for device in devices:
            if device not in getattr(module, "DEVICES", ("cpu", "cuda")):  # a CPU-only suite is not rerun as "cuda"
                if args.suite and args.device == device:
                    print(f"suite {suite} has no {device} benchmark (it runs on {', '.join(module.DEVICES)})\n")
                continue
            try:
                path = module.run(args.out, quick=not args.full, device=device)
            except Exception as exc:  # a missing anchor or corpus: say so and go on with the other suites
                failed.append(f"{suite} ({device})")
                print(f"suite {suite} on {device} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                traceback.print_exc(limit=3)
                continue
            print(path.read_text())
            print(f"(written to {path.resolve()})\n")
    return failed


if __name__ == "__main__":
    main()
