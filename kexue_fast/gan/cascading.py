"""Cascading Rejection in one GEMM: the N stage scores are inner products with fixed directions m_i.

The cascade (kexue_fast.gan.reference) is linear in v: v_i = P_{i−1}⋯P₁ v with P_j = I − w_j w_jᵀ/‖w_j‖², so

    D_i = ⟨v, m_i⟩,   m_i = P₁⋯P_{i−1} w_i = w_i − Σ_{j<i} (⟨w_j, w_i⟩/‖w_j‖²) m_j,

i.e. (I + L) M = W with L_ij = G_ij/G_jj (j < i) strictly lower triangular and G = WWᵀ: one unit-triangular solve of
size N (O(N²d)) gives M [N, d], and the scores of a batch are one GEMM, S = V Mᵀ [B, N]. The final rejection is
another: v_{N+1} = P_N⋯P₁ v = v − Σ_j (D_j/‖w_j‖²) w_j. Conditional heads (w_i(y) = w_i + e_i[y]) solve the same
system for every class at once (O(C N² d)) and gather M[y].
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor


def _check_float(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    return t


def cascading_directions(weight: Tensor) -> Tensor:
    """The score directions M [..., N, d] of head vectors W [..., N, d]: D_i = ⟨v, m_i⟩ (batched over leading dims).

    m_i = P₁⋯P_{i−1} w_i, from the unit lower-triangular system (I + L) M = W, L_ij = ⟨w_i, w_j⟩/‖w_j‖² for j < i
    (0 where w_j = 0). Differentiable. float16/bfloat16 weights (and autocast regions) are solved in float32 and
    the directions returned in the weight's dtype: torch has no half-precision triangular solve, and the Gram's
    ratios need more than 8 bits of mantissa.
    """
    weight = _check_float(weight, "weight")
    if weight.ndim < 2 or weight.shape[-2] < 1 or weight.shape[-1] < 1:
        raise ValueError(f"weight must be [..., n_stages, in_features] with both >= 1, got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":  # shape inference: no autocast state to consult on meta
        return _directions(weight)
    if weight.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(weight.device.type):
        with torch.autocast(weight.device.type, enabled=False):
            return _directions(weight.float()).to(weight.dtype)
    return _directions(weight)


def _directions(weight: Tensor) -> Tensor:
    gram = weight @ weight.mT
    sq = torch.diagonal(gram, dim1=-2, dim2=-1)
    nonzero = sq > 0
    ratio = gram / torch.where(nonzero, sq, torch.ones_like(sq))[..., None, :]
    lower = torch.where(nonzero[..., None, :], ratio, torch.zeros_like(ratio)).tril(-1)
    return torch.linalg.solve_triangular(lower, weight, upper=False, unitriangular=True)


def _rejection(v: Tensor, scores: Tensor, heads: Tensor) -> Tensor:
    """v_{N+1} = v − Σ_j (D_j/‖w_j‖²) w_j for heads [N, d] or per-sample heads [B, N, d]; float16/bfloat16 in float32
    (‖w_j‖² overflows float16 from ‖w_j‖ ≈ 256 and turns subnormal below ≈ 2.5e-3), returned in v's dtype."""
    if heads.dtype in (torch.float16, torch.bfloat16):
        return _rejection(v.float(), scores.float(), heads.float()).to(v.dtype)
    sq = (heads * heads).sum(-1)
    coef = torch.where(sq > 0, scores / torch.where(sq > 0, sq, torch.ones_like(sq)), torch.zeros_like(scores))
    if heads.ndim == 2:
        return v - coef @ heads
    return v - torch.einsum("bn,bnd->bd", coef, heads)


def cascading_rejection(
    v: Tensor,
    weight: Tensor,
    *,
    labels: Optional[Tensor] = None,
    class_weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    return_rejection: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Stage scores D [B, N] of features v [B, d] under the cascade of heads weight [N, d] (+ bias [N]).

    Unconditional: D = v Mᵀ with M = cascading_directions(weight). Conditional (projection discriminator): pass
    labels [B] (integers in [0, C)) and class_weight [C, N, d]; sample b uses heads weight + class_weight[labels[b]].
    With return_rejection=True also returns the final rejection v_{N+1} [B, d] (bias excluded), orthogonal to the
    last head. Formula and paper: kexue_fast.gan.reference.
    """
    v = _check_float(v, "v")
    weight = _check_float(weight, "weight")
    if v.ndim != 2:
        raise ValueError(f"v must be [batch, in_features], got shape {tuple(v.shape)}")
    if weight.ndim != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be [n_stages >= 1, in_features], got shape {tuple(weight.shape)}")
    if weight.shape[1] != v.shape[1]:
        raise ValueError(f"weight has in_features = {weight.shape[1]} but v has {v.shape[1]} features")
    if weight.dtype != v.dtype or weight.device != v.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) and v ({v.dtype}, {v.device}) must match")
    n_stages = weight.shape[0]
    if bias is not None:
        bias = _check_float(bias, "bias")
        if bias.shape != (n_stages,):
            raise ValueError(f"bias must be [n_stages] = [{n_stages}], got shape {tuple(bias.shape)}")
        if bias.dtype != v.dtype or bias.device != v.device:
            raise ValueError(f"bias ({bias.dtype}, {bias.device}) must match v ({v.dtype}, {v.device})")
    if (labels is None) != (class_weight is None):
        raise ValueError("labels and class_weight go together: pass both (conditional) or neither (unconditional)")
    if class_weight is None:
        scores = v @ cascading_directions(weight).mT
        heads = weight
    else:
        class_weight = _check_float(class_weight, "class_weight")
        if class_weight.ndim != 3 or class_weight.shape[1:] != weight.shape:
            raise ValueError(f"class_weight must be [n_classes, n_stages, in_features] = [C, {n_stages}, "
                             f"{weight.shape[1]}], got shape {tuple(class_weight.shape)}")  # fmt: skip
        if class_weight.dtype != v.dtype or class_weight.device != v.device:
            raise ValueError(f"class_weight ({class_weight.dtype}, {class_weight.device}) must match v ({v.dtype}, "
                             f"{v.device})")  # fmt: skip
        labels = _check_labels(labels, v.shape[0], class_weight.shape[0], v.device)
        per_class = weight + class_weight
        directions = cascading_directions(per_class)[labels]
        scores = torch.einsum("bnd,bd->bn", directions, v)
        heads = per_class[labels]
    out = scores if bias is None else scores + bias
    if return_rejection:
        return out, _rejection(v, scores, heads)
    return out


def _functorch_wrapped(t: Tensor) -> bool:
    """Whether t is a torch.func transform's wrapper (vmap, grad): its values cannot be read on the host."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def _check_labels(labels: object, batch: int, n_classes: int, device: torch.device) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must be [batch] = [{batch}], got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on {device}, got {labels.device}")
    # An out-of-range index would be a device-side assert on CUDA: checked here (one host sync; skipped inside
    # torch.compile and torch.func transforms such as vmap, where a data-dependent branch cannot run, and on meta
    # tensors, which hold no values).
    if (
        batch
        and labels.device.type != "meta"
        and not torch.compiler.is_compiling()
        and not _functorch_wrapped(labels)
        and bool(((labels < 0) | (labels >= n_classes)).any())
    ):
        raise ValueError(f"labels must lie in [0, {n_classes}) (n_classes = {n_classes})")
    return labels.long()
