"""`map_equation` and `infomap`: the two-level map equation and its minimization (the C++ core, csrc/infomap)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from .. import _dispatch
from .flow import flow_model
from .graph import Graph, as_graph, is_tree, module_array, tree_array


class MapEquationResult(NamedTuple):
    """Codelengths in bits per step: codelength = index_codelength + module_codelength."""

    codelength: float
    index_codelength: float
    module_codelength: float


@dataclass
class InfomapResult:
    """The modules Infomap found.

    modules[i]: the top-level module (0-based, by decreasing flow) of node i, whose id is node_ids[i]; flow[i]: its
    visit rate. tree [n, depth]: node i's path of module indices from the top (each level ranked by decreasing flow),
    −1 below the module that holds it; a two-level result has depth 1 (tree[:, 0] == modules).
    codelength = index_codelength (the top codebook) + module_codelength (every other codebook)."""

    modules: np.ndarray
    codelength: float
    index_codelength: float
    module_codelength: float
    one_level_codelength: float
    num_modules: int
    flow: np.ndarray
    node_ids: List[Any] = field(repr=False)
    tree: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.tree is None:
            self.tree = self.modules[:, None].copy()

    @property
    def num_levels(self) -> int:
        """Levels of the tree, the leaf level included (as infomap counts: 2 for a two-level partition)."""
        return int(self.tree.shape[1]) + 1

    def paths(self) -> List[Tuple[int, ...]]:
        """Each node's module path from the top (0-based), e.g. (2, 0) for submodule 0 of top module 2."""
        return [tuple(int(m) for m in row if m >= 0) for row in self.tree]

    def modules_dict(self) -> Dict[Any, int]:
        """{node id: top-level module}."""
        return {v: int(m) for v, m in zip(self.node_ids, self.modules)}

    def modules_at(self, level: int) -> np.ndarray:
        """One label per node for the modules at `level` (1 = top); a node whose module ends above `level` keeps
        its deepest module. Labels are 0-based in tree order."""
        if not 1 <= level <= self.tree.shape[1]:
            raise ValueError(f"level must be in [1, {self.tree.shape[1]}], got {level}")
        # A path that ended above `level` is padded with −1, which keeps its deepest module distinct.
        _, labels = np.unique(self.tree[:, :level], axis=0, return_inverse=True)
        return labels.reshape(-1).astype(np.int64)

    def _ranked(self):
        """(path, rank among its module's nodes by decreasing flow, node index) for every node, in tree order."""
        keys = [self.flow * -1.0] + [self.tree[:, j] for j in reversed(range(self.tree.shape[1]))]
        order = np.lexsort([np.arange(len(self.flow)), *keys])
        rows, previous, r = [], None, 0
        for i in order:
            path = tuple(int(m) for m in self.tree[i] if m >= 0)
            r = r + 1 if path == previous else 0
            previous = path
            rows.append((path, r, int(i)))
        return rows

    def write_clu(self, path: Union[str, os.PathLike]) -> None:
        """infomap's .clu format: `node_id module flow` per line, the top-level modules 1-based."""
        with open(path, "w") as f:
            f.write(f"# codelength {self.codelength:.9f} bits\n# module level 1\n# node_id module flow\n")
            for p, _, i in self._ranked():
                f.write(f"{self.node_ids[i]} {p[0] + 1} {self.flow[i]:.10g}\n")

    def write_tree(self, path: Union[str, os.PathLike]) -> None:
        """infomap's .tree format: `path flow name node_id` per line, the path `m1:m2:…:rank` 1-based, nodes ranked
        by decreasing flow within their module."""
        with open(path, "w") as f:
            f.write(f"# codelength {self.codelength:.9f} bits\n# path flow name node_id\n")
            for p, rank, i in self._ranked():
                label = ":".join(str(m + 1) for m in (*p, rank))
                f.write(f'{label} {self.flow[i]:.10g} "{self.node_ids[i]}" {self.node_ids[i]}\n')


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
    """The exact codelength of a partition or a module tree, with infomap's flow model.

    Two-level (Rosvall & Bergstrom 2008), for a partition M:

        L(M) = plogp(Σ_m q_m↶) − Σ_m plogp(q_m↶) − Σ_m plogp(q_m↷) + Σ_m plogp(q_m↷ + p_m) − Σ_α plogp(p_α),

    plogp(x) = x log₂ x, p_α the node visit rates, p_m their sum over module m, q_m↶ / q_m↷ the link flow entering /
    leaving m (see kexue_fast.infomap.flow); index_codelength is the first two terms.

    Multilevel (Rosvall & Bergstrom 2011), for a module tree: the sum of every module's codebook. A module whose
    children are nodes codes them and its exit, plogp(q↷ + Σ_α p_α) − plogp(q↷) − Σ_α plogp(p_α); a module whose
    children are modules codes their entries and its exit, plogp(q↷ + Σ_c q_c↶) − plogp(q↷) − Σ_c plogp(q_c↶); the
    root exits nowhere (q↷ = 0) and its codebook is index_codelength.

    graph: (source, target[, weight]) arrays, a scipy.sparse matrix, a networkx or igraph graph, or a .net /
    link-list path (num_nodes: the node count for link arrays whose last nodes are isolated). modules: one label per
    node (in node order) or {node id: label}; or a tree: one path of module indices per node (tuples, top level
    first, e.g. `InfomapResult.paths()` or infomap's `node.path[:-1]`), an int array [n, depth] padded with −1
    (`InfomapResult.tree`), or {node id: path}. A module's children must be all nodes or all modules."""
    _core = _dispatch.require_core("the map equation and Infomap run on the C++ extension kexue_fast._core")

    g, (node, src, dst, link, teleport) = _flows(graph, directed, teleportation_probability, recorded_teleportation,
                                                 markov_time, num_nodes)  # fmt: skip
    if not isinstance(modules, (np.ndarray, dict, list, tuple)):
        if isinstance(modules, (str, bytes)) or not hasattr(modules, "__iter__"):
            raise TypeError(f"modules must be one label per node, {{node id: label}} or a module tree, got "
                            f"{type(modules).__name__}")  # fmt: skip
        modules = list(modules)  # a one-shot iterator: is_tree's look at the first entry would consume it
    if is_tree(modules):
        total, index = _core.infomap_tree_codelength(g.n, node, src, dst, link, tree_array(g, modules), teleport)
        return MapEquationResult(total, index, total - index)
    return MapEquationResult(*_core.infomap_map_equation(g.n, node, src, dst, link, module_array(g, modules),
                                                         teleport))  # fmt: skip


