"""The mini-batch JoSE trainer (torch, or the Triton kernels of kernels/jose.py on CUDA).

Per epoch, on the device: sub-sample the stream (keep ratio (sqrt(c/(s·T)) + 1)·(s·T)/c, as jose.c), draw a dynamic
window b ~ U{0..window−1} per kept word, form the (centre, context) pairs within a document at offsets ≤ window − b,
draw negatives from unigram^0.75 (excluding "</s>"; a negative equal to the centre word is dropped), shuffle, and
process batches of triples: each batch reads its rows at their batch-start values, adds every active hinge's
tangential step α c t (reference.py) into per-table deltas and retracts the touched rows. A row used by one triple of
a batch gets exactly the reference update. The learning rate decays linearly with the words processed, as in jose.c.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .reference import joint_factors, separate_factors
from .vocab import EncodedCorpus

CHUNK = 1 << 18  # centre words per pair-generation chunk (bounds memory)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


def _active(hinge_on: Tensor, ni: Tensor, centre: Optional[Tensor]) -> Tensor:
    """True where the hinge is active and the triple counts (its negative is not its centre word)."""
    if centre is not None:
        hinge_on = hinge_on & (ni != centre)[:, None]
    return hinge_on


def separate_step_torch(u, v, du, dv, ui, vi, ni, alpha, margin, rule, move_words=True, centre=None) -> Tensor:
    """The torch twin of kernels.jose.separate_step (adds the steps into du, dv; returns the hinges [B])."""
    uu, vv, nn = u[ui], v[vi], u[ni]
    f, h = _dot(uu, vv), _dot(nn, vv)
    act = _active((f - h) < margin, ni, centre).to(u.dtype)
    diff = uu - nn
    c_u, c_n, c_v = separate_factors(f, h, torch.linalg.vector_norm(diff, dim=-1, keepdim=True), rule)
    dv.index_put_((vi,), act * alpha * c_v * (diff - (f - h) * vv), accumulate=True)
    if move_words:
        du.index_put_((ui,), act * alpha * c_u * (vv - f * uu), accumulate=True)
        du.index_put_((ni,), act * alpha * c_n * (h * nn - vv), accumulate=True)
    return (act * (margin - (f - h))).squeeze(-1)


def joint_step_torch(u, v, d, du, dv, dd, ui, vi, di, ni, alpha, margin, rule, move_words=True,
                     centre=None) -> Tensor:  # fmt: skip
    """The torch twin of kernels.jose.joint_step."""
    uu, vv, dd_, nn = u[ui], v[vi], d[di], u[ni]
    f, g, h, k = _dot(uu, vv), _dot(uu, dd_), _dot(nn, vv), _dot(nn, dd_)
    gap = f + g - h - k
    act = _active(gap < margin, ni, centre).to(u.dtype)
    s = vv + dd_
    diff = uu - nn
    c_u, c_n, c_v, c_d = joint_factors(f, g, h, k, torch.linalg.vector_norm(s, dim=-1, keepdim=True),
                                       torch.linalg.vector_norm(diff, dim=-1, keepdim=True), rule)  # fmt: skip
    dd.index_put_((di,), act * alpha * c_d * (diff - (g - k) * dd_), accumulate=True)
    if move_words:
        du.index_put_((ui,), act * alpha * c_u * (s - (f + g) * uu), accumulate=True)
        du.index_put_((ni,), act * alpha * c_n * ((h + k) * nn - s), accumulate=True)
        dv.index_put_((vi,), act * alpha * c_v * (diff - (f - h) * vv), accumulate=True)
    return (act * (margin - gap)).squeeze(-1)


def retract_torch(x: Tensor, dx: Tensor, rows: Tensor, unique: bool = True) -> None:
    # repeated rows gather equal values before any write, so the scatter writes equal values: repeats are fine
    y = x[rows] + dx[rows]
    x[rows] = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    dx[rows] = 0


def _ops(use_triton: bool):
    if use_triton:
        from ..kernels import jose as K

        return K.separate_step, K.joint_step, K.retract
    return separate_step_torch, joint_step_torch, retract_torch


def _pairs(centres: Tensor, eff: Tensor, docs: Tensor, window: int) -> Tuple[Tensor, Tensor]:
    """(centre, context) indices into the kept sequence: same document, offset ≤ the centre's window."""
    n = docs.shape[0]
    cs, xs = [], []
    for o in range(1, window + 1):
        near = eff[centres] >= o
        for j in (centres - o, centres + o):
            ok = near & (j >= 0) & (j < n)
            jj = j.clamp(0, n - 1)
            ok &= docs[jj] == docs[centres]
            cs.append(centres[ok])
            xs.append(jj[ok])
    return torch.cat(cs), torch.cat(xs)


