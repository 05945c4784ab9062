"""Samplers for score models: NCSN's annealed Langevin dynamics and MDSM's temperature-annealed Langevin dynamics
with a final denoising step.

    annealed_langevin (Song & Ermon 2019, Algorithm 1): for σ₁ > … > σ_L, α_i = ε σ_i² / σ_L²,
        n_steps_each times  x ← x + (α_i/2) s(x, σ_i) + √α_i z
    tempered_langevin (Li, Chen & Sommer 2019, MDSM): for temperatures T₁ ≥ … ≥ T_n,
        x ← x + (ε/2) s(x) + √(ε T_t) z, then optionally x ← x + σ₀² s(x) (the optimal denoiser at σ₀)
Every step is one `langevin_step` (one fused Triton pass on CUDA). The step coefficients live on the device, the
noise seed too, and nothing reads a value back: the loop has no host sync and can be captured in a CUDA graph
(given a score model without syncs). Shapes: x0 [B, ...]; σ passed to the score as [B].
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch
from .._layout import memory_order
from .langevin import OP, apply_step, has_overlap, on_device, step_coefficients
from .losses import Sigmas, as_count, as_number, as_sigmas, geometric_levels

Score = Callable[..., Tensor]


def _positive(value: float, name: str) -> float:
    number = as_number(value, name)
    if not 0 < number < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _levels_in(levels: Tensor, dtype: torch.dtype) -> Tensor:
    """The validated float64 levels (σ₁ > … > σ_L > 0) in the samples' dtype, which must keep them finite, > 0 and
    strictly decreasing (the score gets σ in that dtype: float16 holds neither 1e5 nor 1e-8)."""
    cast = levels.to(dtype)
    ok = bool((torch.isfinite(cast) & (cast > 0)).all()) and bool((cast[1:] < cast[:-1]).all())
    if not ok:
        raise ValueError(f"sigmas must stay finite, > 0 and strictly decreasing in the samples' dtype {dtype}: "
                         f"{levels.tolist()} became {cast.tolist()}")  # fmt: skip
    return cast


def _check_score(score: object) -> None:
    if not callable(score):
        raise TypeError(f"score must be callable (x[, sigma]) -> ∇log p, got {type(score).__name__}")


def _start(x0: object) -> Tensor:
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating tensor [B, ...], got {getattr(x0, 'dtype', type(x0).__name__)}")
    if x0.ndim < 1 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be a batch [B, ...] with B >= 1, got shape {tuple(x0.shape)}")
    return x0


def _dense(x: Tensor) -> bool:
    return x.is_contiguous() or memory_order(x) is not None


def _seed(chosen: str, device: torch.device, generator: Optional[torch.Generator]) -> Optional[Tensor]:
    """The in-kernel noise's seed as a device tensor; drawn on the device (capturable in a CUDA graph) unless the
    generator lives elsewhere."""
    if chosen != "triton":
        return None
    if generator is None or on_device(generator, device):
        return torch.randint(0, 2**62, (1,), device=device, generator=generator)
    return torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).to(device)


def _checked_score(score: Score, x: Tensor, *args) -> Tensor:
    s = score(x, *args)
    if not isinstance(s, Tensor) or s.shape != x.shape:
        shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"score must return a tensor of x's shape {tuple(x.shape)}, got {shape}")
    return s.detach().to(x.dtype)  # a float32 model sampling float16/float64 x: the update keeps x's dtype


class AnnealedLangevin:
    """NCSN's annealed Langevin sampler with its schedule prepared once on the device (Song & Ermon 2019, Alg. 1).

    The constructor validates and moves everything to the device (it may sync); calling the sampler does not: the
    step coefficients (α_i/2, √α_i), α_i = step_lr·σ_i²/σ_L², and the levels are device tensors, the noise comes from
    the device RNG (in-kernel Philox with a device seed on the Triton path), so a call records into a CUDA graph
    (`inplace=True` on a static x, a score model without host syncs, and no CPU generator). The samples keep x's
    memory format where x is dense (a channels_last batch stays channels_last: the score model sees it so, and the
    Triton kernel updates it where it lies); the Triton path's in-kernel noise is keyed by memory position, so one seed
    arranges its draws by x's layout (the same distribution; the torch path draws in the shape's order).
    sigmas: σ₁ > … > σ_L (sequence or tensor); dtype: the samples' dtype; backend: "auto", "triton", "torch".
    """

    def __init__(self, sigmas: Sigmas, n_steps_each: int = 100, step_lr: float = 2e-5, *,
                 device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float32,
                 final_denoise: bool = False, backend: str = "auto") -> None:  # fmt: skip
        self.n_steps_each = as_count(n_steps_each, "n_steps_each")
        self.step_lr = _positive(step_lr, "step_lr")
        device = torch.device(device if device is not None else "cpu")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.backend = _dispatch.choose(OP, device, dtype, backend)
        levels = as_sigmas(sigmas, "sigmas", torch.device("cpu"), torch.float64)  # validated on the host, once
        if levels.numel() > 1 and not bool((levels[1:] < levels[:-1]).all()):
            raise ValueError(f"sigmas must be strictly decreasing (σ₁ > … > σ_L: α_i = step_lr·σ_i²/σ_L² divides by "
                             f"the smallest), got {levels.tolist()}")  # fmt: skip
        self.levels = _levels_in(levels, dtype).to(device)
        alphas = self.step_lr * (levels / levels[-1]) ** 2
        self.coef = step_coefficients(alphas, 1.0, dtype, torch.device("cpu")).to(device)
        # the torch path on CPU reads its coefficients as Python floats (no sync to avoid there; cheaper ops)
        cpu_torch = self.backend == "torch" and device.type == "cpu"
        self.host_coef = [tuple(row) for row in self.coef.tolist()] if cpu_torch else None
        self.final_denoise = bool(final_denoise)
        self.device, self.dtype = self.levels.device, dtype  # "cuda" resolved to its index, as inputs report it

    @torch.no_grad()
    def __call__(
        self,
        score: Score,
        x: Tensor,
        *,
        generator: Optional[torch.Generator] = None,
        inplace: bool = False,
        return_trajectory: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, List[Tensor]]]:
        """Run from x [B, ...] (on the sampler's device and dtype): score(x, σ) with σ [B]; the samples [B, ...]
        (and the state after each level with return_trajectory)."""
        x = _start(x)
        if x.device != self.device or x.dtype != self.dtype:
            raise ValueError(f"x must be {self.dtype} on {self.device} (the sampler's), got {x.dtype} on {x.device}")
        if inplace and has_overlap(x):
            raise ValueError(
                f"x: inplace=True writes the samples into x, whose elements share memory (strides {x.stride()}, an "
                "expanded tensor): pass inplace=False, or x.clone()"
            )
        seed = _seed(self.backend, x.device, generator)
        target = x if inplace else None
        if not inplace or not _dense(x):  # x's memory format kept where dense (a channels_last batch stays one)
            x = x.clone()  # (torch.preserve_format: x's strides where dense, else contiguous, copied back at the end)
        fused = self.backend == "triton"
        trajectory = []
        step = 0
        for i in range(self.levels.numel()):
            sigma = self.levels[i].expand(x.shape[0])  # a view: no host read
            coef = self.host_coef[i] if self.host_coef is not None else self.coef[i]
            for _ in range(self.n_steps_each):
                s = _checked_score(score, x, sigma)
                x = apply_step(x, s, coef, self.backend, None, generator, seed, step, x if fused or inplace
                               else None)  # fmt: skip
                step += 1
            if return_trajectory:
                trajectory.append(x.clone())
        if self.final_denoise:
            last = self.levels[-1]
            denoised = x + last * last * _checked_score(score, x, last.expand(x.shape[0]))
            x = x.copy_(denoised) if inplace else denoised
        if target is not None and target is not x:  # in place on an x with gaps (a slice): the result back into it
            x = target.copy_(x)
        return (x, trajectory) if return_trajectory else x


def annealed_langevin(
    score: Score,
    x0: Tensor,
    sigmas: Sigmas,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    *,
    final_denoise: bool = False,
    generator: Optional[torch.Generator] = None,
    return_trajectory: bool = False,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, List[Tensor]]]:
    """NCSN's annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).

    score(x, σ) → ∇log p_σ(x) [B, ...] with σ [B] the current level; x0 [B, ...] the start (e.g. uniform noise);
    sigmas: the levels σ₁ > … > σ_L (a sequence or a tensor); step α_i = step_lr·σ_i²/σ_L². final_denoise: finish
    with x + σ_L² s(x, σ_L) (Tweedie's denoiser; Jolicoeur-Martineau et al. 2020). generator: the noise (on CUDA
    with Triton, the in-kernel noise's seed). return_trajectory: also the state after each level [L × [B, ...]].
    For CUDA graphs build an `AnnealedLangevin` once and capture its call.
    """
    _check_score(score)
    x = _start(x0)
    sampler = AnnealedLangevin(sigmas, n_steps_each, step_lr, device=x.device, dtype=x.dtype,
                               final_denoise=final_denoise, backend=backend)  # fmt: skip
    return sampler(score, x, generator=generator, return_trajectory=return_trajectory)


@torch.no_grad()
def tempered_langevin(
    score: Score,
    x0: Tensor,
    temperatures: Union[Tensor, List[float]],
    step_size: float,
    *,
    n_steps_each: int = 1,
    sigma0: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> Tensor:
    """MDSM's temperature-annealed Langevin dynamics (Li, Chen & Sommer 2019) with the final denoising step.

    score(x) → ∇log p(x) [B, ...] (unconditional: for an energy model use `score_from_energy(E)`); temperatures
    [n] (T ≥ 0, e.g. `temperature_schedule`), n_steps_each updates x + (ε/2)s + √(εT)z per temperature with
    ε = step_size; sigma0: finish with the denoiser x + σ₀² s(x) (None: no denoising step).
    """
    _check_score(score)
    x = _start(x0)
    n_steps_each = as_count(n_steps_each, "n_steps_each")
    step_size = _positive(step_size, "step_size")
    if sigma0 is not None:
        sigma0 = _positive(sigma0, "sigma0")
    if isinstance(temperatures, (str, bytes, bool)):
        raise TypeError(f"temperatures must be a sequence of numbers or a tensor, got {type(temperatures).__name__}")
    try:
        temps = torch.as_tensor(temperatures, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"temperatures must be a sequence of numbers or a tensor ({exc})") from None
    if temps.ndim > 1:
        raise ValueError(f"temperatures must be one value or a 1-D sequence [n], got shape {tuple(temps.shape)}")
    temps = temps.reshape(-1)
    if temps.numel() == 0 or not bool(torch.isfinite(temps).all()) or not bool((temps >= 0).all()):
        raise ValueError("temperatures must be a non-empty sequence of finite numbers >= 0")
    chosen = _dispatch.choose(OP, x.device, x.dtype, backend)
    coef = step_coefficients(step_size, temps, x.dtype, torch.device("cpu")).to(x.device)  # [n, 2]
    if chosen == "torch" and x.device.type == "cpu":
        coef = [tuple(row) for row in coef.tolist()]
    seed = _seed(chosen, x.device, generator)
    x = x.clone()  # x's memory format kept where dense (a channels_last batch stays one), else contiguous
    step = 0
    for i in range(temps.numel()):
        for _ in range(n_steps_each):
            s = _checked_score(score, x)
            x = apply_step(x, s, coef[i], chosen, None, generator, seed, step, x if chosen == "triton" else None)
            step += 1
    if sigma0 is not None:
        x = x + sigma0**2 * _checked_score(score, x)
    return x


def temperature_schedule(n: int, t_max: float = 100.0, t_min: float = 1.0, kind: str = "geometric") -> Tensor:
    """n temperatures from t_max down to t_min [n] (float64): "geometric" or "linear" annealing."""
    as_count(n, "n")
    if kind not in ("geometric", "linear"):
        raise ValueError(f'kind must be "geometric" or "linear", got {kind!r}')
    if not (0 < t_min <= t_max < float("inf")):
        raise ValueError(f"need 0 < t_min <= t_max < inf, got t_max={t_max!r}, t_min={t_min!r}")
    if kind == "linear":
        return torch.linspace(t_max, t_min, n, dtype=torch.float64)
    return geometric_levels(float(t_max), float(t_min), n)
