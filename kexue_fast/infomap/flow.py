"""Flow models: the visit rates p_α of the nodes and the flows on the links, as infomap computes them.

Undirected: a walker at stationarity, p_α = s_α / Σ_β s_β with the strength s_α counting a self-loop once (as
infomap does), and flow w / Σ_β s_β on each direction of an edge. Directed (infomap's default): PageRank with
teleportation probability τ to the links (node α is a teleport target with probability ∝ its out-weight; dangling
nodes always teleport), iterated as infomap does (from the same start, at least 50 power steps until the L1 change is
≤ 1e-15; past infomap's cap of 200 steps while not converged: _pagerank). Teleportation is *unrecorded* by default:
the codelength counts only link steps, so the link flows are f_αβ = p_α w_αβ / w_α^out / (1 − Σ_dangling p), and the
node flows those of one more step along the links.

*Recorded* teleportation (infomap's --recorded-teleportation) codes the teleport steps too: the teleport targets are
∝ the in-weight (τ_α = w_α^in / Σ w), the node flows are the PageRank p_α itself, the link flows (1 − τ_tele)
p_α w_αβ / w_α^out, and each node teleports T_α = τ_tele p_α (all of p_α if dangling); a module m then exits by
teleportation T_m (1 − τ_m) and is entered by it (Σ T − T_m) τ_m (self-teleportation is not coded). Markov time t
scales every link flow by t.
"""

from __future__ import annotations

import numbers
import warnings
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


# Power steps past infomap's 200 while the L1 change is above 1e-15: with teleportation probability τ the error
# shrinks by at least (1 − τ) a step, so ~35/τ steps take any start to 1e-15; past the cap a RuntimeWarning says so.
_EXTRA_STEPS_PER_INVERSE_TAU = 50
_MAX_STEPS = 100_000


def _pagerank(g: Graph, out_weight: np.ndarray, step: np.ndarray, teleport: np.ndarray,
              teleportation_probability: float):  # fmt: skip
    """(p, α, β) as infomap 2 iterates: from the nodes' share of the link weight (out + in, a self-loop once), at
    least 50 power steps until the L1 change is ≤ 1e-15; α is nudged by 1e-12 when the change stalls (|change −
    previous| < 1e-17, previous starting at 0). infomap stops at 200 steps, converged or not, which on slowly mixing
    directed graphs with a small τ (≲ 0.05) leaves flows off their stationary values; here the steps go on to
    200 + 50/τ (at most 100000) until the change is within its rounding floor, 4nε/τ (1e-15 is out of reach there),
    and warn if that does not converge either."""
    n, src, dst, w = g.n, g.source, g.target, g.weight
    dangling = out_weight == 0
    loops = src == dst
    p = np.bincount(src, w, minlength=n) + np.bincount(dst[~loops], w[~loops], minlength=n)  # infomap's start
    p /= p.sum()
    alpha, beta = teleportation_probability, 1.0 - teleportation_probability
    cap = _MAX_STEPS if alpha == 0 else int(min(_MAX_STEPS, 200 + np.ceil(_EXTRA_STEPS_PER_INVERSE_TAU / alpha)))
    # past 200 steps, the change's rounding floor: each step's rounding (~ε per node) decays only as (1 − τ)
    tol = max(1e-15, 4 * n * np.finfo(np.float64).eps / max(alpha, 1e-3))
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
        if not (iterations < cap and (change > (1e-15 if iterations < 200 else tol) or iterations < 50)):
            break
    floor = 1e-15 if iterations <= 200 else tol
    if change > floor:
        message = (f"the PageRank flow did not converge in {iterations} power steps (L1 change {change:.2g} > "
                   f"{floor:.2g}; teleportation_probability={teleportation_probability}): a periodic or slowly "
                   "mixing directed graph; a larger teleportation_probability mixes faster")  # fmt: skip
        warnings.warn(message, RuntimeWarning, stacklevel=4)
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
    for name, value in (("teleportation_probability", teleportation_probability), ("markov_time", markov_time)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a real number, got {value!r}")
    if not 0 <= teleportation_probability < 1:
        raise ValueError(f"teleportation_probability must be in [0, 1), got {teleportation_probability}")
    if not (markov_time > 0 and np.isfinite(markov_time)):
        raise ValueError(f"markov_time must be a finite number > 0, got {markov_time}")
    if not isinstance(recorded_teleportation, (bool, np.bool_)):
        raise TypeError(f"recorded_teleportation must be a bool, got {recorded_teleportation!r}")
    teleportation_probability, markov_time = float(teleportation_probability), float(markov_time)
    if recorded_teleportation and not g.directed:
        raise ValueError("recorded_teleportation needs a directed graph (an undirected walk never teleports)")
    if recorded_teleportation:
        node, src, dst, link, teleport = recorded_directed_flow(g, teleportation_probability)
        flow = Flow(node, src, dst, link * markov_time, teleport)
    else:
        node, src, dst, link = directed_flow(g, teleportation_probability) if g.directed else undirected_flow(g)
        flow = Flow(node, src, dst, link * markov_time)
    # NaN flows reached the core (a crash); link flows near float64's top overflow its plogp terms (NaN codelengths)
    finite = np.all(np.isfinite(flow.node)) and np.all(np.isfinite(flow.link))
    if not finite or float(flow.link.sum()) > 2.0**960:
        raise ValueError(f"the flows overflow: markov_time = {markov_time:g} scales the link flows (their sum must "
                         "stay below 2**960 for the codelength's x·log₂x terms)")  # fmt: skip
    return flow
