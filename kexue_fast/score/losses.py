"""Denoising objectives (kexue.fm "从去噪自编码器到生成模型"): DSM with one σ, NCSN's multi-σ DSM, MDSM, and the
Denoising Density Estimator with its generator objective.

With x̃ = x + σε, ε ~ N(0, I), per sample (sums over the feature dimensions):
    DSM / NCSN (weighting="sigma2", Vincent 2011; Song & Ermon 2019, λ(σ) = σ²):
        ℓ = ½ σ² ‖s(x̃, σ) + (x̃ − x)/σ²‖² = ½ ‖σ s(x̃, σ) + ε‖²,   σ uniform over the levels per sample
    MDSM (weighting="mdsm", Li, Chen & Sommer 2019, energy E, s = −∇E, σ₀ the fixed small level):
        ℓ = σ⁻² ‖(x − x̃)/σ₀² + ∇E(x̃)‖²
    DDE (Bigdeli, Lin, Portenier, Dunbar & Zwicker 2020, log-density network f):
        ℓ = ‖(x̃ − x) + σ² ∇f(x̃)‖²   (minimized by f = log p_σ + const)
    DDE generator: KL(q_σ ‖ p_σ) ≈ E_{x̃ ~ q_σ}[f_q(x̃) − f_p(x̃)], x̃ = G(z) + σε, gradient through the samples.
parameterization="score": model(x̃[, σ]) returns s [B, ...]; "energy": model(x̃[, σ]) returns E [B] and s = −∇E
(differentiable: create_graph). Shapes: x [B, ...]; σ per sample [B].
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

Sigmas = Union[float, Sequence[float], Tensor]
PARAMETERIZATIONS = ("score", "energy")
WEIGHTINGS = ("sigma2", "mdsm")
REDUCTIONS = ("mean", "sum", "none")


def as_sigmas(sigmas: Sigmas, name: str, device: torch.device, dtype: torch.dtype, keep_graph: bool = False) -> Tensor:
    """A 1-D tensor of noise levels, each finite and > 0 (a clear ValueError otherwise). keep_graph: a tensor that
    requires grad keeps its graph (the losses: their gradient reaches σ), else the levels are detached."""
    if isinstance(sigmas, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got {type(sigmas).__name__}")
    # numbers are checked on the host (no device sync), a tensor where it lives; each as given, then in `dtype`
    if isinstance(sigmas, numbers.Real):
        given = torch.tensor([float(sigmas)], dtype=torch.float64)
    elif isinstance(sigmas, Tensor):
        if not sigmas.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {sigmas.dtype}")
        if sigmas.ndim > 1:
            raise ValueError(f"{name} must be one level or a 1-D tensor of levels, got shape {tuple(sigmas.shape)}")
        given = sigmas.detach().reshape(-1)
    else:
        try:
            given = torch.tensor([float(s) for s in sigmas], dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor ({exc})") from None
    if given.numel() == 0:
        raise ValueError(f"{name} must hold at least one noise level")
    if not bool((torch.isfinite(given) & (given > 0)).all()):
        raise ValueError(f"{name} must be finite and > 0, got {given.tolist()}")
    values = given.to(dtype)
    narrower = torch.finfo(dtype).max < torch.finfo(given.dtype).max or dtype.itemsize < given.dtype.itemsize
    if narrower and not bool((torch.isfinite(values) & (values > 0)).all()):  # the given values, not the cast's
        raise ValueError(f"{name} must be finite and > 0 in the data's dtype {dtype}: {given.tolist()} became "
                         f"{values.tolist()}")  # fmt: skip
    if keep_graph and isinstance(sigmas, Tensor) and sigmas.requires_grad:
        return sigmas.reshape(-1).to(device=device, dtype=dtype)
    return values.to(device)


def as_number(value: object, name: str) -> float:
    """A real number given as a Python/NumPy number or a one-element floating tensor (read on the host), as a float;
    a TypeError naming `name` otherwise."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number (or a one-element floating tensor), got {type(value).__name__}")
    return float(value)


