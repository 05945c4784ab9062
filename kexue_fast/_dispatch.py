"""The one place that chooses a backend.

    requested = backend= argument, else env KEXUE_FAST_BACKEND, else "auto"
    explicit  -> run exactly that backend, or raise NotImplementedError saying why it cannot (never fall back)
    auto      -> CUDA tensors + triton importable + op supports dtype   -> "triton"
                 CPU tensors + a C++ path exists + _core imported       -> "cpp"
                 otherwise                                              -> "torch" (logged once when a faster path
                                                                           exists for this device but is unavailable)
                 an op may put a call-time condition on its fast backend (OpSpec.auto_when: e.g. the torch thread
                 count); the op checks it, and `info` shows it

Probes are lazy and cached: ``import kexue_fast`` never imports triton.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

logger = logging.getLogger("kexue_fast")

BACKENDS = ("triton", "cpp", "torch")
ENV_VAR = "KEXUE_FAST_BACKEND"


@functools.cache
def triton_status() -> Tuple[bool, str]:
    """(importable, reason or version). Cached: the import costs ~0.5 s and happens at most once."""
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"triton is not importable ({type(exc).__name__}: {exc}); pip install 'kexue-fast[triton]'"
    return True, f"triton {triton.__version__}"


@functools.cache
def triton_version() -> Tuple[int, int]:
    """(major, minor) of the importable Triton (call after triton_status() says it imports)."""
    import triton

    major, minor = [*triton.__version__.split("."), "0"][:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def core_status() -> Tuple[bool, str]:
    """(importable, reason): the compiled C++ extension kexue_fast._core."""
    try:
        from . import _core  # noqa: F401
    except ImportError as exc:
        return False, f"kexue_fast._core is not built ({exc}); reinstall with `pip install .`"
    return True, "kexue_fast._core"


def require_core(need: str):
    """kexue_fast._core where nothing else can do the work, or an ImportError that starts with `need` (what needs
    it) and says why it does not load (a bare "cannot import name '_core'" said neither)."""
    try:  # imported here, not through core_status: its answer is cached for the process
        from . import _core
    except ImportError as exc:
        raise ImportError(f"{need}, which does not load ({exc}); reinstall with `pip install .` (python -m "
                          "kexue_fast.info says more)") from exc  # fmt: skip
    return _core


@dataclass(frozen=True)
class OpSpec:
    """What each backend of one op supports."""

    name: str
    backends: FrozenSet[str]
    dtypes: Dict[str, FrozenSet[torch.dtype]] = field(default_factory=dict)
    # backends that `auto` passes over because they measured slower than torch (reason shown by `info`); an
    # explicit backend= or KEXUE_FAST_BACKEND still runs them
    not_auto: Dict[str, str] = field(default_factory=dict)
    # per backend, a condition the op's own code puts on `auto`'s choice at call time: a function returning (whether
    # auto takes the backend in this process now, what the condition is), evaluated by `info`
    auto_when: Dict[str, Callable[[], Tuple[bool, str]]] = field(default_factory=dict)
    # per dtype, the oldest Triton whose compiler builds the op's kernels for it, and what they need from it
    triton_needs: Dict[torch.dtype, Tuple[Tuple[int, int], str]] = field(default_factory=dict)


_OPS: Dict[str, OpSpec] = {}
_LOGGED: set = set()


def register_op(name: str, backends: Dict[str, Tuple[torch.dtype, ...]], not_auto: Optional[Dict[str, str]] = None,
                auto_when: Optional[Dict[str, Callable[[], Tuple[bool, str]]]] = None,
                triton_needs: Optional[Dict[torch.dtype, Tuple[Tuple[int, int], str]]] = None) -> OpSpec:  # fmt: skip
    """Declare an op and, per backend, the dtypes it handles; `not_auto` maps a backend that `auto` must skip (it
    measured slower) to the measurement that says so; `auto_when` a backend that `auto` takes only under a call-time
    condition (checked by the op itself) to a function telling `info` whether it holds now and what it is;
    `triton_needs` a dtype whose Triton kernels an older Triton cannot compile to ((major, minor), what they use)."""
    spec = OpSpec(name, frozenset(backends), {b: frozenset(d) for b, d in backends.items()}, dict(not_auto or {}),
                  dict(auto_when or {}), dict(triton_needs or {}))  # fmt: skip
    _OPS[name] = spec
    return spec


def registered_ops() -> List[str]:
    return sorted(_OPS)


def why_not(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if `backend` can run `op` on (device, dtype), else the reason it cannot."""
    spec = _OPS[op]
    if backend not in spec.backends:
        return f"{op} has no {backend} implementation"
    if dtype not in spec.dtypes[backend]:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in spec.dtypes[backend]))
        return f"the {backend} backend of {op} supports {names}, not {str(dtype).replace('torch.', '')}"
    if backend == "triton":
        ok, reason = triton_status()
        if not ok:
            return reason
        need = spec.triton_needs.get(dtype)
        if need is not None and triton_version() < need[0]:
            return (f"the triton kernels of {op} for {str(dtype).replace('torch.', '')} use {need[1]}, which Triton "
                    f"compiles from {need[0][0]}.{need[0][1]} on ({reason} installed)")  # fmt: skip
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
            return f"triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to interpret on CPU)"
    elif backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors (got {device.type})"
        ok, reason = core_status()
        if not ok:
            return reason
    return None


