"""Flow models: the visit rates p_α of the nodes and the flows on the links, as infomap computes them.

Undirected: a walker at stationarity, p_α = s_α / Σ_β s_β with the strength s_α counting a self-loop once (as
infomap does), and flow w / Σ_β s_β on each direction of an edge. Directed (infomap's default): PageRank with
teleportation probability τ to the links (node α is a teleport target with probability ∝ its out-weight; dangling
nodes always teleport), iterated as infomap does (at least 50 and at most 200 power steps, until the L1 change is
≤ 1e-15). Teleportation is *unrecorded* by default: the codelength counts only link steps, so the link flows are
f_αβ = p_α w_αβ / w_α^out / (1 − Σ_dangling p), and the node flows those of one more step along the links.

*Recorded* teleportation (infomap's --recorded-teleportation) codes the teleport steps too: the teleport targets are
∝ the in-weight (τ_α = w_α^in / Σ w), the node flows are the PageRank p_α itself, the link flows (1 − τ_tele)
p_α w_αβ / w_α^out, and each node teleports T_α = τ_tele p_α (all of p_α if dangling); a module m then exits by
teleportation T_m (1 − τ_m) and is entered by it (Σ T − T_m) τ_m (self-teleportation is not coded). Markov time t
scales every link flow by t.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from .graph import Graph


def undirected_flow(g: Graph) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    w = g.weight
    loops = g.source == g.target
    strength = (np.bincount(g.source, w, minlength=g.n) + np.bincount(g.target, w, minlength=g.n)
                - np.bincount(g.source[loops], w[loops], minlength=g.n))  # fmt: skip
    total = strength.sum()
    node_flow = strength / total
    link = w / total
    return (node_flow, np.concatenate([g.source, g.target]), np.concatenate([g.target, g.source]),
            np.concatenate([link, link]))  # fmt: skip


def _out_steps(g: Graph) -> Tuple[np.ndarray, np.ndarray]:
    """(out-weight [n], w_αβ / w_α^out per link): 0 on links whose source has no positive out-weight (its zero-weight
    links carry nothing; the node is dangling)."""
    out_weight = np.bincount(g.source, g.weight, minlength=g.n)
    denominator = out_weight[g.source]
    step = np.divide(g.weight, denominator, out=np.zeros_like(g.weight), where=denominator > 0)
    return out_weight, step


def _pagerank(g: Graph, out_weight: np.ndarray, step: np.ndarray, teleport: np.ndarray,
              teleportation_probability: float):  # fmt: skip
    """(p, α, β) as infomap 2 iterates: at least 50 and at most 200 power steps, until the L1 change is ≤ 1e-15; α is
    nudged by 1e-12 when the change stalls (|change − previous| < 1e-17, previous starting at 0)."""
    n, src, dst = g.n, g.source, g.target
    dangling = out_weight == 0
    p = np.full(n, 1.0 / n)
    alpha, beta = teleportation_probability, 1.0 - teleportation_probability
    iterations, change = 0, 0.0
    while True:
        dangling_rank = p[dangling].sum()
        nxt = (alpha + beta * dangling_rank) * teleport + beta * np.bincount(dst, step * p[src], minlength=n)
        nxt /= nxt.sum()
        previous, change = change, np.abs(nxt - p).sum()
        p = nxt
        if abs(change - previous) < 1e-17:
            alpha += 1e-12
            beta = 1.0 - alpha
        iterations += 1
        if not (iterations < 200 and (change > 1e-15 or iterations < 50)):
            break
    return p, alpha, beta


def directed_flow(g: Graph, teleportation_probability: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n, src, dst = g.n, g.source, g.target
    out_weight, step = _out_steps(g)
    teleport = out_weight / out_weight.sum()  # to links: ∝ the out-weight of the source node
    p, _, _ = _pagerank(g, out_weight, step, teleport, teleportation_probability)
    sum_rank = 1.0 - p[out_weight == 0].sum()
    link = step * p[src] / sum_rank
    node = np.bincount(dst, step * p[src], minlength=n)
    return node / node.sum(), src, dst, link


def recorded_directed_flow(g: Graph, teleportation_probability: float):
    """(node_flow, source, target, link_flow, teleport [2, n] = (T_α, τ_α)) for recorded teleportation."""
    n, src, dst, w = g.n, g.source, g.target, g.weight
    out_weight, step = _out_steps(g)
    tau = np.bincount(dst, w, minlength=n) / w.sum()  # to links, recorded: ∝ the in-weight of the target node
    p, _, beta = _pagerank(g, out_weight, step, tau, teleportation_probability)
    dangling = out_weight == 0
    link = beta * p[src] * step  # the nudged β, as infomap; the teleport flow with the given probability
    return p, src, dst, link, np.stack([np.where(dangling, p, teleportation_probability * p), tau])


class Flow(NamedTuple):
    """Node visit rates [n], links (source, target) with their flows (undirected edges listed in both directions),
    and for recorded teleportation the per-node teleport flow and weight [2, n] (else None)."""

    node: np.ndarray
    source: np.ndarray
    target: np.ndarray
    link: np.ndarray
    teleport: Optional[np.ndarray] = None


def flow_model(g: Graph, teleportation_probability: float = 0.15, recorded_teleportation: bool = False,
               markov_time: float = 1.0) -> Flow:  # fmt: skip
    """The flows infomap codes (see the module docstring)."""
    if not 0 <= teleportation_probability < 1:
        raise ValueError(f"teleportation_probability must be in [0, 1), got {teleportation_probability}")
    if not (markov_time > 0 and np.isfinite(markov_time)):
        raise ValueError(f"markov_time must be a finite number > 0, got {markov_time}")
    if recorded_teleportation and not g.directed:
        raise ValueError("recorded_teleportation needs a directed graph (an undirected walk never teleports)")
    if recorded_teleportation:
        node, src, dst, link, teleport = recorded_directed_flow(g, teleportation_probability)
        return Flow(node, src, dst, link * markov_time, teleport)
    node, src, dst, link = directed_flow(g, teleportation_probability) if g.directed else undirected_flow(g)
    return Flow(node, src, dst, link * markov_time)