def as_count(value: object, name: str) -> int:
    """An int >= 1 (a Python or NumPy integer), else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_data(x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be a batch [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    return x


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def score_from_energy(energy: Callable[..., Tensor], create_graph: bool = True) -> Callable[..., Tensor]:
    """s(x, ...) = −∇ₓ E(x, ...) for an energy model returning [B] (or [B, 1]); differentiable by default."""

    def score(x: Tensor, *args) -> Tensor:
        if torch.is_inference_mode_enabled():  # sampling under inference_mode: ∇E needs autograd all the same
            with torch.inference_mode(False):
                x = x.clone()  # an inference tensor cannot enter autograd; its clone made here can
                args = tuple(a.clone() if isinstance(a, Tensor) and a.is_inference() else a for a in args)
                return score(x, *args)
        with torch.enable_grad():
            xr = x if x.requires_grad else x.detach().requires_grad_()
            e = energy(xr, *args)
            if not isinstance(e, Tensor):
                raise TypeError(f"the energy model must return a tensor [B] or [B, 1], got {type(e).__name__}")
            if e.shape not in ((x.shape[0],), (x.shape[0], 1)):
                raise ValueError(f"the energy model must return [B] or [B, 1] = [{x.shape[0]}], got {tuple(e.shape)}")
            grad = None
            if e.requires_grad:
                (grad,) = torch.autograd.grad(e.sum(), xr, create_graph=create_graph, allow_unused=True)
            if grad is None:
                raise ValueError("the energy model's output does not depend on its input x (no autograd graph from "
                                 "E to x: a detach(), .item() or torch.no_grad() inside the model?)")  # fmt: skip
        return -grad

    return score


def model_score(model: Callable[..., Tensor], x_noisy: Tensor, sigma: Optional[Tensor],
                parameterization: str) -> Tensor:  # fmt: skip
    """The model's score at x̃ (σ [B] passed as the second argument when not None)."""
    args = () if sigma is None else (sigma,)
    if parameterization == "energy":
        return score_from_energy(model)(x_noisy, *args)
    s = model(x_noisy, *args)
    if not isinstance(s, Tensor) or s.shape != x_noisy.shape:
        shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f'a "score" model must return a tensor of x\'s shape {tuple(x_noisy.shape)}, got {shape}')
    return s


def _noise(x: Tensor, noise: Optional[Tensor], generator: Optional[torch.Generator]) -> Tensor:
    if noise is None:  # drawn where the generator lives (a CPU generator for CUDA data works: the noise is copied)
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, dtype=x.dtype, device=device, generator=generator).to(x.device)
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a torch.Tensor of x's shape or None, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating tensor (ε ~ N(0, I)), got {noise.dtype}")
    if noise.shape != x.shape:
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    return noise.to(x.dtype)


def sample_levels(levels: Tensor, batch: int, sigma_indices: Optional[Tensor],
                  generator: Optional[torch.Generator]) -> Tensor:  # fmt: skip
    """σ per sample [B]: levels[sigma_indices], or uniform over the levels (one level: no draw, which torch.func.vmap
    would refuse in its default randomness mode)."""
    if sigma_indices is None and levels.numel() == 1:
        return levels.expand(batch).clone()
    if sigma_indices is None:
        device = generator.device if generator is not None else "cpu"  # the generator's device, whichever it is
        sigma_indices = torch.randint(0, levels.numel(), (batch,), generator=generator, device=device)
        sigma_indices = sigma_indices.to(levels.device)
    else:
        if not isinstance(sigma_indices, Tensor) or sigma_indices.dtype == torch.bool \
                or sigma_indices.is_floating_point() or sigma_indices.is_complex():  # fmt: skip
            kind = sigma_indices.dtype if isinstance(sigma_indices, Tensor) else type(sigma_indices).__name__
            raise TypeError(f"sigma_indices must be an integer tensor [B] = [{batch}] (not bool: it would be taken "
                            f"as a mask), got {kind}")  # fmt: skip
        sigma_indices = sigma_indices.long()  # uint8 indices would also index as a mask
        if sigma_indices.shape != (batch,):
            raise ValueError(f"sigma_indices must be an integer tensor [B] = [{batch}], got shape "
                             f"{tuple(sigma_indices.shape)}")  # fmt: skip
        # checked in eager mode (a host sync where the indices live on a GPU; traced graphs skip it)
        skip = torch.compiler.is_compiling() or not batch
        if not skip and not bool(((sigma_indices >= 0) & (sigma_indices < levels.numel())).all()):
            raise ValueError(f"sigma_indices must lie in [0, {levels.numel()}) (one index per level; negative "
                             f"indices would wrap around), got {sigma_indices.tolist()}")  # fmt: skip
    return levels[sigma_indices.to(levels.device)]


