"""`hsic`, `hsic_stats`, `cka`: exact HSIC without an n×n matrix (formulas: kexue_fast.hsic.reference)."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .. import _dispatch
from .._autograd import no_autocast, transformed
from . import estimators
from .bandwidth import OP as BANDWIDTH_OP
from .bandwidth import median_bandwidth
from .tiled import TILE, KernelSpec, StreamingHSIC, stats_for

OP = "hsic"
# triton: float32 tiles, float64 sums, rows of width d <= 128 (kernels/hsic.py); cpp: the statistics pass and the
# recompute backward in C++ (csrc/hsic); torch: the tiled pass and backward.
_dispatch.register_op(
    OP,
    {
        "triton": (torch.float32,),
        "cpp": (torch.float32, torch.float64),
        "torch": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    },  # half: as auto ran it (in float32)
    # the backward's float64 weights meet the inputs in float64 dots: Triton 3.3 and 3.4 refuse them
    triton_needs={torch.float32: ((3, 5), "float64 tl.dot in the backward")},
)
_TRITON_MAX_DIM = 128

KERNELS = ("gaussian", "laplace", "linear", "imq", "delta")
Bandwidth = Union[str, float, None]


def _as_samples(t: object, name: str, kernel: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if kernel == "delta":
        if t.ndim != 1 or t.is_floating_point() or t.is_complex():
            raise ValueError(f'{name} must be an integer label vector [n] for kernel "delta", got {t.dtype} '
                             f"of shape {tuple(t.shape)}")  # fmt: skip
        return t
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor for kernel {kernel!r}, got {t.dtype}")
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[1] < 1:
        raise ValueError(f"{name} must be [n, d] with d >= 1 (or [n]), got shape {tuple(t.shape)}")
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: HSIC reads its values (bandwidths, checks)")
    if not transformed(t) and not bool(torch.isfinite(t).all()):  # (vmap cannot read values: NaN propagates there)
        raise ValueError(f"{name} contains NaN or Inf")
    if t.dtype in (torch.float16, torch.bfloat16):  # half tiles lost 2–3% of the value, 10–30% of the gradient
        t = t.float()  # before centring, which would round in half precision too
    # Every estimator here is invariant to translating the samples (distance kernels; for the linear kernel the
    # added terms are of the form a_i + a_j + c, which the centring H and the U-statistic cancel): centred samples
    # keep ‖a‖² + ‖b‖² − 2a·b and the linear statistics' cross products from cancelling far from the origin.
    return t - t.mean(0)


def _power_of_two(value: float) -> float:
    """The power of two nearest value (1 for 0 or a non-finite value; a normal float64): dividing by it is exact."""
    return 2.0 ** min(1023, max(-1022, round(math.log2(value)))) if 0 < value < math.inf else 1.0


def _kernel_spec(t: Tensor, kernel: str, bandwidth: Bandwidth, name: str) -> Tuple[Tensor, KernelSpec]:
    """(t, its kernel): radial kernels' inputs divided by a power of two near σ, σ with them (exact: the same kernel
    values, bit for bit), so that float32 squared distances neither underflow nor overflow at any scale of the data
    (x·1e-25 made −1/(2σ²) −inf against d² = 0, NaN; x·1e21 overflowed d²); the median is taken on data brought to
    O(1) the same way."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel_{name} must be one of {KERNELS}, got {kernel!r}")
    median = bandwidth is None or (isinstance(bandwidth, str) and bandwidth == "median")
    if not median and (isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real)
                       or not (bandwidth > 0 and math.isfinite(bandwidth))):  # fmt: skip
        raise ValueError(f'bandwidth_{name} must be "median" or a finite number > 0, got {bandwidth!r}')
    if kernel in ("linear", "delta"):  # no bandwidth: a valid one is ignored (a sweep over kernels may pass one)
        return t, KernelSpec(kernel)
    if median:
        data_scale = _power_of_two(float(t.detach().abs().max()))
        t = t / data_scale if data_scale != 1.0 else t
        # auto's own pick: KEXUE_FAST_BACKEND=triton, meant for hsic, would send it to a backend it does not have
        sigma = median_bandwidth(t, backend=_dispatch.auto_backend(BANDWIDTH_OP, t.device, t.dtype))
        # A zero median (more than half of the pairs coincide: all points equal, or a few values repeated) gives no
        # scale: σ = 1 in these units, i.e. the power of two nearest max|x − x̄| in the data's own units (hyppo
        # takes σ = 1 in the data's units, which depends on how they are scaled).
        sigma = sigma if sigma > 0 else 1.0
    else:
        sigma = float(bandwidth)
    scale = _power_of_two(sigma)
    if not median:  # a σ far below the data's spread overflows the tiles' squared distances (NaN, not K = I)
        spread = float(t.detach().abs().amax()) / sigma  # t is centred (_as_samples)
        if spread > math.sqrt(torch.finfo(t.dtype).max / (16 * t.shape[1])):
            raise ValueError(
                f"bandwidth_{name}={bandwidth!r} is too small for the data: max|{name} − mean|/σ = {spread:.3g}, "
                f"whose squares overflow {t.dtype} (every kernel value between distinct samples would be 0)"
            )
    return (t / scale if scale != 1.0 else t), KernelSpec(kernel, sigma / scale)


