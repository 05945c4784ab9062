"""Pure-torch truth for Cascading Rejection: the stages run one after another, exactly as the paper writes them.

Cascading Rejection (Park & Kwon 2019, "A Simple yet Effective Way for Improving the Performance of GANs",
arXiv:1911.10979; kexue.fm post "级联抑制"). A discriminator's head scores its feature v by D(x) = ⟨v, w⟩, which ignores
the rejection of v from w. The cascade scores what is left, stage after stage:

    v₁ = v,   D_i = ⟨v_i, w_i⟩,   v_{i+1} = v_i − (⟨v_i, w_i⟩ / ‖w_i‖²) w_i,   i = 1..N,

so v_{i+1} ⟂ w_i. A stage with w_i = 0 rejects nothing (v_{i+1} = v_i) and scores 0. The conditional variant (a
projection discriminator, Miyato & Koyama 2018) uses per-sample head vectors w_i(y) = w_i + e_i[y].
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def cascading_rejection_sequential(v: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """(scores [B, N], final rejection v_{N+1} [B, d]) by N sequential rejections.

    v: [B, d] features; w: [N, d] head vectors shared by the batch, or [B, N, d] per sample.
    """
    scores = []
    vi = v
    for i in range(w.shape[-2]):
        wi = w[..., i, :]
        s = (vi * wi).sum(-1)
        sq = (wi * wi).sum(-1)
        coef = torch.where(sq > 0, s / torch.where(sq > 0, sq, torch.ones_like(sq)), torch.zeros_like(s))
        vi = vi - coef[..., None] * wi
        scores.append(s)
    return torch.stack(scores, -1), vi
