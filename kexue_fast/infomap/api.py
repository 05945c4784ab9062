"""`map_equation` and `infomap`: the two-level map equation and its minimization (the C++ core, csrc/infomap)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Union

import numpy as np

from .flow import flow_model
from .graph import Graph, as_graph, module_array


class MapEquationResult(NamedTuple):
    """Codelengths in bits per step: codelength = index_codelength + module_codelength."""

    codelength: float
    index_codelength: float
    module_codelength: float


@dataclass
class InfomapResult:
    """modules[i]: the module (0-based, by decreasing flow) of node i, whose id is node_ids[i]; flow[i]: its visit
    rate."""

    modules: np.ndarray
    codelength: float
    index_codelength: float
    module_codelength: float
    one_level_codelength: float
    num_modules: int
    flow: np.ndarray
    node_ids: List[Any] = field(repr=False)

    def modules_dict(self) -> Dict[Any, int]:
        """{node id: module}."""
        return {v: int(m) for v, m in zip(self.node_ids, self.modules)}

    def _ranked(self):
        """(module, rank in module by decreasing flow, node index) for every node, in tree order."""
        order = np.lexsort((np.arange(len(self.modules)), -self.flow, self.modules))
        rank = np.zeros(len(order), dtype=np.int64)
        previous, r = -1, 0
        for i in order:
            r = r + 1 if self.modules[i] == previous else 0
            previous = self.modules[i]
            rank[i] = r
        return [(int(self.modules[i]), int(rank[i]), int(i)) for i in order]

    def write_clu(self, path: Union[str, os.PathLike]) -> None:
        """infomap's .clu format: `node_id module flow` per line, modules 1-based."""
        with open(path, "w") as f:
            f.write(f"# codelength {self.codelength:.9f} bits\n# module level 1\n# node_id module flow\n")
            for module, _, i in self._ranked():
                f.write(f"{self.node_ids[i]} {module + 1} {self.flow[i]:.10g}\n")

    def write_tree(self, path: Union[str, os.PathLike]) -> None:
        """infomap's .tree format: `path flow name node_id` per line, the path `module:rank` 1-based, nodes ranked
        by decreasing flow within their module."""
        with open(path, "w") as f:
            f.write(f"# codelength {self.codelength:.9f} bits\n# path flow name node_id\n")
            for module, rank, i in self._ranked():
                f.write(f'{module + 1}:{rank + 1} {self.flow[i]:.10g} "{self.node_ids[i]}" {self.node_ids[i]}\n')


def _flows(graph: Any, directed: Optional[bool], teleportation_probability: float, recorded_teleportation: bool,
           markov_time: float, num_nodes: Optional[int]):  # fmt: skip
    g = as_graph(graph, directed, num_nodes)
    return g, flow_model(g, teleportation_probability, recorded_teleportation, markov_time)


def map_equation(
    graph: Any,
    modules: Any,
    *,
    directed: Optional[bool] = None,
    teleportation_probability: float = 0.15,
    recorded_teleportation: bool = False,
    markov_time: float = 1.0,
    num_nodes: Optional[int] = None,
) -> MapEquationResult:
    """The exact two-level codelength L(M) of a partition (Rosvall & Bergstrom 2008), with infomap's flow model:

        L(M) = plogp(Σ_m q_m↶) − Σ_m plogp(q_m↶) − Σ_m plogp(q_m↷) + Σ_m plogp(q_m↷ + p_m) − Σ_α plogp(p_α),

    plogp(x) = x log₂ x, p_α the node visit rates, p_m their sum over module m, q_m↶ / q_m↷ the link flow entering /
    leaving m (see kexue_fast.infomap.flow). graph: (source, target[, weight]) arrays, a scipy.sparse matrix, a
    networkx or igraph graph, or a .net / link-list path (num_nodes: the node count for link arrays whose last nodes
    are isolated); modules: one label per node (in node order) or a dict {node id: label}."""
    from .. import _core

    g, (node, src, dst, link) = _flows(graph, directed, teleportation_probability, recorded_teleportation,
                                       markov_time, num_nodes)  # fmt: skip
    return MapEquationResult(*_core.infomap_map_equation(g.n, node, src, dst, link, module_array(g, modules)))


def infomap(
    graph: Any,
    *,
    directed: Optional[bool] = None,
    teleportation_probability: float = 0.15,
    recorded_teleportation: bool = False,
    num_trials: int = 1,
    two_level: bool = True,
    seed: int = 123,
    markov_time: float = 1.0,
    core_loop_limit: int = 10,
    tune_iteration_limit: int = 10,
    n_threads: Optional[int] = None,
    num_nodes: Optional[int] = None,
) -> InfomapResult:
    """Two-level Infomap: the partition of the nodes that minimizes the map equation (see `map_equation`).

    The C++ core moves nodes to the neighbouring module that lowers L most (in random order, ΔL from the modules'
    enter/exit flows), aggregates modules and repeats, fine-tunes, and keeps the best of `num_trials` trials (run in
    parallel on up to n_threads threads, default all cores; the GIL is released). Deterministic for a given seed."""
    from .. import _core

    if isinstance(num_trials, bool) or not isinstance(num_trials, int) or num_trials < 1:
        raise ValueError(f"num_trials must be a positive int, got {num_trials!r}")
    if not two_level:
        raise NotImplementedError("the hierarchical (multilevel) Infomap is not implemented yet; use two_level=True")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    g, (node, src, dst, link) = _flows(graph, directed, teleportation_probability, recorded_teleportation,
                                       markov_time, num_nodes)  # fmt: skip
    threads = n_threads if n_threads is not None else (os.cpu_count() or 1)
    modules, length, index, module, one_level, count, _ = _core.infomap_two_level(
        g.n, node, src, dst, link, symmetric=not g.directed, num_trials=num_trials, seed=seed,
        core_loop_limit=core_loop_limit, tune_iteration_limit=tune_iteration_limit, n_threads=threads,
    )  # fmt: skip
    return InfomapResult(modules, length, index, module, one_level, int(count), node, g.node_ids)


__all__ = ["Graph", "InfomapResult", "MapEquationResult", "infomap", "map_equation"]