def _int_in(value: Any, name: str, low: int, high: int = 2**31 - 1) -> int:
    """An int (numpy integers too) in [low, high], else a ValueError naming the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return int(value)


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
    """Infomap: the partition (two_level=True) or module tree (two_level=False) of the nodes that minimizes the
    map equation (see `map_equation`).

    The C++ core moves nodes to the neighbouring module that lowers L most (in random order, ΔL from the modules'
    enter/exit flows), aggregates modules and repeats, and fine- and coarse-tunes. The hierarchical search follows
    infomap: the coarsest level first (a two-level partition, then super modules on the module graph while they
    shorten the index code), then each module is split recursively (the same search on its nodes, its exit flow in
    the new index codebook) while that codes it shorter, and last, modules whose children code shorter one level up
    are dissolved. The best of `num_trials` trials is kept (run in parallel on up to n_threads threads, default all
    cores; the GIL is released). Deterministic for a given seed."""
    _core = _dispatch.require_core("the map equation and Infomap run on the C++ extension kexue_fast._core")

    if not isinstance(two_level, (bool, np.bool_)):
        raise TypeError(f"two_level must be a bool, got {two_level!r}")
    num_trials = _int_in(num_trials, "num_trials", 1)
    seed = _int_in(seed, "seed", 0, 2**64 - 1)
    core_loop_limit = _int_in(core_loop_limit, "core_loop_limit", 1)
    tune_iteration_limit = _int_in(tune_iteration_limit, "tune_iteration_limit", 0, 2**30)  # the core doubles it
    n_threads = None if n_threads is None else _int_in(n_threads, "n_threads", 1)
    g, (node, src, dst, link, teleport) = _flows(graph, directed, teleportation_probability, recorded_teleportation,
                                                 markov_time, num_nodes)  # fmt: skip
    threads = n_threads if n_threads is not None else (os.cpu_count() or 1)
    options = dict(symmetric=not g.directed, num_trials=num_trials, seed=seed, core_loop_limit=core_loop_limit,
                   tune_iteration_limit=tune_iteration_limit, n_threads=threads, teleport=teleport)  # fmt: skip
    if two_level:
        modules, length, index, module, one_level, count, _ = _core.infomap_two_level(g.n, node, src, dst, link,
                                                                                       **options)  # fmt: skip
        return InfomapResult(modules, length, index, module, one_level, int(count), node, g.node_ids)
    paths, length, index, one_level, _ = _core.infomap_multilevel(g.n, node, src, dst, link, **options)
    tree = np.ascontiguousarray(paths.T)
    return InfomapResult(tree[:, 0].copy(), length, index, length - index, one_level, int(tree[:, 0].max()) + 1,
                         node, g.node_ids, tree)  # fmt: skip


__all__ = ["Graph", "InfomapResult", "MapEquationResult", "infomap", "map_equation"]
