"""HSIC: exact independence statistics in tiles (never an n×n matrix)."""

from .api import cka, hsic, hsic_stats
from .bandwidth import median_bandwidth
from .bottleneck import bottleneck_loss
from .estimators import HSICStats
from .independence import HSICTestResult, hsic_test

# `kexue_fast.hsic` is the function (the package-level name); the contract also spells the loss
# `kexue_fast.hsic.bottleneck_loss`, so the function carries it as an attribute.
hsic.bottleneck_loss = bottleneck_loss  # type: ignore[attr-defined]

__all__ = [
    "HSICStats",
    "HSICTestResult",
    "bottleneck_loss",
    "cka",
    "hsic",
    "hsic_stats",
    "hsic_test",
    "median_bandwidth",
]
