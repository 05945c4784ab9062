"""Interleaved A/B of two or more builds of kexue_fast's Infomap on one graph: CPU seconds per run, alternating builds
in fresh processes, so that a shared machine's drift hits every build alike (medians compared, not single runs).

    python -m kexue_fast.benchmarks.infomap_ab GRAPH.npz DIR_A DIR_B [DIR_C ...] [--reps 5]

GRAPH.npz: arrays `src`, `dst` (undirected links). Each DIR holds a `kexue_fast` package with its compiled `_core`,
e.g. a copy of the source tree's `kexue_fast/` plus the `_core*.so` of one build: `cp -r kexue_fast DIR/ && cp
$(python -c "import kexue_fast._core as c; print(c.__file__)") DIR/kexue_fast/`. The editable install's import hook
is bypassed in the child, so each DIR's package is the one imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

_CHILD = r"""
import sys
sys.meta_path = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
sys.path.insert(0, sys.argv[1])
import time
import numpy as np
import kexue_fast
assert kexue_fast.__file__.startswith(sys.argv[1]), kexue_fast.__file__
d = np.load(sys.argv[2])
start = time.process_time()
result = kexue_fast.infomap((d["src"], d["dst"]), n_threads=1)
print(time.process_time() - start, result.codelength)
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kexue_fast.benchmarks.infomap_ab", description=__doc__)
    parser.add_argument("graph")
    parser.add_argument("builds", nargs="+")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    times = {b: [] for b in args.builds}
    lengths = {}
    for _ in range(args.reps):
        for build in args.builds:
            out = subprocess.run([sys.executable, "-c", _CHILD, build, args.graph], capture_output=True, text=True,
                                 cwd="/")  # fmt: skip
            if out.returncode:
                raise SystemExit(f"{build}: {out.stderr.strip().splitlines()[-1]}")
            seconds, length = out.stdout.split()
            times[build].append(float(seconds))
            lengths[build] = length
    for build, ts in times.items():
        runs = [round(t, 2) for t in ts]
        print(f"{build}: median {statistics.median(ts):.3f} CPU-s {runs} codelength {lengths[build]}")


if __name__ == "__main__":
    main()