def dsm_loss(
    model: Callable[..., Tensor],
    x: Tensor,
    sigmas: Sigmas,
    *,
    parameterization: str = "score",
    weighting: str = "sigma2",
    sigma0: float = 0.1,
    conditional: Optional[bool] = None,
    sigma_indices: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> Tensor:
    """Denoising score matching: single σ, NCSN multi-σ (λ(σ) = σ²) or MDSM (formulas in the module docstring).

    model: parameterization="score": model(x̃, σ) → s [B, ...] (or model(x̃) when not conditional);
    "energy": model(x̃[, σ]) → E [B], s = −∇E. x: data [B, ...]. sigmas: one level (a float) or the levels; each
    sample draws its σ uniformly (or sigma_indices [B] picks them). weighting: "sigma2" (NCSN) or "mdsm"
    (σ⁻²‖(x − x̃)/σ₀² − s‖², sigma0 = σ₀). conditional: pass σ [B] to the model (default: with several levels under
    "sigma2"; never for "mdsm", whose energy is unconditional). noise: ε [B, ...] (else drawn from generator).
    reduction: "mean" | "sum" over the batch, or "none" for the per-sample losses [B]. For float16 / bfloat16 data
    the loss is computed and returned in float32.
    """
    x = _check_data(x)
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f'parameterization must be "score" or "energy", got {parameterization!r}')
    if weighting not in WEIGHTINGS:
        raise ValueError(f'weighting must be "sigma2" or "mdsm", got {weighting!r}')
    if reduction not in REDUCTIONS:
        raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if weighting == "mdsm":
        sigma0 = as_number(sigma0, "sigma0")
        if not 0 < sigma0 < math.inf:  # σ₀ = ∞ drops the data term
            raise ValueError(f"sigma0 must be a finite number > 0, got {sigma0!r}")
    levels = as_sigmas(sigmas, "sigmas", x.device, x.dtype, keep_graph=True)
    batch = x.shape[0]
    sigma = sample_levels(levels, batch, sigma_indices, generator)
    eps = _noise(x, noise, generator)
    view = sigma.reshape((batch,) + (1,) * (x.ndim - 1))
    x_noisy = x + view * eps
    if conditional is None:
        conditional = weighting == "sigma2" and levels.numel() > 1
    s = model_score(model, x_noisy, sigma if conditional else None, parameterization)
    dims = tuple(range(1, x.ndim))
    wide = loss_dtype(x.dtype)  # half data: the squares are summed in float32 (they overflow float16)
    if weighting == "sigma2":
        residual = view.to(wide) * s.to(wide) + eps.to(wide)
        per_sample = 0.5 * (residual.pow(2).sum(dims) if dims else residual.pow(2))
    else:
        residual = (x.to(wide) - x_noisy.to(wide)) / sigma0**2 - s.to(wide)
        per_sample = (residual.pow(2).sum(dims) if dims else residual.pow(2)) / sigma.to(wide) ** 2
    return _reduce(per_sample, reduction)


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss of `dtype` data is computed and returned in: float32 for float16 / bfloat16 (a sum of squares
    overflows float16 from 65504: ‖ε‖² alone passes it at 3·256² features), else the data's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _one_sigma(sigma: object, x: Tensor) -> Tensor:
    """The single noise level of the DDE objectives, validated (a number, or a one-element tensor)."""
    levels = as_sigmas(sigma, "sigma", x.device, x.dtype, keep_graph=True)
    if levels.numel() != 1:
        raise ValueError(f"sigma must be one noise level (a number or a one-element tensor), got {levels.numel()}")
    return levels[0]


def dde_loss(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float,
    *,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
) -> Tensor:
    """The Denoising Density Estimator loss ‖(x̃ − x) + σ²∇f(x̃)‖², x̃ = x + σε (Bigdeli et al. 2020): its minimizer
    f is log p_σ up to a constant. model: f(x̃) → [B] (a log-density, unnormalized); x: [B, ...]; sigma > 0. For
    float16 / bfloat16 data the loss is computed and returned in float32."""
    x = _check_data(x)
    if reduction not in REDUCTIONS:
        raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
    level = _one_sigma(sigma, x)
    eps = _noise(x, noise, generator)
    x_noisy = x + level * eps
    grad = -score_from_energy(model)(x_noisy)  # ∇f = −(−∇f): f plays −E
    wide = loss_dtype(x.dtype)
    residual = (x_noisy.to(wide) - x.to(wide)) + level.to(wide) ** 2 * grad.to(wide)
    dims = tuple(range(1, x.ndim))
    return _reduce(residual.pow(2).sum(dims) if dims else residual.pow(2), reduction)


