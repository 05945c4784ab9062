"""Pure-torch truth for denoising score matching (kexue.fm "从去噪自编码器到生成模型"): Gaussian mixtures with
exact noisy scores, and the Langevin update the fused kernel computes.

The optimal denoiser (Vincent 2011; Alain & Bengio 2014): for x̃ = x + σε, ε ~ N(0, I),
    r*(x̃) = argmin_r E‖r(x̃) − x‖² = E[x | x̃] = x̃ + σ² ∇log p_σ(x̃),   p_σ = p ∗ N(0, σ²I),
so a denoiser is a score model and DSM, E‖s(x̃) + (x̃ − x)/σ²‖², is minimized by s = ∇log p_σ.
For a mixture p = Σ_k π_k N(μ_k, diag(s_k²)), p_σ = Σ_k π_k N(μ_k, diag(s_k² + σ²)) and
    ∇log p_σ(x) = Σ_k r_k(x) (μ_k − x) / (s_k² + σ²),   r_k = softmax_k(log π_k + log N(x; μ_k, s_k² + σ²)).
Langevin dynamics for p^{1/T} with step α (Song & Ermon 2019, NCSN; Li et al. 2019, MDSM):
    x ← x + (α/2) ∇log p(x) + √(α T) z,   z ~ N(0, I).
Shapes: x [B, d]; means [K, d]; stds [K] or [K, d]; σ a float or [B].
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


class GaussianMixture:
    """A mixture of axis-aligned Gaussians with exact densities, scores of p_σ = p ∗ N(0, σ²I), and samples.

    weights [K] (normalized here), means [K, d], stds [K] or [K, d] (> 0). float64 by default.
    """

    def __init__(self, weights: Union[Tensor, Sequence[float]], means: Union[Tensor, Sequence[Sequence[float]]],
                 stds: Union[Tensor, Sequence[float], float], dtype: torch.dtype = torch.float64,
                 device: Union[str, torch.device, None] = None) -> None:  # fmt: skip
        w = torch.as_tensor(weights, dtype=dtype, device=device)
        mu = torch.as_tensor(means, dtype=dtype, device=device)
        s = torch.as_tensor(stds, dtype=dtype, device=device)
        if mu.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(mu.shape)}")
        k, d = mu.shape
        if w.shape != (k,) or not bool((w > 0).all()):
            raise ValueError(f"weights must be [K] = [{k}] positive numbers, got {w}")
        if s.ndim == 0:
            s = s.expand(k)
        if s.ndim == 1:
            s = s[:, None].expand(k, d)
        if s.shape != (k, d) or not bool((s > 0).all()):
            raise ValueError(f"stds must be > 0 of shape [K], [K, d] or a float, got shape {tuple(s.shape)}")
        self.weights = w / w.sum()
        self.means = mu
        self.stds = s.contiguous()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _variances(self, sigma: Union[float, Tensor], x: Tensor) -> Tensor:
        """[B or 1, K, d] variances s_k² + σ²."""
        var = self.stds**2
        if isinstance(sigma, Tensor) and sigma.ndim > 0:
            return var[None] + sigma.reshape(-1, 1, 1).to(var) ** 2
        return (var + float(sigma) ** 2)[None] if not isinstance(sigma, Tensor) else (var + sigma.to(var) ** 2)[None]

    def _log_components(self, x: Tensor, sigma: Union[float, Tensor]) -> tuple:
        var = self._variances(sigma, x)
        diff = self.means[None] - x.to(self.means)[:, None, :]  # [B, K, d]
        logn = -0.5 * ((diff**2 / var).sum(-1) + torch.log(2 * math.pi * var).sum(-1))
        return torch.log(self.weights)[None] + logn, diff, var

    def log_prob(self, x: Tensor, sigma: Union[float, Tensor] = 0.0) -> Tensor:
        """log p_σ(x) [B]."""
        logc, _, _ = self._log_components(x, sigma)
        return torch.logsumexp(logc, dim=1)

    def score(self, x: Tensor, sigma: Union[float, Tensor] = 0.0) -> Tensor:
        """∇log p_σ(x) [B, d] in x's dtype (σ a float or per-sample [B])."""
        logc, diff, var = self._log_components(x, sigma)
        resp = torch.softmax(logc, dim=1)  # [B, K]
        return (resp[..., None] * diff / var).sum(1).to(x.dtype)

    def responsibilities(self, x: Tensor, sigma: Union[float, Tensor] = 0.0) -> Tensor:
        """r_k(x) [B, K]: the posterior probability of each component."""
        return torch.softmax(self._log_components(x, sigma)[0], dim=1)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """n samples [n, d] (and the component of each with `sample_with_labels`)."""
        return self.sample_with_labels(n, generator)[0]

    def sample_with_labels(self, n: int, generator: Optional[torch.Generator] = None) -> tuple:
        labels = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        labels = labels.to(self.means.device)
        return self.means[labels] + self.stds[labels] * z.to(self.means.device), labels


def langevin_step_reference(x: Tensor, score: Tensor, step_size: Union[float, Tensor], noise: Tensor,
                            temperature: Union[float, Tensor] = 1.0) -> Tensor:  # fmt: skip
    """x + (α/2) score + √(α T) noise, in float64 (the truth the fused kernel is compared with)."""
    a = torch.as_tensor(step_size, dtype=torch.float64)
    t = torch.as_tensor(temperature, dtype=torch.float64)
    return x.double() + (a / 2) * score.double() + torch.sqrt(a * t) * noise.double()


def annealed_langevin_reference(score, x0: Tensor, sigmas: Sequence[float], n_steps_each: int, step_lr: float,
                                noises: Sequence[Tensor]) -> Tensor:  # fmt: skip
    """NCSN's Algorithm 1 as written (Song & Ermon 2019), with the noise of every step given:
    α_i = ε σ_i² / σ_L²; for each level, n_steps_each updates x ← x + (α_i/2) s(x, σ_i) + √α_i z."""
    x = x0
    j = 0
    for sigma in sigmas:
        alpha = step_lr * (sigma / sigmas[-1]) ** 2
        labels = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
        for _ in range(n_steps_each):
            x = x + (alpha / 2) * score(x, labels) + math.sqrt(alpha) * noises[j]
            j += 1
    return x


def mmd2_unbiased(x: Tensor, y: Tensor, bandwidth: float) -> Tensor:
    """The unbiased squared MMD with a Gaussian kernel exp(−‖a − b‖²/(2 bandwidth²)) (Gretton et al. 2012)."""

    def gram(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))

    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = gram(x, x), gram(y, y), gram(x, y)
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean())  # fmt: skip
