"""`python -m kexue_fast.info`: versions, the C++ core's build, Triton/GPU availability, and per op what `auto` picks
and why."""

from __future__ import annotations

import os
import platform
import sys
from typing import List

import numpy
import torch

from . import __version__, _dispatch


def _cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return f" {flag}" in f.read()
    except OSError:
        return False


def report() -> str:
    lines: List[str] = []
    add = lines.append
    add(f"kexue_fast {__version__}")
    add(f"python     {platform.python_version()} ({sys.executable})")
    add(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    add(f"numpy      {numpy.__version__}")
    ok, why = _dispatch.core_status()
    core_ok, core_why = ok, why
    if ok:
        from . import _core

        info = _core.build_info()
        add("_core      " + ", ".join(f"{k}={v}" for k, v in info.items()))
        if hasattr(_core, "uses_avx512"):
            on = _core.uses_avx512()
            add(
                f"cpu        the C++ SOM core's AVX-512 paths {'on' if on else 'off'} (AVX-512F "
                f"{'present' if on or _cpu_flag('avx512f') else 'absent'}; KEXUE_FAST_AVX512=0 turns them off)"
            )
        if hasattr(_core, "omp_team"):
            from .ortho import som

            team = _core.omp_team()
            where = "torch's OpenMP team" if team else "the calling thread (no OpenMP team: off or none loaded)"
            add(f"threads    the C++ SOM core runs on {where}, {som.cpp_threads()} thread(s) now "
                "(KEXUE_FAST_OMP_TEAM=0 keeps it off the team)")  # fmt: skip
    else:
        add(f"_core      unavailable: {why}")
    ok, why = _dispatch.triton_status()
    add(f"triton     {why if ok else 'unavailable: ' + why}")
    interpret = f"TRITON_INTERPRET={int(_dispatch.triton_interpret())}{_unset('TRITON_INTERPRET')}"
    try:
        requested = _dispatch.requested_backend(None)
    except ValueError as exc:  # the tool that diagnoses a bad value must not die on it
        add(f"{interpret}  {_dispatch.ENV_VAR} INVALID: {exc}")
        add("(every op raises this ValueError until the variable is fixed or unset; `auto` shown below)")
        requested = None
    else:
        add(f"{interpret}  {_dispatch.ENV_VAR}={requested}{_unset(_dispatch.ENV_VAR)}")
    if torch.cuda.is_available():
        add(f"cuda       {torch.cuda.get_device_name(0)} (capability {torch.cuda.get_device_capability(0)})")
    else:
        add("cuda       no CUDA device")
    add("")
    add("op                  device  dtype     auto picks")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for op in _dispatch.registered_ops():
        for device in devices:
            for dtype in (torch.float32, torch.float64):
                dt = str(dtype).replace("torch.", "")
                add(f"{op:<19} {device.type:<7} {dt:<9} {_dispatch.describe(op, device, dtype, requested)}")
    core = "cpp (kexue_fast._core built)" if core_ok else f"none: {core_why}"
    for op in ("infomap", "map_equation"):  # one backend, not dispatched: the C++ core or nothing
        add(f"{op:<19} {'cpu':<7} {'any':<9} {core}; C++ only (weights in float64)")
    add(
        "(hsic and cka with linear kernels on both sides take torch's d×d cross products on any backend while "
        "dx + dy <= max(n, tile))"
    )
    return "\n".join(lines)


def _unset(name: str) -> str:
    return "" if name in os.environ else " (unset)"


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
