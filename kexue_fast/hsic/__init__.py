"""HSIC: exact independence statistics in tiles (never an n×n matrix)."""

from .api import cka, hsic, hsic_stats
from .bandwidth import median_bandwidth
from .estimators import HSICStats

__all__ = ["HSICStats", "cka", "hsic", "hsic_stats", "median_bandwidth"]
