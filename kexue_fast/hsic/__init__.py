"""HSIC: exact independence statistics in tiles (never an n×n matrix)."""

from .api import cka, hsic, hsic_stats
from .bandwidth import median_bandwidth
from .estimators import HSICStats
from .independence import HSICTestResult, hsic_test

__all__ = ["HSICStats", "HSICTestResult", "cka", "hsic", "hsic_stats", "hsic_test", "median_bandwidth"]
