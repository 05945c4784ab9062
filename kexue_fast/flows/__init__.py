"""Invertible residual networks: log-determinant estimators, inverses, Lipschitz certificates.

The modules are in kexue_fast.nn (InvertibleResBlock, ResidualFlow, LipSwish, ActNorm, Squeeze)."""

from .lipschitz import LipschitzReport, lipschitz_report

__all__ = ["LipschitzReport", "lipschitz_report"]