def _use_feature_stats(x: Tensor, y: Tensor, kx: KernelSpec, ky: KernelSpec, tile: int) -> bool:
    """Linear kernels on both sides take the d×d cross products (O(n·d²) work, d² memory) unless the inputs are wider
    than there are samples (and than a tile): then the streaming Gram tiles cost less in both (O(n²·d) work, O(n·d)
    memory), where d×d products of wide layers (CKA's typical case, d ≫ n) would need gigabytes."""
    return kx.name == ky.name == "linear" and _cross_products_fit(x, y, tile)


def _cross_products_fit(x: Tensor, y: Tensor, tile: int) -> bool:
    """dx + dy <= max(n, tile) for x, y [n, d] (or [n])."""
    width = (x.shape[1] if x.ndim == 2 else 1) + (y.shape[1] if y.ndim == 2 else 1)
    return width <= max(x.shape[0], tile)


def _feature_stats(x: Tensor, y: Tensor):
    """Linear kernels on both sides: the statistics from d×d cross products (no n² work), differentiable."""
    x, y = x.double(), y.double()
    nx, ny = (x * x).sum(1), (y * y).sum(1)
    s_kl = ((x.T @ y) ** 2).sum() - (nx * ny).sum()
    s_kk = ((x.T @ x) ** 2).sum() - (nx * nx).sum()
    s_ll = ((y.T @ y) ** 2).sum() - (ny * ny).sum()
    return s_kl, s_kk, s_ll, x @ x.sum(0) - nx, y @ y.sum(0) - ny, nx, ny


def _check_transforms(x: object, y: object, kernel_x: str, kernel_y: str, tile: int) -> None:
    """NotImplementedError under torch.func transforms (grad, vmap...) unless both kernels are linear and the d×d
    cross products serve (torch ops alone): the streamed tiles run in C++ / Triton or an autograd.Function without
    setup_context, and the median bandwidth reads the data on the host."""
    if not transformed(x, y):
        return
    if kernel_x == kernel_y == "linear" and isinstance(x, Tensor) and isinstance(y, Tensor) and x.ndim and y.ndim:
        if _cross_products_fit(x, y, tile):
            return
    raise NotImplementedError(
        "hsic / hsic_stats / cka / bottleneck_loss run under torch.func transforms (grad, vmap, jacrev...) only with "
        "linear kernels on both sides and dx + dy <= max(n, tile) (the d×d cross products, torch ops alone): the "
        "streamed Gram tiles of other kernels run in C++ / Triton or an autograd.Function torch.func cannot run. "
        "kexue_fast.hsic.reference's n × n forms (gram, hsic_biased, hsic_unbiased, normalized) run there"
    )


