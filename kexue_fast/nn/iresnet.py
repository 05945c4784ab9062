"""Invertible residual blocks (i-ResNet, Residual Flows) and their companions: LipSwish, ActNorm, Squeeze.

Every flow module here maps x -> (y, logdet [B]) in forward and y -> x in inverse; logdet is log|det ∂y/∂x|.
"""

from __future__ import annotations

import importlib
import math
import numbers
import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import _dispatch
from ..flows import chain_cpp
from ..flows import inverse as _inverse
from ..flows import logdet as _logdet
from ..flows.chain import DenseChain, chain_series_logdet, hook_free
from ..flows.chain_cpp import chain_logdet_cpp
from ..flows.chain_neumann import _one_plan, chain_neumann_logdet
from ..flows.conv_neumann import ConvChain, conv_neumann_logdet, conv_series_logdet
from ..flows.fused import FusedDenseBranch
from .spectral_norm import SpectralNorm, eval_mode, frozen_power_iteration

LOGDET_METHODS = ("series", "roulette", "exact", "none")
OP = "invertible_resblock"
# triton: the fused forward of Linear·act·Linear branches (kernels/iresnet.py) with the Neumann-gradient series;
# cpp: a dense chain's whole step (forward, series, either gradient) in two C++ calls (csrc/flows/dense_chain.cpp),
# float32/float64 (half inputs, registered so that auto does not warn, take the torch path: _cpp_unavailable);
# torch: the closed-form Neumann gradient or the analytic series of dense chains, or autograd for any other g
# (conv chains and generic g have no other path).
_dispatch.register_op(
    OP, {"triton": (torch.float32,), "cpp": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
         "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64)},
    not_auto={"triton": "measured slower than the torch path's closed-form Neumann gradient in a training step on "
                        "an H200 (D=32 H=128 B=256 k=5: 3.43 vs 2.41 ms, benchmarks/results/flows-cuda.md); "
                        "backend='triton' still runs it"},
    auto_when={"cpp": chain_cpp.auto_condition},
)  # fmt: skip
_LOGGED_FALLBACKS: set = set()  # reasons a fast path was passed over, logged once each
_HOOKED = "g or one of its layers has forward/backward hooks, which the C++ block would skip"


class LipSwish(nn.Module):
    """LipSwish (Chen et al. 2019, Residual Flows): x·sigmoid(βx)/1.1 with learnable β = softplus(b) > 0.

    max |d/dx x·sigmoid(βx)| ≈ 1.0998 for every β > 0, so dividing by 1.1 makes it 1-Lipschitz."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < math.inf:
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        beta = float(beta)
        # raw = softplus⁻¹(β) = log(e^β − 1), written as β + log(1 − e^{−β}) so that large β does not overflow
        self.raw_beta = nn.Parameter(torch.tensor(beta + math.log(-math.expm1(-beta))))

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.raw_beta)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x * self.beta) / 1.1

    def extra_repr(self) -> str:
        return f"beta={float(self.beta.detach()):.4g}"


class ActNorm(nn.Module):
    """Per-channel affine y = (x + b)·exp(s) (Kingma & Dhariwal 2018), data-dependent init on the first training
    batch: b = −mean, s = −log(std + eps) over the batch and spatial dims (s = 0 for a channel constant there; at
    least two values per channel needed). logdet = Σ_c s_c · (spatial size).

    x: [B, C] or [B, C, *spatial]. In eval mode an uninitialized ActNorm is the identity and changes no buffer."""

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.bias = nn.Parameter(torch.zeros(int(num_features)))
        self.log_scale = nn.Parameter(torch.zeros(int(num_features)))
        self.eps = float(eps)
        self.register_buffer("initialized", torch.tensor(False))
        # The buffer's value on the host, so that a training forward after the init reads no tensor (a host sync
        # on CUDA, and a data-dependent branch that torch.compile(fullgraph=True) refuses); kept in step with the
        # buffer by _init and by load_state_dict (a hook).
        self._initialized = False
        self.register_load_state_dict_post_hook(_sync_initialized)

    def extra_repr(self) -> str:
        return f"{self.bias.numel()}, eps={self.eps}"

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.reshape(1, -1, *([1] * (x.ndim - 2)))

    @torch.no_grad()
    def _init(self, x: Tensor) -> None:
        if x.shape[0] == 0:
            raise ValueError("ActNorm's data-dependent init needs a non-empty first training batch, got batch size 0")
        if not bool(torch.isfinite(x).all()):  # before any write: a bad first batch must not poison the init
            raise ValueError("x contains NaN or Inf (ActNorm's data-dependent init reads this batch)")
        dims = [0, *range(2, x.ndim)]
        if math.prod(x.shape[d] for d in dims) < 2:  # one value per channel: its std is 0, s = −log(eps) = 13.8
            raise ValueError("ActNorm's data-dependent init needs at least two values per channel in its first "
                             f"training batch (not a batch of 1 for [B, C]), got shape {tuple(x.shape)}")  # fmt: skip
        std = x.std(dims, unbiased=False)
        # a channel constant over the batch has no scale to set: s = 0 there (its shift still centres it), where
        # −log(eps) would multiply it by 1e6 for good
        self.bias.copy_(-x.mean(dims))
        self.log_scale.copy_(torch.where(std > 0, -torch.log(std + self.eps), torch.zeros_like(std)))
        self.initialized.fill_(True)
        self._initialized = True

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if x.ndim < 2 or x.shape[1] != self.bias.numel():
            raise ValueError(f"ActNorm expects x of shape [B, {self.bias.numel()}, ...], got {tuple(x.shape)}")
        if self.training and not getattr(self, "_initialized", False):  # (absent in an ActNorm pickled before it)
            if bool(self.initialized):  # set by hand, or by a copy of the buffer the hook did not see
                self._initialized = True
            else:
                self._init(x)
        y = (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x))
        spatial = math.prod(x.shape[2:])
        logdet = (self.log_scale.sum() * spatial).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self._view(self.log_scale, y)) - self._view(self.bias, y)


def _sync_initialized(module: ActNorm, _incompatible_keys) -> None:
    module._initialized = bool(module.initialized)


class Squeeze(nn.Module):
    """Space-to-channel [B, C, H, W] -> [B, 4C, H/2, W/2] (RealNVP's squeeze); volume-preserving (logdet 0)."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"Squeeze expects x [B, C, H, W] with even H and W, got {tuple(x.shape)}")
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y: Tensor) -> Tensor:
        if y.ndim != 4 or y.shape[1] % 4:
            raise ValueError(f"Squeeze.inverse expects y [B, 4C, H, W], got {tuple(y.shape)}")
        b, c4, h, w = y.shape
        c = c4 // 4
        return y.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


class FactorOut(nn.Module):
    """Multi-scale factor-out (Dinh et al. 2017, RealNVP; Behrmann et al. 2019, i-ResNet): of x [B, C, H, W] the
    first `keep` channels go on through the flow and the rest leave it as part of the latent (standard normal prior).
    A split, not a layer with a log-determinant: `ResidualFlow` routes the factored channels to its latent vector."""

    def __init__(self, channels: int, keep: int) -> None:
        super().__init__()
        self.channels = _int_at_least(channels, 2, "channels")
        self.keep = _int_at_least(keep, 1, "keep")
        if self.keep >= self.channels:
            raise ValueError(f"keep must be < channels ({self.channels}) to factor anything out, got {keep}")

    def split(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"FactorOut expects x [B, {self.channels}, H, W], got {tuple(x.shape)}")
        return x[:, : self.keep], x[:, self.keep :]

    def merge(self, kept: Tensor, factored: Tensor) -> Tensor:
        return torch.cat([kept, factored], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, keep={self.keep}"


def _choice(value: object, options: Tuple[str, ...], name: str) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def _int_at_least(value: object, minimum: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# torch's own spectral norms: the parametrization's module, and the hook of the older form (whose module the function
# torch.nn.utils.spectral_norm shadows as an attribute)
_TORCH_SN_PARAMETRIZATION = getattr(torch.nn.utils.parametrizations, "_SpectralNorm", None)
_TORCH_SN_HOOK = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm


def _uses_torch_spectral_norm(module: nn.Module) -> bool:
    """Whether module is torch's spectral-norm parametrization, or carries torch's hook-based spectral_norm."""
    if _TORCH_SN_PARAMETRIZATION is not None and isinstance(module, _TORCH_SN_PARAMETRIZATION):
        return True
    return any(isinstance(h, _TORCH_SN_HOOK) for h in module._forward_pre_hooks.values())


def _check_lipschitz_layers(g: nn.Module) -> None:
    """What can be told from g's layers without a certificate: spectral-normalized layers must carry a coefficient
    < 1 and, on a convolution with a kernel wider than 1, bound its operator norm (matrix mode normalizes the
    reshaped kernel, which can be ~√(kernel size) below the operator norm); activations must be 1-Lipschitz. torch's
    own spectral_norm (either form) scales to 1, not below: warned, since a layer after it may scale its output
    down (g would then be a contraction after all)."""
    for name, module in g.named_modules():
        where = name or "(g)"
        if _uses_torch_spectral_norm(module):
            warnings.warn(
                f"the layer {where} of g is normalized by torch's spectral_norm, which scales its spectral norm to 1 "
                "(and from a power-iteration estimate, which can fall short of σ and leave it above 1): Lip(g) < 1 "
                "is not enforced, and the inverse and the log-det series may not converge. Use "
                "kexue_fast.nn.spectral_norm(..., coeff=c) with c < 1",
                RuntimeWarning,
                stacklevel=4,
            )
        if isinstance(module, SpectralNorm):
            if module.coeff is None or module.coeff >= 1:
                raise ValueError(
                    f"the spectral-norm layer {where} of g has coeff={module.coeff}: an invertible residual "
                    "block needs Lip(g) < 1, so use kexue_fast.nn.spectral_norm(..., coeff=c) with c < 1"
                )
        if isinstance(module, _CONVS) and math.prod(module.kernel_size) > 1:
            norms = getattr(getattr(module, "parametrizations", None), "weight", [])
            if any(isinstance(p, SpectralNorm) and p.conv is None for p in norms):
                raise ValueError(
                    f"the convolution {where} of g is spectral-normalized in matrix mode (the reshaped kernel), which "
                    "does not bound its Lipschitz constant: pass input_shape=(C, *spatial) to "
                    "kexue_fast.nn.spectral_norm to normalize the convolution's operator norm"
                )
        slope = {nn.LeakyReLU: "negative_slope", nn.ELU: "alpha"}.get(type(module))
        if slope is not None and abs(getattr(module, slope)) > 1:
            raise ValueError(
                f"the activation {where} of g has {slope}={getattr(module, slope)}: its Lipschitz constant is above 1, "
                "so Lip(g) < 1 is not enforced by the spectral norms"
            )


class InvertibleResBlock(nn.Module):
    """y = x + g(x) with Lip(g) < 1 (i-ResNet, Behrmann et al. 2019; Residual Flows, Chen et al. 2019).

    forward(x) -> (y, logdet [B]) with logdet an estimate of log|det(I + J_g(x))|:
      "series":   Σ_{k=1}^{n_terms} (−1)^{k+1} vᵀJ^k v / k with Hutchinson probes v (i-ResNet; biased by truncation)
      "roulette": n_exact_terms terms plus a Russian-roulette tail of random length N ~ Geom(p) or Poisson(1/p),
                  reweighted by 1/P(N ≥ k) (Residual Flows; unbiased). Finite variance needs Lip(g)² < 1 − p
                  (geometric) and is never guaranteed for a Poisson tail when terms decay geometrically: warned.
      "exact":    slogdet of the full Jacobian (d ≤ 256 per sample)
      "none":     zeros
    Gradients: neumann_grad=True differentiates through one vector–Jacobian product weighted by the Neumann series
    (memory independent of n_terms); memory_efficient=True moves that product into backward (recomputing g once),
    with each sample weighted by its own upstream gradient (the recomputation restores the random generators' states
    from before the forward, as torch's checkpoint does: random draws by other Python threads in between, on the same
    generator, change what it replays). neumann_grad=False backpropagates through the series.
    The returned logdet is always the estimate itself, never a surrogate. For dense-chain branches the eager Neumann
    gradient is written out in closed form (kexue_fast.flows.chain_neumann: one autograd node, memory_efficient
    either way), and off the CPU so is the gradient through the series (neumann_grad=False: Σ_j L_jᵀ dJ J^j v with
    L_j = Σ_i c_{i+j+1} vᵀJ^i); backward(create_graph=True) then differentiates the surrogate's (or the series')
    graph, so higher-order gradients exist. Convolution chains conv (act conv)* (integer zero padding; the
    ResidualFlow.conv recipe) get both in closed form on every device (kexue_fast.flows.conv_neumann: one autograd
    node, operator-norm spectral norms folded in, double backward as above; through the series when the probes share
    one roulette length, else by torch's graph of the series). Other branches go through autograd, where
    memory_efficient=True refuses double backward with a clear error.
    Backends: on CPU tensors (float32/float64) `auto` runs dense-chain branches on [B, D] inputs through the C++ block
    (kexue_fast.flows.chain_cpp, csrc/flows/dense_chain.cpp): the whole step — y, the series and either gradient,
    the spectral norms folded in — in one call forward and one backward, the same estimator and gradients as the
    torch closed forms above (tested to 1e-12 in float64), on the calling thread. With several torch threads it
    takes only small steps (chain_cpp.use_cpp) and leaves large ones to torch's multithreaded products. Under
    autocast, for half precision, for hooked chains (logged once: the hooks may be unexpected) and for other
    branches it runs the torch paths.
    Off the CPU `auto` runs the torch paths. KEXUE_FAST_BACKEND=torch forces them; =cpp raises where the C++ block
    cannot run; =triton runs the fused Triton forward of float32 CUDA Linear·act·Linear branches
    (kexue_fast.flows.fused), slower than the closed form in an H200 training step
    (benchmarks/results/flows-cuda.md), and raises where that kernel cannot run.

    inverse(y) -> x by fixed-point iteration or Anderson acceleration, stopping when ‖F(x) − x‖∞ ≤ atol +
    (rtol + 16ε)‖x‖∞ per sample for F(x) = y − g(x), ε the dtype's rounding unit (a RuntimeWarning if max_iter
    is reached); `last_inverse` holds the counts. With gradients on, x carries the implicit function's gradient to y
    and g's parameters (first order; see `inverse`). g may change after construction (a module replaced, g itself,
    parametrizations removed): each forward compares its modules with those the closed forms were read from.
    Under autocast and torch.func transforms the closed-form Functions give way to torch's graph of the series.

    torch.compile(fullgraph=True): for dense- and conv-chain branches the forward, log-det and backward trace into one
    graph (conv chains through kexue_fast.flows.conv_neumann.conv_series_logdet);
    the roulette length is then drawn on the device and capped at `roulette_max_terms` (terms masked, no host
    sync), and the fixed-point inverse becomes a `while_loop` with the same stopping rule (no stats, no warning).
    The NaN/Inf check of x in forward (a ValueError) runs on CPU tensors in eager mode only: on a GPU it would sync
    with the host every step. Other branches run the autograd path there and do not trace.
    """

    def __init__(
        self,
        g: nn.Module,
        *,
        logdet: str = "series",
        n_terms: int = 5,
        n_probes: int = 1,
        probe: str = "gaussian",
        roulette: str = "geometric",
        roulette_p: float = 0.5,
        n_exact_terms: int = 2,
        neumann_grad: bool = True,
        memory_efficient: bool = True,
        inverse_atol: float = 1e-6,
        inverse_rtol: float = 0.0,
        inverse_max_iter: int = 1000,
        inverse_method: str = "fixed_point",
        roulette_max_terms: int = 32,
    ) -> None:
        super().__init__()
        if not isinstance(g, nn.Module):
            raise TypeError(f"g must be a torch.nn.Module, got {type(g).__name__}")
        self.g = g
        self.logdet_method = _choice(logdet, LOGDET_METHODS, "logdet")
        self.n_terms = _int_at_least(n_terms, 1, "n_terms")
        self.n_probes = _int_at_least(n_probes, 1, "n_probes")
        self.probe = _choice(probe, ("gaussian", "rademacher"), "probe")
        self.roulette = _choice(roulette, ("geometric", "poisson"), "roulette")
        if not isinstance(roulette_p, numbers.Real) or not 0 < roulette_p < 1:
            raise ValueError(f"roulette_p must be in (0, 1), got {roulette_p!r}")
        self.roulette_p = float(roulette_p)
        self.n_exact_terms = _int_at_least(n_exact_terms, 0, "n_exact_terms")
        self.neumann_grad = bool(neumann_grad)
        self.memory_efficient = bool(memory_efficient)
        for name, value in (("inverse_atol", inverse_atol), ("inverse_rtol", inverse_rtol)):
            if not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if inverse_atol == 0 and inverse_rtol == 0:
            raise ValueError("inverse_atol and inverse_rtol cannot both be 0: the inverse would never stop")
        self.inverse_atol, self.inverse_rtol = float(inverse_atol), float(inverse_rtol)
        self.inverse_max_iter = _int_at_least(inverse_max_iter, 1, "inverse_max_iter")
        self.inverse_method = _choice(inverse_method, ("fixed_point", "anderson"), "inverse_method")
        self.roulette_max_terms = _int_at_least(roulette_max_terms, 1, "roulette_max_terms")
        _check_lipschitz_layers(g)
        self._detect()
        self.last_inverse: Optional[_inverse.InverseStats] = None
        if self.logdet_method == "roulette" and self.roulette == "geometric":
            self._check_variance()
        if self.logdet_method == "roulette" and self.roulette == "poisson":
            warnings.warn(
                "roulette='poisson': the Russian-roulette log-det estimator is unbiased but its variance is infinite "
                "whenever the series terms decay geometrically (they do for Lip(g) < 1); prefer roulette='geometric' "
                "with Lip(g)^2 < 1 - roulette_p",
                RuntimeWarning,
                stacklevel=2,
            )

    def _detect(self) -> None:
        """The descriptions of g the closed forms run on, and the structure they were read from (_structure)."""
        g = self.g
        # Dense chains W_L φ(⋯ W_1 x ⋯) get the analytic series (kexue_fast.flows.chain); anything else autograd.
        self._chain = DenseChain.detect(g)
        # Convolution chains get the closed-form step in eager mode, a traceable graph under torch.compile.
        self._conv_chain = ConvChain.detect(g) if self._chain is None else None
        self._fused, self._fused_reason = FusedDenseBranch.detect(self._chain)
        self._chain_modules = [g, *g] if self._chain is not None or self._conv_chain is not None else []
        self._g_structure = _structure(g)

    def _redetect_if_changed(self) -> None:
        """Reads g again where its modules changed since (blk.g[1] = nn.Tanh(), a new g, parametrizations added or
        removed): the descriptions hold the old modules, which the closed forms would keep computing."""
        if _structure(self.g) != self._g_structure:
            _check_lipschitz_layers(self.g)
            self._detect()

    def _check_variance(self) -> None:
        """Geometric tail: Var < ∞ iff Σ_k Lip^{2k} / P(N ≥ k) < ∞, i.e. Lip(g)² < 1 − p. Checked at construction,
        with the certified bound of kexue_fast.flows.lipschitz (an upper bound: a warning means 'not certified')."""
        from ..flows.lipschitz import branch_bound

        bound = branch_bound(self.g)
        limit = math.sqrt(1 - self.roulette_p)
        if bound is None or bound >= limit:
            shown = "unknown" if bound is None else f"<= {bound:.4f}"
            warnings.warn(
                f"Russian-roulette log-det with a Geom(p={self.roulette_p}) tail has finite variance only if "
                f"Lip(g) < sqrt(1 - p) = {limit:.4f}; Lip(g) is {shown}. Lower roulette_p, lower the spectral-norm "
                "coefficient, or use logdet='series'",
                RuntimeWarning,
                stacklevel=3,
            )

    def _plans(self, x: Tensor):
        if self.logdet_method == "series":
            return [_logdet.truncated_plan(self.n_terms)] * self.n_probes
        if torch.compiler.is_compiling():
            return [
                _logdet.roulette_plan_on_device(
                    self.n_exact_terms, self.roulette, self.roulette_p, self.roulette_max_terms, x
                )
                for _ in range(self.n_probes)
            ]
        return [_logdet.roulette_plan(self.n_exact_terms, self.roulette, self.roulette_p) for _ in range(self.n_probes)]

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                f"x must be a floating tensor, got {type(x).__name__ if not isinstance(x, Tensor) else x.dtype}"
            )
        if x.ndim < 2:
            raise ValueError(f"x must be [B, ...] with a batch dimension, got shape {tuple(x.shape)}")
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self._redetect_if_changed()
        self._check_width(x, "x")
        if x.shape[0] == 0:  # nothing to estimate (the series paths reshape by the batch size)
            return x + self.g(x), x.new_zeros(0)
        requested = _dispatch.requested_backend(None)
        # autocast lowers g's products: the closed-form Functions (written for one dtype) give way to torch's graph
        # of the same series, which autocast follows; so do torch.func transforms (no setup_context there)
        graph_only = compiling or torch.is_autocast_enabled(x.device.type) or _functorch_wrapped(x)
        if compiling and requested in ("cpp", "triton"):  # explicit backends run or raise, never fall back
            raise NotImplementedError(
                f"KEXUE_FAST_BACKEND='{requested}' cannot run InvertibleResBlock under torch.compile (the "
                f"{'C++ block' if requested == 'cpp' else 'fused Triton block'} is not traced): unset it or set it to "
                "'auto' or 'torch' there"
            )
        backend = "torch" if compiling else _dispatch.choose(OP, x.device, x.dtype)
        method = self.logdet_method
        if backend == "cpp" and requested == "auto" and self._chain is not None and x.ndim == 2 \
                and not chain_cpp.use_cpp(self._chain, x.shape[0]):  # fmt: skip
            backend = "torch"  # a large step on several torch threads: torch's multithreaded products are faster
        if backend == "cpp":
            reason = self._cpp_unavailable(x)
            if reason is None:  # the C++ step checks x's finiteness itself; probes, then plans, as the torch path
                probes = self._probes(x, compiling)
                return chain_logdet_cpp(self._chain, x, self._plans(x), probes, not self.neumann_grad)
            if requested == "cpp":
                raise NotImplementedError(f"KEXUE_FAST_BACKEND='cpp' cannot run this InvertibleResBlock: {reason}")
            if reason == _HOOKED and reason not in _LOGGED_FALLBACKS:  # the one case a user may not expect
                _LOGGED_FALLBACKS.add(reason)
                _dispatch.logger.warning("InvertibleResBlock runs on torch, not the C++ block: %s", reason)
        # (x·0).sum() is 0 exactly when every entry is finite (∞·0 = NaN): one pass, cheaper than isfinite().all()
        if (
            not compiling
            and x.device.type == "cpu"
            and not _functorch_wrapped(x)
            and float(x.detach().mul(0).sum()) != 0.0
        ):
            raise ValueError("x contains NaN or Inf")
        if backend == "triton":
            reason = self._fused_unavailable(x)
            if reason is None:
                probes = [_logdet.draw_probe(x, self.probe) for _ in range(self.n_probes)]
                return self._fused.series_logdet(x, self._plans(x), probes)
            if _dispatch.requested_backend(None) == "triton":
                raise NotImplementedError(f"KEXUE_FAST_BACKEND='triton' cannot run this InvertibleResBlock: {reason}")
            if reason not in _LOGGED_FALLBACKS:
                _LOGGED_FALLBACKS.add(reason)
                _dispatch.logger.warning("InvertibleResBlock runs on torch, not the fused Triton block: %s", reason)
        if not compiling and torch.is_inference_mode_enabled() and self._takes_autograd(x, method):
            # these estimators take vector–Jacobian products of g through autograd, which inference mode switches
            # off: run them on a normal copy of x, without a graph kept (as under no_grad)
            with torch.inference_mode(False), torch.no_grad():
                y, logdet = self.forward(x.clone())
            return y, logdet
        if method == "none":
            gx = self.g(x)
            return x + gx, x.new_zeros(x.shape[0])
        if method == "exact":
            gx, logdet = _logdet.exact_logdet(self.g, x)
            return x + gx, logdet
        probes = self._probes(x, compiling)
        # the closed forms read g's layers raw (spectral norms folded in, advanced per call): inside
        # parametrize.cached() g itself runs, on the weights cached there
        plain = hook_free(self._chain_modules) and not _parametrizations_cached()
        if self._chain is not None and x.ndim == 2 and plain:
            if not graph_only:  # the Neumann gradient or the series' own in closed form, one autograd node
                return chain_neumann_logdet(self._chain, x, self._plans(x), probes, not self.neumann_grad)
            gx, logdet = chain_series_logdet(self._chain, x, self._plans(x), probes, neumann_grad=self.neumann_grad)
        else:
            plans = self._plans(x)
            through_series = not self.neumann_grad and torch.is_grad_enabled()
            if self._conv_chain is None or not plain:
                gx, logdet = _logdet.series_logdet(
                    self.g, x, plans, probes, neumann_grad=self.neumann_grad, memory_efficient=self.memory_efficient
                )
            elif not graph_only and (not through_series or _one_plan(plans)):  # one autograd node
                return conv_neumann_logdet(self._conv_chain, x, plans, probes, through_series)
            else:  # torch's graph without autograd.grad: traced by torch.compile
                gx, logdet = conv_series_logdet(self._conv_chain, x, plans, probes, neumann_grad=self.neumann_grad)
        return x + gx, logdet

    def _probes(self, x: Tensor, compiling: bool) -> List[Tensor]:
        """n_probes Hutchinson probes like x. Under torch.compile one draw of all of them: torch's min-cut partitioner
        (backend="aot_eager") merges repeated identical random draws in a graph, which would repeat one probe."""
        if compiling and self.n_probes > 1:
            return list(_logdet.draw_probes(x, self.probe, self.n_probes).unbind(0))
        return [_logdet.draw_probe(x, self.probe) for _ in range(self.n_probes)]

    def _takes_autograd(self, x: Tensor, method: str) -> bool:
        """Whether this call's log-det takes vector–Jacobian products through autograd (exact, or a branch without
        a closed form: generic g, hooked chains, dense chains on inputs that are not [B, D])."""
        if method in ("exact", "none"):
            return method == "exact"
        if not hook_free(self._chain_modules) or _parametrizations_cached():
            return True
        return not ((self._chain is not None and x.ndim == 2) or self._conv_chain is not None)

    def _cpp_unavailable(self, x: Tensor) -> Optional[str]:
        """Why the C++ block (kexue_fast.flows.chain_cpp) cannot run this call (None if it can)."""
        if self._chain is None:
            return "g is not a dense chain Linear (activation Linear)* (the C++ block covers those)"
        if not hook_free(self._chain_modules):
            return _HOOKED
        if _parametrizations_cached():
            return _CACHED
        if self.logdet_method not in ("series", "roulette"):
            return f'logdet="{self.logdet_method}" has no C++ path (series and roulette do)'
        if x.ndim != 2:
            return f"x must be [B, D] for the C++ block, got {x.ndim}-D"
        if x.dtype not in (torch.float32, torch.float64):  # registered for all floats so that auto stays quiet
            return f"the C++ block takes float32 and float64, not {str(x.dtype).replace('torch.', '')}"
        if torch.is_autocast_enabled(x.device.type):
            return "autocast is on (the C++ block computes in x's dtype; torch's path follows autocast)"
        if _functorch_wrapped(x):
            return "a torch.func transform (grad/vmap/jacrev) is active: the C++ block cannot read its tensors"
        return None

    def _fused_unavailable(self, x: Tensor) -> Optional[str]:
        """Why the fused Triton block cannot run this call (None if it can)."""
        if self._fused is None:
            return self._fused_reason
        if not hook_free(self._chain_modules):
            return "g or one of its layers has forward/backward hooks, which the fused kernel would skip"
        if _parametrizations_cached():
            return _CACHED
        if self.logdet_method not in ("series", "roulette"):
            return f'logdet="{self.logdet_method}" is not fused (series and roulette are)'
        if not self.neumann_grad and torch.is_grad_enabled():
            return "neumann_grad=False (backpropagation through the series) is not fused"
        if x.ndim != 2:
            return f"x must be [B, D], got {x.ndim}-D"
        if torch.is_autocast_enabled(x.device.type) or _functorch_wrapped(x):
            return "autocast or a torch.func transform is on (the fused kernel follows neither)"
        return None

    @property
    def series_path(self) -> str:
        """'dense-chain' (analytic vector–Jacobian products), 'conv-chain' (convolutions and activations: the
        closed-form step in eager mode) or 'autograd' (generic g, or a chain with forward/backward hooks, which the
        closed forms would skip)."""
        if not hook_free(self._chain_modules):
            return "autograd"
        if self._chain is not None:
            return "dense-chain"
        return "conv-chain" if self._conv_chain is not None else "autograd"

    def _check_width(self, t: Tensor, name: str) -> None:
        """A clear error where t cannot enter a detected chain g (torch's own named no argument: "mat1 and mat2
        shapes cannot be multiplied", a conv's channel count, the C++ block's "x has the wrong shape")."""
        if self._chain is not None:
            width = self._chain.linears[0].in_features
            if t.shape[-1] != width:
                raise ValueError(f"{name} must be [..., {width}] (g's first Linear takes {width} features), got shape "
                                 f"{tuple(t.shape)}")  # fmt: skip
        elif self._conv_chain is not None:
            channels = self._conv_chain.layers[0].layer.in_channels
            if t.shape[1] != channels:
                raise ValueError(f"{name} must be [B, {channels}, ...] (g's first convolution takes {channels} "
                                 f"channels), got shape {tuple(t.shape)}")  # fmt: skip

    def inverse(self, y: Tensor) -> Tensor:
        """x with x + g(x) = y (see the class docstring for the solver and its stopping rule). With gradients on and y
        or g's parameters requiring them, x carries the implicit function's gradient (_implicit_gradient): ∂L/∂y = a and
        ∂L/∂θ = −(∂g/∂θ)ᵀa for a = (I + J_g(x))⁻ᵀ ∂L/∂x, solved by the same fixed point (first order only: a backward
        with create_graph=True through it raises). Spectral norms in g (kexue_fast's, and torch's outside torch.compile)
        do not advance their power iteration during the solve."""
        if not isinstance(y, Tensor) or not y.is_floating_point():
            raise TypeError("y must be a floating tensor")
        g: Callable[[Tensor], Tensor] = self.g
        if torch.compiler.is_compiling():
            traceable = (_inverse.fixed_point_traceable if self.inverse_method == "fixed_point"
                         else _inverse.anderson_traceable)  # fmt: skip
            # (torch's spectral norms are not switched here: no module mutation while traced)
            with frozen_power_iteration():
                return traceable(g, y, self.inverse_atol, self.inverse_rtol, self.inverse_max_iter)
        if y.ndim < 2:
            raise ValueError(f"y must be [B, ...] with a batch dimension, got shape {tuple(y.shape)}")
        self._check_width(y, "y")
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN or Inf")
        solver = _inverse.fixed_point if self.inverse_method == "fixed_point" else _inverse.anderson
        with frozen_power_iteration(), _torch_spectral_norms_frozen(self.g):
            x, self.last_inverse = solver(g, y, self.inverse_atol, self.inverse_rtol, self.inverse_max_iter)
            if torch.is_grad_enabled() and (y.requires_grad or any(p.requires_grad for p in self.g.parameters())):
                x = self._implicit_gradient(x, y)
        return x

    def _implicit_gradient(self, x: Tensor, y: Tensor) -> Tensor:
        """x (the same values) with the gradient of the fixed point x = y − g(x): z = y − g(x) is evaluated with a graph
        at the solution and its incoming gradient ḡ replaced by a = (I + J_g)⁻ᵀ ḡ (a = ḡ − J_gᵀa, iterated to the
        inverse's tolerances), so that autograd carries on through z to y and g's parameters (DEQ-style)."""
        x0 = x.detach().requires_grad_()
        with torch.enable_grad():
            gx0 = self.g(x0)  # its graph serves J_gᵀa (gradients w.r.t. x0 only)
        z = y - self.g(x.detach())
        atol, rtol, max_iter = self.inverse_atol, self.inverse_rtol, self.inverse_max_iter

        def solve(grad: Optional[Tensor]) -> Optional[Tensor]:
            if grad is None:  # an undefined incoming gradient (gradcheck's check) stays undefined: no solve
                return None
            if torch.is_grad_enabled():  # a is solved without a graph of its dependence on x, y and θ
                raise RuntimeError(
                    "double backward (create_graph=True) through InvertibleResBlock.inverse is not supported: its "
                    "implicit gradient a = (I + J_g)⁻ᵀ ∂L/∂x is solved without a graph of its own, so second "
                    "derivatives through it would be wrong; for them, unroll the fixed point x = y − g(x) under "
                    "autograd instead"
                )
            a = grad
            for _ in range(max_iter):
                (jta,) = torch.autograd.grad(gx0, x0, a, retain_graph=True)
                new = grad - jta
                step = (new - a).abs().amax()
                a = new
                if float(step) <= atol + (rtol + 16 * torch.finfo(a.dtype).eps) * float(a.abs().amax()):
                    break
            else:
                warnings.warn(f"inverse's gradient did not converge in {max_iter} iterations (is Lip(g) < 1?)",
                              RuntimeWarning, stacklevel=2)  # fmt: skip
            return a

        z.register_hook(solve)
        return x.detach() + (z - z.detach())

    def extra_repr(self) -> str:
        return f"logdet={self.logdet_method!r}, n_terms={self.n_terms}, n_probes={self.n_probes}"


_CACHED = (
    "inside torch.nn.utils.parametrize.cached(): g runs on the cached weights (the fast paths read the raw "
    "weights and would advance the spectral norms' power iterations on every call)"
)


def _parametrizations_cached() -> bool:
    """Whether torch.nn.utils.parametrize.cached() is active (a counter there)."""
    return bool(getattr(parametrize, "_cache_enabled", 0))


def _torch_spectral_norms_frozen(g: nn.Module):
    """torch's own spectral_norm parametrizations in g in eval mode for a while: in training mode each evaluation of g
    advances their power iteration, so the map being inverted would move under the fixed point."""
    from torch.nn.utils.parametrizations import _SpectralNorm

    return eval_mode([m for m in g.modules() if isinstance(m, _SpectralNorm) and m.training])


# What the closed forms' descriptions copy from g's children (activation constants, convolution geometry) and from
# their parametrizations (a spectral norm's coefficient and mode): changed in place (blk.g[1].alpha = 0.5, a norm's
# coeff lowered), the old values would be kept computing, silently
_CHILD_ATTRS = ("alpha", "negative_slope", "stride", "padding", "dilation", "groups", "padding_mode")


def _structure(g: nn.Module) -> tuple:
    """g's identity and type, its children's, and their parametrizations', with the attributes the closed forms'
    descriptions (flat chains of g's children, spectral norms folded in) copied (_CHILD_ATTRS; a norm's coeff, dim
    and operator), compared on every forward. A replaced child changes its id; the first parametrization added or the
    last removed changes its class."""
    out = [id(g), type(g)]
    for c in g._modules.values():
        out += (id(c), type(c))
        if c is None:
            continue
        out += [getattr(c, name, None) for name in _CHILD_ATTRS]
        lists = c._modules.get("parametrizations")
        if lists is not None:
            for plist in lists._modules.values():
                for q in plist._modules.values():
                    out += (id(q), getattr(q, "coeff", None), getattr(q, "dim", None), id(getattr(q, "conv", None)))
    return tuple(out)


def _functorch_wrapped(x: Tensor) -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev) is active, over x or over g's parameters (functional_call):
    the closed-form autograd Functions have no setup_context for them, and the C++ block cannot read their tensors."""
    return torch._C._functorch.maybe_current_level() is not None or torch._C._functorch.is_functorch_wrapped_tensor(x)