def requested_backend(backend: Optional[str]) -> str:
    """An explicit backend argument wins; "auto" (or None) defers to KEXUE_FAST_BACKEND, else stays "auto"."""
    if backend is not None and backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of 'auto', 'triton', 'cpp', 'torch'; got {backend!r}")
        return backend
    requested = os.environ.get(ENV_VAR, "") or "auto"
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"environment variable {ENV_VAR} must be one of auto, triton, cpp, torch; got {requested!r}")
    return requested


def auto_backend(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """What `auto` picks for `op`, whatever KEXUE_FAST_BACKEND says: for an op's calls to other ops (a helper such as
    median_bandwidth), which the variable, meant for the op the user called, must not force onto a backend they
    may not have."""
    return auto_choice(op, device, dtype)[0]


def auto_choice(op: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, List[str]]:
    """What `auto` picks for (op, device, dtype) and the reasons the faster candidates were passed over."""
    rejected = []
    preferred = ("triton",) if device.type == "cuda" else ("cpp",)
    for candidate in preferred:
        reason = why_not(op, candidate, device, dtype) or _OPS[op].not_auto.get(candidate)
        if reason is None:
            return candidate, rejected
        if candidate in _OPS[op].backends:
            rejected.append(f"{candidate}: {reason}")
    return "torch", rejected


def choose(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None) -> str:
    """The backend to run `op` with; raises NotImplementedError when an explicit backend cannot run."""
    if op not in _OPS:
        raise KeyError(f"unknown op {op!r}; registered: {registered_ops()}")
    requested = requested_backend(backend)
    if requested != "auto":
        reason = why_not(op, requested, device, dtype)
        if reason is not None:
            raise NotImplementedError(f"backend={requested!r} cannot run {op}: {reason}")
        return requested
    chosen, rejected = auto_choice(op, device, dtype)
    if chosen == "torch":
        reason = why_not(op, "torch", device, dtype)
        if reason is not None:  # no backend runs it: say so here, not somewhere inside the torch path
            raise NotImplementedError(f"no backend runs {op} for {dtype} on {device.type}: "
                                      f"{'; '.join([*rejected, f'torch: {reason}'])}")  # fmt: skip
    deliberate = {f"{b}: {r}" for b, r in _OPS[op].not_auto.items()}
    if chosen == "torch" and set(rejected) - deliberate:
        key = (op, device.type, dtype, tuple(rejected))
        if key not in _LOGGED:
            _LOGGED.add(key)
            logger.warning("kexue_fast.%s runs on the slow torch path: %s", op, "; ".join(rejected))
    return chosen


# Under torch.compile the choice is made once at trace time, not traced into. This is what
# torch.compiler.assume_constant_result sets; calling it would import torch._dynamo (and triton) at `import kexue_fast`.
choose._dynamo_marked_constant = True  # type: ignore[attr-defined]


_FROM_ENV = object()


def describe(op: str, device: torch.device, dtype: torch.dtype, requested: Optional[str] = _FROM_ENV) -> str:  # type: ignore[assignment]
    """One line for `python -m kexue_fast.info`: what auto picks and why (KEXUE_FAST_BACKEND, when set, wins;
    `requested` None: as if unset)."""
    requested = requested_backend(None) if requested is _FROM_ENV else (requested or "auto")
    if requested != "auto":
        reason = why_not(op, requested, device, dtype)
        if reason is not None:
            return f"{requested} requested by {ENV_VAR}, but it cannot run here ({reason}): backend='auto' raises"
        return f"{requested} (requested by {ENV_VAR})"
    chosen, rejected = auto_choice(op, device, dtype)
    torch_reason = why_not(op, "torch", device, dtype) if chosen == "torch" else None
    if torch_reason is not None:
        return f"none: no backend runs it for this dtype (torch: {torch_reason})"
    reasons = {
        "triton": "CUDA tensors and " + triton_status()[1],
        "cpp": "CPU tensors and " + core_status()[1] + " built",
        "torch": "no faster path for this device" if not rejected else "the fast path is unavailable or slower",
    }
    why = f"; passed over: {'; '.join(rejected)}" if rejected else ""
    when = _OPS[op].auto_when.get(chosen)
    if when is not None:
        takes, condition = when()
        if not takes:
            return f"torch ({chosen} passed over in this process: {condition})"
        return f"{chosen} ({reasons[chosen]}{why}; {condition})"
    return f"{chosen} ({reasons[chosen]}{why})"