def _prepare(x, y, kernel_x, kernel_y, bandwidth_x, bandwidth_y, estimator, backend, min_n=2, tile=TILE,
             needs="HSIC"):  # fmt: skip
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    kernel_y = kernel_x if kernel_y is None else kernel_y
    if kernel_x not in KERNELS:
        raise ValueError(f"kernel_x must be one of {KERNELS}, got {kernel_x!r}")
    if kernel_y not in KERNELS:
        raise ValueError(f"kernel_y must be one of {KERNELS}, got {kernel_y!r}")
    if estimator not in ("biased", "unbiased"):
        raise ValueError(f'estimator must be "biased" or "unbiased", got {estimator!r}')
    _check_transforms(x, y, kernel_x, kernel_y, tile)
    x = _as_samples(x, "x", kernel_x)
    y = _as_samples(y, "y", kernel_y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples n, got {x.shape[0]} and {y.shape[0]}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on one device, got {x.device} and {y.device}")
    n = x.shape[0]
    if estimator == "unbiased" and n < 4:
        raise ValueError(f"the unbiased estimator needs n >= 4 samples, got n = {n}")
    if n < min_n:
        raise ValueError(f"{needs} needs n >= {min_n} samples, got n = {n}")
    # the wider of the floating inputs: Triton (float32 only) cast a float64 y down, where C++ and torch keep it
    floats = [t.dtype for t in (x, y) if t.is_floating_point()]
    dtype = torch.promote_types(*floats) if len(floats) == 2 else (floats[0] if floats else torch.float64)
    chosen = _dispatch.choose(OP, x.device, dtype, backend)  # before the medians: a bad backend fails at once
    x, kx = _kernel_spec(x, kernel_x, bandwidth_x, "x")
    y, ky = _kernel_spec(y, kernel_y, bandwidth_y if bandwidth_y is not None else "median", "y")
    widest = max(x.shape[1] if x.ndim == 2 else 1, y.shape[1] if y.ndim == 2 else 1)
    if chosen == "triton" and widest > _TRITON_MAX_DIM:
        reason = f"the Triton kernels keep rows of width d <= {_TRITON_MAX_DIM} in registers, got d = {widest}"
        if _dispatch.requested_backend(backend) == "triton":  # an explicit backend that cannot run, as in choose
            raise NotImplementedError(f"backend='triton' cannot run hsic: {reason}")
        _dispatch.logger.warning("kexue_fast.hsic runs on the torch path: %s", reason)
        chosen = "torch"
    return x, y, kx, ky, chosen


def hsic(
    x: Tensor,
    y: Tensor,
    *,
    kernel_x: str = "gaussian",
    kernel_y: Optional[str] = None,
    bandwidth_x: Bandwidth = "median",
    bandwidth_y: Bandwidth = None,
    estimator: str = "biased",
    normalize: bool = False,
    backend: str = "auto",
    tile: int = TILE,
) -> Tensor:
    """Exact HSIC of x [n, dx] and y [n, dy] (or [n] labels with kernel_y="delta"), a differentiable scalar.

    estimator="biased": tr(KHLH)/n²; "unbiased": Song et al. 2012; normalize=True divides by
    sqrt(HSIC(K,K)·HSIC(L,L)) (CKA for "biased"; for "unbiased" hyppo's Hsic statistic when both bandwidths are x's
    median, as hyppo takes them). float16 / bfloat16 inputs are computed in float32; the result has the wider
    input's dtype. Autocast does not apply (the Gram tiles stay in the inputs' precision).
    Kernels: gaussian exp(−d²/(2σ²)), laplace exp(−d/σ), imq (1 + d²/σ²)^(−1/2), linear, delta. bandwidth "median"
    is σ = the median pairwise distance of that input (exact; a constant for the gradient). Memory O(n·d): one
    streaming pass over tiles of K and L and a backward that recomputes them (Triton on CUDA float32, the C++ core on
    CPU, torch otherwise); linear kernels on both sides use d×d cross products instead while dx + dy <= max(n, tile)
    (O(n·d²) work, d² memory; wider inputs stream their Gram tiles).
    """
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    normalize = bool(normalize)
    out_dtype = _result_dtype(x, y)
    x, y, kx, ky, chosen = _prepare(x, y, kernel_x, kernel_y, bandwidth_x, bandwidth_y, estimator, backend, tile=tile)
    fn = estimators.estimate(estimator, normalize)
    with no_autocast(x.device.type):  # the tiles' ‖a‖² + ‖b‖² − 2a·b in bfloat16 was wrong by 130%
        if _use_feature_stats(x, y, kx, ky, tile):
            return fn(*_feature_stats(x, y)).to(out_dtype)
        return StreamingHSIC.apply(x, y, kx, ky, fn, tile, chosen).to(out_dtype)


def _result_dtype(x: object, y: object) -> torch.dtype:
    """The wider of the floating inputs' dtypes (float64 for label vectors on both sides)."""
    floats = [t.dtype for t in (x, y) if isinstance(t, Tensor) and t.is_floating_point()]
    if not floats:
        return torch.float64
    return torch.promote_types(*floats) if len(floats) == 2 else floats[0]


def hsic_stats(
    x: Tensor,
    y: Tensor,
    *,
    kernel_x: str = "gaussian",
    kernel_y: Optional[str] = None,
    bandwidth_x: Bandwidth = "median",
    bandwidth_y: Bandwidth = None,
    backend: str = "auto",
    tile: int = TILE,
) -> estimators.HSICStats:
    """Every HSIC variant of x [n, dx] and y [n, dy] from one streaming pass over K and L (kernels and bandwidths as
    in `hsic`), float64, no gradient: HSICStats(biased = tr(KHLH)/n², biased_n1 = tr(KHLH)/(n−1)², unbiased (Song et
    al. 2012; NaN for n < 4), cka = biased/√(HSIC_b(K,K)·HSIC_b(L,L)), cka_unbiased (the same with the unbiased
    estimator: hyppo's Hsic statistic), hsic_xx_biased, hsic_yy_biased, gamma_null_mean = (1 + μ_x μ_y − μ_x −
    μ_y)/n (E[HSIC_b] under independence for unit-diagonal kernels, else NaN), n)."""
    x, y, kx, ky, chosen = _prepare(x, y, kernel_x, kernel_y, bandwidth_x, bandwidth_y, "biased", backend, min_n=2,
                                    tile=tile)  # fmt: skip
    with torch.no_grad(), no_autocast(x.device.type):
        if _use_feature_stats(x, y, kx, ky, tile):
            stats: Tuple[Tensor, ...] = _feature_stats(x, y)
        else:
            stats = stats_for(chosen, x, y, kx, ky, tile)
    return estimators.all_variants(stats)


def cka(x: Tensor, y: Tensor, *, kernel: str = "linear", estimator: str = "biased", **kwargs) -> Tensor:
    """Centered kernel alignment (Kornblith et al. 2019) of x [n, dx] and y [n, dy], a differentiable scalar:

        CKA = HSIC(K, L) / √(HSIC(K, K) · HSIC(L, L)),   linear kernel by default (K = xxᵀ, L = yyᵀ),

    with the biased (tr(KHLH)/n²) or unbiased HSIC. `kernel` is both inputs' kernel (kernel_y= for another on y);
    other keyword arguments as in `hsic` (bandwidths, backend, tile)."""
    if "kernel_x" in kwargs:
        raise TypeError("cka takes kernel= for both inputs (and kernel_y= for another one on y), not kernel_x=")
    if "normalize" in kwargs:
        raise TypeError("cka is normalized by definition: for the unnormalized statistic call kexue_fast.hsic")
    return hsic(x, y, kernel_x=kernel, estimator=estimator, normalize=True, **kwargs)
