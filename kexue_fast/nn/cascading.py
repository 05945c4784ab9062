"""`CascadingRejection`: a GAN discriminator head that scores a feature and, stage after stage, its rejections."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..gan.cascading import _check_labels, cascading_directions, cascading_rejection, conditional_directions
from ..gan.losses import StageWeights, discriminator_terms, generator_terms, stage_weights


def _size(value: object, name: str) -> int:
    """An integer >= 1 (numpy integers too) as a Python int; TypeError / ValueError naming `name` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


class CascadingRejection(nn.Module):
    """The last layer of a discriminator, replacing nn.Linear(in_features, 1) (or a projection head).

    For features v [B, in_features] it returns the N stage scores [B, n_stages]:
        D_i = ⟨v_i, w_i⟩ + b_i,   v₁ = v,   v_{i+1} = v_i − (⟨v_i, w_i⟩/‖w_i‖²) w_i
    computed as one GEMM v Mᵀ (kexue_fast.gan.cascading). Cascading Rejection: Park & Kwon 2019, arXiv:1911.10979;
    kexue.fm "级联抑制". conditional_classes=C adds a projection-discriminator embedding: sample b's heads are
    w_i + e_i[y_b] (Miyato & Koyama 2018), so forward needs labels y [B].

    Parameters: weight [n_stages, in_features] (nn.Linear's init), bias [n_stages] (if bias), class_weight
    [C, n_stages, in_features] (if conditional). Buffer: stage_weights λ [n_stages] (sums to 1), the loss weights
    used by `loss` and `generator_loss` (uniform unless `weights` is given).
    """

    def __init__(
        self,
        in_features: int,
        n_stages: int,
        *,
        weights: StageWeights = None,
        conditional_classes: Optional[int] = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        in_features, n_stages = _size(in_features, "in_features"), _size(n_stages, "n_stages")
        conditional_classes = None if conditional_classes is None else _size(conditional_classes, "conditional_classes")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating dtype (or None), got {dtype!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.n_stages = n_stages
        self.conditional_classes = conditional_classes
        self.weight = nn.Parameter(torch.empty(n_stages, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(n_stages, **factory)) if bias else None
        self.class_weight = (
            nn.Parameter(torch.empty(conditional_classes, n_stages, in_features, **factory))
            if conditional_classes is not None
            else None
        )
        lam = stage_weights(weights, n_stages, dtype=self.weight.dtype)
        self.register_buffer("stage_weights", lam.detach().to(device=self.weight.device))
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        lam = state_dict.get(prefix + "stage_weights")
        if isinstance(lam, Tensor) and lam.device.type != "meta":  # a checkpoint's λ: checked as the constructor's
            stage_weights(lam, self.n_stages)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_features)  # nn.Linear's default: U(−1/√fan_in, 1/√fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        if self.class_weight is not None:
            nn.init.uniform_(self.class_weight, -bound, bound)

    def directions(self, labels: Optional[Tensor] = None) -> Tensor:
        """M [n_stages, in_features] (or [B, n_stages, in_features] per label): D_i = ⟨v, m_i⟩ + b_i."""
        if self.class_weight is None:
            if labels is not None:
                raise ValueError("labels were given but this head is unconditional (conditional_classes=None)")
            return cascading_directions(self.weight)
        if labels is None:
            raise ValueError("this head is conditional: directions() needs labels")
        labels = _check_labels(labels, None, self.class_weight.shape[0], self.weight.device)
        return conditional_directions(self.weight, self.class_weight, labels)[1]

    def forward(
        self, v: Tensor, labels: Optional[Tensor] = None, *, return_rejection: bool = False
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Scores [B, n_stages]; with return_rejection=True also v_{N+1} [B, in_features]."""
        if self.class_weight is not None and labels is None:
            raise ValueError(f"this head is conditional (conditional_classes={self.conditional_classes}): pass labels")
        if self.class_weight is None and labels is not None:
            raise ValueError("labels were given but this head is unconditional (conditional_classes=None)")
        return cascading_rejection(
            v,
            self.weight,
            labels=labels,
            class_weight=self.class_weight,
            bias=self.bias,
            return_rejection=return_rejection,
        )

    def loss(self, scores: Tensor, real: Union[bool, Tensor], kind: str = "hinge") -> Tensor:
        """The discriminator loss (kexue_fast.gan.cascading_rejection_loss) with this head's stage weights."""
        terms = discriminator_terms(scores, real, kind)
        return self._average(terms)

    def generator_loss(self, scores: Tensor, kind: str = "hinge") -> Tensor:
        """The generator loss (kexue_fast.gan.cascading_rejection_generator_loss) with this head's stage weights."""
        return self._average(generator_terms(scores, kind))

    def _average(self, terms: Tensor) -> Tensor:
        if terms.shape[1] != self.n_stages:
            raise ValueError(f"scores must have n_stages = {self.n_stages} columns, got {terms.shape[1]}")
        return (terms.mean(0) * self.stage_weights.to(terms.dtype)).sum()

    def extra_repr(self) -> str:
        cond = f", conditional_classes={self.conditional_classes}" if self.class_weight is not None else ""
        return f"in_features={self.in_features}, n_stages={self.n_stages}{cond}, bias={self.bias is not None}"
