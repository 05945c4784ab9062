"""Invertible residual blocks: forward + log-det + backward of one dense or conv block, against the anchors.

Every contestant: g(x) = W2 LipSwish(W1 x + b1) + b2 with spectral-normalized W (coefficient 0.97), the same
truncated series of k terms with 1 Hutchinson probe, loss = mean(½‖y‖² − logdet), backward. Spectral-norm vectors
are not updated inside the timed step for anyone (normflows' InducedNormLinear and ours with n_power_iterations=0).
  kexue_fast Neumann   logdet value = the estimate; gradient by the Neumann series, memory-efficient; on the CPU
                       `auto` runs the C++ block (kexue_fast.flows.chain_cpp, csrc/flows/dense_chain.cpp), on CUDA
                       the closed-form torch path
  kexue_fast series    gradient by backpropagating through the series (C++ block on the CPU)
  normflows Neumann    Residual(reduce_memory=True): Neumann gradient computed in forward
  normflows series     Residual(reduce_memory=False)
  FrEIA                IResNetLayer(jacobian_iterations=k): its log-det carries no gradient (less work)
  kexue_fast fused Triton (CUDA only) the Neumann block with backend='triton': the fused forward kernel
                       (kernels/iresnet.py); `auto` runs the closed-form torch path, measured faster
  kexue_fast Neumann, torch / series, torch   (CPU only) the same blocks with backend='torch': the closed-form
                       Neumann gradient (kexue_fast.flows.chain_neumann) and torch's graph of the series
                       (chain_series_logdet), what the CPU ran before the C++ block
  kexue_fast series, graph   (CUDA only) the series gradient through torch's graph instead of `auto`'s closed form
  kexue_fast compiled  the Neumann step under torch.compile(fullgraph=True) (normflows cannot trace: it syncs
                       with .item() and calls autograd.grad in forward)
Conv rows: the same step for the ResidualFlow.conv block g = 3×3 · LipSwish · 1×1 · LipSwish · 3×3 (operator-norm
spectral norms) on CIFAR-10's shape after one Squeeze (12 × 16 × 16, hidden 64, B = 32) against normflows' Residual
block of InducedNormConv2d layers; `kexue_fast Neumann, autograd path` / `series, autograd path` are the same blocks
through torch's graph of g (what conv blocks ran before kexue_fast.flows.conv_neumann).
Memory: bytes of the tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks), the graph a
training step holds between forward and backward.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from kexue_fast.nn import InvertibleResBlock, LipSwish, spectral_norm

from .common import markdown_table, metadata, time_contestants, write_results

COEFF = 0.97


def ours(dim: int, hidden: int, n_terms: int, neumann: bool) -> Callable[[torch.Tensor], Tuple]:
    g = nn.Sequential(
        spectral_norm(nn.Linear(dim, hidden), coeff=COEFF, n_power_iterations=0),
        LipSwish(),
        spectral_norm(nn.Linear(hidden, dim), coeff=COEFF, n_power_iterations=0),
    )
    block = InvertibleResBlock(g, logdet="series", n_terms=n_terms, neumann_grad=neumann, memory_efficient=neumann)
    return block


def normflows_block(dim: int, hidden: int, n_terms: int, reduce_memory: bool):
    import normflows as nf
    from normflows.nets.lipschitz import InducedNormLinear, Swish

    g = nn.Sequential(
        InducedNormLinear(dim, hidden, coeff=COEFF, n_iterations=5),
        Swish(),
        InducedNormLinear(hidden, dim, coeff=COEFF, n_iterations=5),
    )
    flow = nf.flows.Residual(g, reverse=False, reduce_memory=reduce_memory, n_power_series=n_terms)
    return flow.train()


def ours_conv(channels: int, hidden: int, size: int, n_terms: int, neumann: bool, closed_form: bool = True):
    """The block ResidualFlow.conv builds (3×3 · LipSwish · 1×1 · LipSwish · 3×3, operator-norm spectral norms), on
    the same series as the others. closed_form=False takes the autograd path (what conv blocks ran before
    kexue_fast.flows.conv_neumann)."""
    from kexue_fast.nn import ResidualFlow

    flow = ResidualFlow.conv((channels, size, size), n_scales=1, n_blocks=1, hidden_channels=hidden, coeff=COEFF,
                             actnorm=False, logdet="series", n_terms=n_terms, neumann_grad=neumann,
                             memory_efficient=neumann)  # fmt: skip
    (block,) = flow.layers
    if not closed_form:
        block._conv_chain = None
    return block


def normflows_conv_block(channels: int, hidden: int, n_terms: int, reduce_memory: bool):
    import normflows as nf
    from normflows.nets.lipschitz import InducedNormConv2d, Swish

    g = nn.Sequential(
        InducedNormConv2d(channels, hidden, 3, 1, 1, coeff=COEFF, n_iterations=5), Swish(),
        InducedNormConv2d(hidden, hidden, 1, 1, 0, coeff=COEFF, n_iterations=5), Swish(),
        InducedNormConv2d(hidden, channels, 3, 1, 1, coeff=COEFF, n_iterations=5),
    )  # fmt: skip
    return nf.flows.Residual(g, reverse=False, reduce_memory=reduce_memory, n_power_series=n_terms).train()


def _speedup(times: Dict[str, float], name: str) -> str:
    """Our contestant's speed-up over normflows at the same gradient ('' for the anchors)."""
    base = "normflows Neumann" if "Neumann" in name else "normflows series"
    return f"{times[base] / times[name]:.2f}x" if base in times and "kexue" in name else ""