def train_batched(
    enc: EncodedCorpus, u_np: np.ndarray, v_np: np.ndarray, d_np: np.ndarray, *, window: int, negative: int,
    epochs: int, margin: float, alpha: float, sample: float, step_rule: str, joint: bool, update_words: bool,
    seed: int, device: torch.device, batch_size: int, use_triton: bool,
    progress: Optional[Callable[[int], None]] = None, decay: bool = True,
) -> float:  # fmt: skip
    """Train u, v, d (numpy float32, updated in place) on enc; returns the last epoch's hinge sum. decay=False keeps
    the learning rate at alpha (inference)."""
    sep_step, joint_step, retract = _ops(use_triton)
    u = torch.from_numpy(u_np).to(device)
    v = torch.from_numpy(v_np).to(device)
    d = torch.from_numpy(d_np).to(device)
    du, dv, dd = torch.zeros_like(u), torch.zeros_like(v), torch.zeros_like(d)
    gen = torch.Generator(device=device).manual_seed(seed)
    stream = torch.from_numpy(enc.stream.astype(np.int64)).to(device)
    counts = torch.from_numpy(enc.counts).to(device=device, dtype=torch.float64)
    train_words = float(enc.counts.sum())
    if sample > 0:
        st = sample * train_words
        keep_p = ((torch.sqrt(counts / st) + 1) * st / counts.clamp_min(1)).to(torch.float32)
    else:
        keep_p = torch.ones_like(counts, dtype=torch.float32)
    weights = counts.pow(0.75)
    weights[0] = 0
    cdf = torch.cumsum(weights, 0)
    cdf = (cdf / cdf[-1]).to(torch.float64)
    is_word = stream != 0
    doc_of = torch.cumsum((~is_word).to(torch.int64), 0) - (~is_word).to(torch.int64)
    total = epochs * stream.shape[0]
    done = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def draw(count: int) -> Tensor:
        r = torch.rand(count, generator=gen, device=device, dtype=torch.float64)
        return torch.searchsorted(cdf, r, right=True).clamp_max(cdf.shape[0] - 1)

    def run(kind: str, ui: Tensor, vi: Tensor, di: Tensor, centre_word: Tensor, lr: float) -> Tensor:
        ni = draw(ui.shape[0])  # a negative equal to the centre word is skipped inside the step (no host sync)
        # the touched rows are retracted as listed, repeats included: deduplicating would sort and sync per batch
        if kind == "context":
            loss = sep_step(u, v, du, dv, ui, vi, ni, lr, margin, step_rule, True, centre_word)
            retract(u, du, torch.cat([ui, ni]), unique=False)
            retract(v, dv, vi, unique=False)
        elif kind == "doc":
            loss = sep_step(u, d, du, dd, ui, di, ni, lr, margin, step_rule, update_words, centre_word)
            if update_words:
                retract(u, du, torch.cat([ui, ni]), unique=False)
            retract(d, dd, di, unique=False)
        else:
            loss = joint_step(u, v, d, du, dv, dd, ui, vi, di, ni, lr, margin, step_rule, update_words, centre_word)
            if update_words:
                retract(u, du, torch.cat([ui, ni]), unique=False)
                retract(v, dv, vi, unique=False)
            retract(d, dd, di, unique=False)
        return loss.sum(dtype=torch.float64)  # summed on the device: no host sync per batch

    for epoch in range(epochs):
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        r = torch.rand(stream.shape[0], generator=gen, device=device)
        kept = torch.nonzero(is_word & (r < keep_p[stream])).squeeze(1)
        seq, docs = stream[kept], doc_of[kept]
        eff = window - torch.randint(0, window, (seq.shape[0],), generator=gen, device=device)
        n_kept = seq.shape[0]
        for c0 in range(0, max(n_kept, 1), CHUNK):
            centres = torch.arange(c0, min(c0 + CHUNK, n_kept), device=device)
            span = stream.shape[0] * (centres.shape[0] / max(n_kept, 1))
            lr = alpha * max(1 - done / (total + 1), 1e-4) if decay else alpha
            jobs = []
            if joint or update_words:
                ci, xi = _pairs(centres, eff, docs, window)
                ci, xi = ci.repeat(negative), xi.repeat(negative)
                perm = torch.randperm(ci.shape[0], generator=gen, device=device)
                ci, xi = ci[perm], xi[perm]
                if joint:
                    jobs.append(("joint", seq[ci], seq[xi], docs[ci], seq[ci]))
                else:  # jose.c: the window word plays u, the centre word's context vector v
                    jobs.append(("context", seq[xi], seq[ci], docs[ci], seq[ci]))
            if not joint:
                cd = centres.repeat(negative)
                cd = cd[torch.randperm(cd.shape[0], generator=gen, device=device)]
                jobs.append(("doc", seq[cd], seq[cd], docs[cd], seq[cd]))
            for kind, ui, vi, di, cw in jobs:
                for b0 in range(0, ui.shape[0], batch_size):
                    sl = slice(b0, b0 + batch_size)
                    loss_sum += run(kind, ui[sl], vi[sl], di[sl], cw[sl], lr)
            done += int(span)
            if progress is not None:
                progress(min(done, total))
        done = (epoch + 1) * stream.shape[0]
    u_np[...] = u.cpu().numpy()
    v_np[...] = v.cpu().numpy()
    d_np[...] = d.cpu().numpy()
    return float(loss_sum)