def dde_generator_loss(
    log_density_data: Callable[[Tensor], Tensor],
    log_density_model: Callable[[Tensor], Tensor],
    samples: Tensor,
    sigma: float,
    *,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """The DDE generator objective E[f_q(x̃) − f_p(x̃)] ≈ KL(q_σ ‖ p_σ), x̃ = samples + σε (Bigdeli et al. 2020).

    log_density_data f_p and log_density_model f_q: DDEs trained (with `dde_loss`) on data and on the generator's
    samples; samples: G(z) [B, ...] carrying the generator's graph. Gradients also reach the DDEs' parameters:
    step only the generator's optimizer with this loss."""
    samples = _check_data(samples)
    level = _one_sigma(sigma, samples)
    x_noisy = samples + level * _noise(samples, noise, generator)
    fq, fp = log_density_model(x_noisy), log_density_data(x_noisy)
    for name, f in (("log_density_model", fq), ("log_density_data", fp)):
        if not isinstance(f, Tensor):
            raise TypeError(f"{name} must return a tensor [B] or [B, 1], got {type(f).__name__}")
        if f.shape not in ((samples.shape[0],), (samples.shape[0], 1)):
            raise ValueError(f"{name} must return [B] or [B, 1], got {tuple(f.shape)}")
    return (fq.reshape(-1) - fp.reshape(-1)).mean()


def denoise(score: Callable[..., Tensor], x_noisy: Tensor, sigma: Union[float, Tensor], *args) -> Tensor:
    """The optimal denoiser r*(x̃) = x̃ + σ² ∇log p_σ(x̃) from a score model (Tweedie; the post's identity).

    score(x̃, *args) → ∇log p_σ(x̃) [B, ...]; x_noisy [B, ...]; sigma > 0: one level (a number or a 0-d tensor) or
    one per sample (a tensor [B]). The levels are checked on the host (a device sync for a GPU tensor)."""
    if not callable(score):
        raise TypeError(f"score must be callable (x[, ...]) -> ∇log p, got {type(score).__name__}")
    x_noisy = _check_data(x_noisy)
    batch = x_noisy.shape[0]
    if isinstance(sigma, Tensor) and sigma.ndim == 1 and sigma.numel() not in (1, batch):
        raise ValueError(f"sigma must be one level or one per sample [B] = [{batch}], got shape {tuple(sigma.shape)}")
    if isinstance(sigma, Tensor) and sigma.ndim > 1:
        raise ValueError(f"sigma must be one level or one per sample [B] = [{batch}], got shape {tuple(sigma.shape)}")
    if not isinstance(sigma, (numbers.Real, Tensor)) or isinstance(sigma, bool):
        raise TypeError(f"sigma must be a number or a tensor, got {type(sigma).__name__}")
    per_sample = isinstance(sigma, Tensor) and sigma.ndim == 1
    levels = as_sigmas(sigma, "sigma", x_noisy.device, x_noisy.dtype)
    s = score(x_noisy, *args)
    if not isinstance(s, Tensor) or s.shape != x_noisy.shape:
        shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"score must return a tensor of x_noisy's shape {tuple(x_noisy.shape)}, got {shape}")
    sig = levels.reshape((-1,) + (1,) * (x_noisy.ndim - 1)) if per_sample else levels[0]
    if isinstance(sigma, Tensor) and sigma.requires_grad:  # keep a differentiable σ's graph (the checks used a copy)
        sig = sigma.to(x_noisy.dtype).reshape(sig.shape)
    return x_noisy + sig**2 * s


def geometric_sigmas(sigma_max: float, sigma_min: float, n: int, dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device, None] = None) -> Tensor:  # fmt: skip
    """NCSN's noise levels: n values from sigma_max down to sigma_min in geometric progression [n]."""
    n = as_count(n, "n")
    if not (0 < sigma_min <= sigma_max < float("inf")):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got sigma_max={sigma_max!r}, sigma_min={sigma_min!r}")
    return geometric_levels(float(sigma_max), float(sigma_min), n).to(dtype=dtype, device=device)


def geometric_levels(start: float, end: float, n: int) -> Tensor:
    """n values from start to end in geometric progression [n] (float64), the endpoints exact (their log10 taken in
    float64: a float32 tensor's put σ_max and σ_min ~1e-7 off)."""
    levels = torch.logspace(math.log10(start), math.log10(end), n, dtype=torch.float64)
    levels[0] = start
    if n > 1:  # one level is the start, as numpy.geomspace's and the linear schedule's
        levels[-1] = end
    return levels