def conv_rows(device: str, reps: int, batch: int = 32, channels: int = 12, hidden: int = 64, size: int = 16,
              n_terms: int = 5) -> List[list]:  # fmt: skip
    """The conv block (CIFAR-10 after one Squeeze: 12 × 16 × 16) against normflows' conv Residual block."""
    torch.manual_seed(0)
    blocks: Dict[str, object] = {
        "kexue_fast Neumann": ours_conv(channels, hidden, size, n_terms, True),
        "kexue_fast Neumann, autograd path": ours_conv(channels, hidden, size, n_terms, True, closed_form=False),
        "kexue_fast series": ours_conv(channels, hidden, size, n_terms, False),
        "kexue_fast series, autograd path": ours_conv(channels, hidden, size, n_terms, False, closed_form=False),
    }
    try:
        blocks["normflows Neumann"] = normflows_conv_block(channels, hidden, n_terms, True)
        blocks["normflows series"] = normflows_conv_block(channels, hidden, n_terms, False)
    except ImportError:
        print("  (normflows not installed: pip install 'kexue-fast[bench]')")
    x = torch.randn(batch, channels, size, size, device=device)
    for b in blocks.values():
        b.to(device)  # type: ignore[attr-defined]
    times = time_contestants({name: _step(b, x) for name, b in blocks.items()}, device, reps)
    rows = []
    for name, b in blocks.items():
        rows.append([f"conv C={channels} H={hidden} {size}×{size} B={batch}", n_terms, name,
                     f"{times[name] * 1e3:.2f}", _speedup(times, name), f"{saved_bytes(b, x) / 1024:.0f}"])  # fmt: skip
    return rows


def freia_block(dim: int, hidden: int, n_terms: int):
    from FrEIA.modules import IResNetLayer
    from normflows.nets.lipschitz import Swish

    layer = IResNetLayer([(dim,)], internal_size=hidden, n_internal_layers=0, jacobian_iterations=n_terms,
                         hutchinson_samples=1, spectral_norm_max=COEFF)  # fmt: skip
    layer.residual = nn.Sequential(layer.layers[0], Swish(), layer.layers[1])  # LipSwish like the others
    layer.lipschitz_correction()

    def call(x):
        (y,), logdet = layer([x], jac=True)
        return y, logdet

    call.parameters = layer.parameters  # type: ignore[attr-defined]
    call.layer = layer  # type: ignore[attr-defined]
    return call


def _step(block, x: torch.Tensor) -> Callable[[], None]:
    params = list(block.parameters())

    def step():
        for p in params:
            p.grad = None
        y, logdet = block(x)
        (0.5 * y.pow(2).flatten(1).sum(1) - logdet).mean().backward()

    return step


