"""Denoising autoencoders as generative models (kexue.fm "从去噪自编码器到生成模型"): DSM, NCSN's multi-σ DSM,
MDSM, Denoising Density Estimators, and the samplers (annealed Langevin, temperature-annealed Langevin) with a fused
Triton Langevin step."""

from .langevin import langevin_step
from .losses import dde_generator_loss, dde_loss, denoise, dsm_loss, geometric_sigmas, score_from_energy
from .reference import GaussianMixture
from .samplers import AnnealedLangevin, annealed_langevin, temperature_schedule, tempered_langevin

__all__ = [
    "AnnealedLangevin",
    "GaussianMixture",
    "annealed_langevin",
    "dde_generator_loss",
    "dde_loss",
    "denoise",
    "dsm_loss",
    "geometric_sigmas",
    "langevin_step",
    "score_from_energy",
    "temperature_schedule",
    "tempered_langevin",
]
