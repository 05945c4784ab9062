"""GAN heads: Cascading Rejection (arXiv:1911.10979; kexue.fm "级联抑制") — stage scores in one GEMM and the
weighted per-stage losses. The module is kexue_fast.nn.CascadingRejection."""

from . import reference
from .cascading import cascading_directions, cascading_rejection
from .losses import KINDS, cascading_rejection_generator_loss, cascading_rejection_loss, stage_weights

__all__ = [
    "KINDS",
    "cascading_directions",
    "cascading_rejection",
    "cascading_rejection_generator_loss",
    "cascading_rejection_loss",
    "reference",
    "stage_weights",
]
