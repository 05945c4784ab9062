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
    half = weight.dtype in (torch.float16, torch.bfloat16)
    if half or torch.is_autocast_enabled(weight.device.type):  # float64 stays float64 under autocast
        with torch.autocast(weight.device.type, enabled=False):
            return _directions(weight.float()).to(weight.dtype) if half else _directions(weight)
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

    The tensors share one dtype, except under torch.autocast, where (as for nn.Linear) float32 / float16 / bfloat16
    operands may differ and the products run in the autocast dtype; the directions are still solved in float32 (or
    float64) from the weights as given. Labels out of range raise a ValueError (one host sync on a GPU); inside
    torch.compile an asynchronous assertion raises a RuntimeError when the graph runs instead.
    """
    v = _check_float(v, "v")
    weight = _check_float(weight, "weight")
    if v.ndim != 2:
        raise ValueError(f"v must be [batch, in_features], got shape {tuple(v.shape)}")
    if weight.ndim != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be [n_stages >= 1, in_features], got shape {tuple(weight.shape)}")
    if weight.shape[1] != v.shape[1]:
        raise ValueError(f"weight has in_features = {weight.shape[1]} but v has {v.shape[1]} features")
    autocast = _autocast_dtype(v)
    if not _compatible(weight, v, autocast):
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) and v ({v.dtype}, {v.device}) must match")
    n_stages = weight.shape[0]
    if bias is not None:
        bias = _check_float(bias, "bias")
        if bias.shape != (n_stages,):
            raise ValueError(f"bias must be [n_stages] = [{n_stages}], got shape {tuple(bias.shape)}")
        if not _compatible(bias, v, autocast):
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
        if not _compatible(class_weight, v, autocast):
            raise ValueError(f"class_weight ({class_weight.dtype}, {class_weight.device}) must match v ({v.dtype}, "
                             f"{v.device})")  # fmt: skip
        labels = _check_labels(labels, v.shape[0], class_weight.shape[0], v.device)
        heads, directions = conditional_directions(weight, class_weight, labels)
        scores = torch.einsum("bnd,bd->bn", directions, v)
    if autocast is not None:  # the products' dtype, as nn.Linear's output (the bias too)
        scores = scores.to(autocast)
    out = scores if bias is None else scores + bias.to(scores.dtype)
    if return_rejection:
        return out, _rejection(v, scores, heads)
    return out


def conditional_directions(weight: Tensor, class_weight: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-sample heads weight + class_weight[labels] and their directions [B, N, d]: solved per sample when the
    batch is smaller than the number of classes (O(B N² d)), else per class and gathered (O(C N² d)); one result."""
    if labels.shape[0] < class_weight.shape[0]:
        heads = weight + class_weight[labels]
        return heads, cascading_directions(heads)
    per_class = weight + class_weight
    return per_class[labels], cascading_directions(per_class)[labels]


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_dtype(v: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype of v's device while autocast is on there (and v is eligible), else None."""
    kind = v.device.type
    if kind == "meta" or v.dtype not in _AUTOCAST_ELIGIBLE or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _compatible(t: Tensor, v: Tensor, autocast: Optional[torch.dtype]) -> bool:
    """One device, and one dtype unless autocast casts both (float32 / float16 / bfloat16)."""
    if t.device != v.device:
        return False
    return t.dtype == v.dtype or (autocast is not None and t.dtype in _AUTOCAST_ELIGIBLE)


def _host_values(t: Tensor) -> Tensor:
    """t's values as a plain tensor: torch.func transforms (vmap, grad) wrap it, and the range check reads the whole
    batch of values under them."""
    functorch = getattr(torch._C, "_functorch", None)
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    while wrapped is not None and wrapped(t):
        t = functorch.get_unwrapped(t)
    return t


def _check_labels(labels: object, batch: Optional[int], n_classes: int, device: torch.device) -> Tensor:
    """labels as int64 [batch] (batch None: any [B]), checked: integer, on `device`, in [0, n_classes)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if batch is None:
        batch = labels.shape[0] if labels.ndim == 1 else -1
    if labels.shape != (batch,):
        expected = f"[batch] = [{batch}]" if batch >= 0 else "[batch] (one class index per sample)"
        raise ValueError(f"labels must be {expected}, got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on {device}, got {labels.device}")
    # An out-of-range index would wrap around (negative) or be a device-side assert on CUDA: checked here (one host
    # sync); inside torch.compile, where a data-dependent branch cannot run, by an asynchronous assertion in the graph;
    # under torch.func transforms (vmap) on the values they wrap; not on meta tensors, which hold no values.
    message = f"labels must lie in [0, {n_classes}) (n_classes = {n_classes})"
    if batch and labels.device.type != "meta":
        if torch.compiler.is_compiling():
            torch._assert_async(((labels >= 0) & (labels < n_classes)).all(), message)
        else:
            values = _host_values(labels)
            if bool(((values < 0) | (values >= n_classes)).any()):
                raise ValueError(message)
    return labels.long()
