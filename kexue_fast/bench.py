"""`python -m kexue_fast.bench`: our backends vs the anchors on the same inputs, in one run.

Prints each suite's table and writes it (markdown + CSV, with date, machine, versions and git sha) under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SUITES = ("spectral", "flows", "hsic", "infomap", "jose", "ortho", "score", "rope")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kexue_fast.bench", description=__doc__)
    parser.add_argument("--suite", choices=SUITES, action="append", help="run only this suite (repeatable)")
    parser.add_argument("--full", action="store_true", help="more repetitions (default: a quick run)")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="cpu, cuda, or all available (default)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    args = parser.parse_args(argv)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            parser.error("--device cuda: no CUDA device is available")
        devices.remove("cuda")
    for suite in args.suite or SUITES:
        module = __import__(f"kexue_fast.benchmarks.{suite}", fromlist=["run"])
        for device in devices:
            path = module.run(args.out, quick=not args.full, device=device)
            print(path.read_text())
            print(f"(written to {path})\n")


if __name__ == "__main__":
    main()