class Compiled:
    """Our Neumann block's whole step under torch.compile(fullgraph=True) (compile time excluded: warm-up)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

        def loss(x):
            y, logdet = block(x)
            return (0.5 * y.pow(2).sum(1) - logdet).mean()

        self.loss = torch.compile(loss, fullgraph=True)

    def parameters(self):
        return self.block.parameters()

    def step(self, x: torch.Tensor) -> Callable[[], None]:
        params = list(self.block.parameters())

        def step():
            for p in params:
                p.grad = None
            self.loss(x).backward()

        return step


class OnBackend:
    """Our block on one backend (KEXUE_FAST_BACKEND set during each call), e.g. the fused Triton block on CUDA."""

    def __init__(self, block: nn.Module, backend: str) -> None:
        self.block = block
        self.backend = backend

    def parameters(self):
        return self.block.parameters()

    def __call__(self, x: torch.Tensor):
        before = os.environ.get("KEXUE_FAST_BACKEND")
        os.environ["KEXUE_FAST_BACKEND"] = self.backend
        try:
            return self.block(x)
        finally:
            if before is None:
                del os.environ["KEXUE_FAST_BACKEND"]
            else:
                os.environ["KEXUE_FAST_BACKEND"] = before

    def step(self, x: torch.Tensor) -> Callable[[], None]:
        return _step(self, x)


class SeriesPath(OnBackend):
    """Our series-gradient block with the closed form switched on or off (chain_neumann._series_closed_form)."""

    def __init__(self, block: nn.Module, closed_form: bool) -> None:
        super().__init__(block, "auto")
        self.closed_form = closed_form

    def __call__(self, x: torch.Tensor):
        from kexue_fast.flows import chain_neumann

        default = chain_neumann._series_closed_form
        chain_neumann._series_closed_form = lambda x: self.closed_form
        try:
            return self.block(x)
        finally:
            chain_neumann._series_closed_form = default


def saved_bytes(block, x: torch.Tensor) -> Optional[int]:
    if isinstance(block, Compiled):
        return None  # what a compiled graph saves is not visible to saved_tensors_hooks
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return total[0]


def contestants(dim: int, hidden: int, n_terms: int, compiled: bool = True, device: str = "cpu") -> Dict[str, object]:
    found: Dict[str, object] = {
        "kexue_fast Neumann": ours(dim, hidden, n_terms, True),
        "kexue_fast series": ours(dim, hidden, n_terms, False),
    }
    if device == "cuda":  # auto runs the closed-form torch path there; this row times the fused Triton block
        found["kexue_fast Neumann, fused Triton"] = OnBackend(ours(dim, hidden, n_terms, True), "triton")
        found["kexue_fast series, graph"] = SeriesPath(ours(dim, hidden, n_terms, False), False)
    else:  # auto runs the C++ block on the CPU; these rows time the torch closed form and torch's graph
        found["kexue_fast Neumann, torch"] = OnBackend(ours(dim, hidden, n_terms, True), "torch")
        found["kexue_fast series, torch"] = OnBackend(ours(dim, hidden, n_terms, False), "torch")
    if compiled:
        found["kexue_fast Neumann, compiled"] = Compiled(ours(dim, hidden, n_terms, True))
    try:
        found["normflows Neumann"] = normflows_block(dim, hidden, n_terms, True)
        found["normflows series"] = normflows_block(dim, hidden, n_terms, False)
    except ImportError:
        print("  (normflows not installed: pip install 'kexue-fast[bench]')")
    try:
        found["FrEIA (no logdet grad)"] = freia_block(dim, hidden, n_terms)
    except ImportError:
        print("  (FrEIA not installed: pip install 'kexue-fast[bench]')")
    return found


def inverse_rows(dim: int = 16, hidden: int = 64, atol: float = 1e-6) -> List[list]:
    """g evaluations to invert a trained block, fixed point vs Anderson (float64). Training maximizes the exact
    log-det for 60 Adam steps, which pushes Lip(g) up against the spectral-norm cap c² — the hard case for inverses."""
    from kexue_fast.nn import update_spectral_norms

    rows = []
    for coeff in (0.9, 0.97, 0.99):
        torch.manual_seed(0)
        g = nn.Sequential(
            spectral_norm(nn.Linear(dim, hidden), coeff=coeff, n_power_iterations=0), LipSwish(),
            spectral_norm(nn.Linear(hidden, dim), coeff=coeff, n_power_iterations=0),
        ).double()  # fmt: skip
        trainer = InvertibleResBlock(g, logdet="exact")
        opt = torch.optim.Adam(trainer.parameters(), lr=1e-2)
        for _ in range(60):
            _, logdet = trainer(torch.randn(64, dim, dtype=torch.float64))
            (-logdet.mean()).backward()
            opt.step()
            opt.zero_grad()
            update_spectral_norms(trainer, n_iters=5)
        update_spectral_norms(trainer, n_iters=500, tol=1e-12)
        x = torch.randn(64, dim, dtype=torch.float64)
        evals, errors = {}, {}
        for method in ("fixed_point", "anderson"):
            block = InvertibleResBlock(g, inverse_method=method, inverse_atol=atol).eval()
            with torch.no_grad():
                y, _ = block(x)
                x_hat = block.inverse(y)
                errors[method] = float((block(x_hat)[0] - y).abs().max())
            evals[method] = block.last_inverse.g_evals
        rows.append([coeff, evals["fixed_point"], evals["anderson"], f"{errors['fixed_point']:.1e}",
                     f"{errors['anderson']:.1e}"])  # fmt: skip
    return rows


def run(
    out_dir: Path,
    quick: bool = True,
    device: str = "cpu",
    cases: Sequence[Tuple[int, int, int]] = ((2, 64, 256), (32, 128, 256)),
    terms: Sequence[int] = (5, 20),
    reps: Optional[int] = None,
    compiled: bool = True,
) -> Path:
    reps = reps or (20 if quick else 100)
    conv_reps = max(5, reps // 5)  # a conv step takes ~50× a dense one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread avoids oversubscription noise on a shared machine
    rows: List[list] = []
    try:
        meta = metadata(device)  # its thread count is the one the rows ran on
        for dim, hidden, batch in cases:
            for n_terms in terms:
                torch.manual_seed(0)
                blocks = contestants(dim, hidden, n_terms, compiled, device)
                x = torch.randn(batch, dim, device=device)
                for b in blocks.values():
                    if isinstance(b, nn.Module):
                        b.to(device)
                    elif isinstance(b, (Compiled, OnBackend)):
                        b.block.to(device)
                    elif device != "cpu":
                        b.layer.to(device)
                steps = {name: b.step(x) if isinstance(b, (Compiled, OnBackend)) else _step(b, x)
                         for name, b in blocks.items()}  # fmt: skip
                times = time_contestants(steps, device, reps)
                memory = {name: saved_bytes(b, x) for name, b in blocks.items()}
                for name in blocks:
                    ratio = _speedup(times, name)
                    kib = "—" if memory[name] is None else f"{memory[name] / 1024:.0f}"
                    rows.append([f"D={dim} H={hidden} B={batch}", n_terms, name, f"{times[name] * 1e3:.2f}",
                                 ratio, kib])  # fmt: skip
                print(f"  flows/{device}: D={dim} k={n_terms} done", flush=True)
        rows += conv_rows(device, conv_reps)
        print(f"  flows/{device}: conv done", flush=True)
    finally:
        torch.set_num_threads(threads)
    header = ["shape", "terms k", "contestant", "ms / step", "speed-up vs normflows (same gradient)", "graph KiB"]
    notes = (
        f"forward + log-det + backward of one block (float32, 1 thread), median of {reps} interleaved repetitions "
        f"({conv_reps} for the conv rows). "
        "normflows' 'Neumann' log-det value is a gradient surrogate, not a log-det; FrEIA's log-det has no gradient."
        "\n\nInverse to ‖block(x̂) − y‖∞ ≤ 1e-6 (stopping on the step ≤ 1e-6), D=16, H=64, 64 samples, float64, "
        "blocks trained to maximize log-det under coefficient c (Lip(g) ≤ c²): evaluations of g\n\n"
        + markdown_table(
            ["coefficient c", "fixed point", "Anderson (m=5)", "max residual FP", "max residual AA"], inverse_rows()
        )
    )
    return write_results(out_dir, f"flows-{device}", "Invertible residual block: forward + log-det + backward",
                         meta, header, rows, notes)  # fmt: skip
