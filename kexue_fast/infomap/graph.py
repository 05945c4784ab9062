"""Graph input for Infomap: link arrays, scipy.sparse matrices, networkx / igraph graphs, Pajek and link-list files —
all turned into one `Graph` of 0-based node indices with float64 weights and the caller's node ids."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np


@dataclass
class Graph:
    """n nodes 0..n−1; links source[e] → target[e] with weight[e] (an undirected edge listed once); node_ids[i] is
    the caller's id of node i."""

    n: int
    source: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    directed: bool
    node_ids: List[Any]


def _checked(n: int, source, target, weight, directed: bool, node_ids) -> Graph:
    source = np.asarray(source)
    target = np.asarray(target)
    if source.ndim != 1 or target.ndim != 1 or source.shape != target.shape:
        raise ValueError(f"source and target must be 1-D arrays of one length, got {source.shape} and {target.shape}")
    if source.size and (not np.issubdtype(source.dtype, np.integer) or not np.issubdtype(target.dtype, np.integer)):
        raise TypeError("source and target must hold integer node ids")
    if weight is None:
        weight = np.ones(source.shape[0])
    else:
        if np.iscomplexobj(weight):
            raise TypeError("link weights must be real numbers, got complex ones")
        try:
            weight = np.asarray(weight, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError("link weights must be real numbers") from None
    if weight.shape != source.shape:
        raise ValueError(f"weight must have one entry per link ({source.shape[0]}), got shape {weight.shape}")
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise ValueError("link weights must be finite and non-negative")
    if n < 1 or source.shape[0] == 0 or not np.any(weight > 0):
        raise ValueError("the graph is empty: it needs at least one link of positive weight")
    top = float(weight.max())
    if top > 2.0**500:  # their sums would overflow (1e308 each: inf, then NaN flows); a power of two scales exactly
        weight = weight * 2.0 ** -math.frexp(top)[1]
    source = source.astype(np.int64)
    target = target.astype(np.int64)
    if source.min() < 0 or target.min() < 0 or source.max() >= n or target.max() >= n:
        raise ValueError(f"node ids out of range: links must join nodes 0..{n - 1}")
    return Graph(int(n), source, target, weight, bool(directed), list(node_ids) if node_ids is not None else
                 list(range(n)))  # fmt: skip


def _from_links(source, target, weight, directed: Optional[bool], num_nodes: Optional[int]) -> Graph:
    source = np.asarray(source)
    target = np.asarray(target)
    if source.size and np.issubdtype(source.dtype, np.integer) and np.issubdtype(target.dtype, np.integer):
        if source.size and min(source.min(), target.min()) < 0:
            raise ValueError("node ids out of range: they must be >= 0")
        n = int(max(source.max(), target.max())) + 1 if source.size else 0
        distinct = np.unique(np.concatenate([source, target])).size if num_nodes is None and n > 1_000_000 else n
        if n > 10 * distinct + 1_000_000:  # 10**12 once went on to a MemoryError
            raise ValueError(f"integer node ids are node indices: ids up to {n - 1} make {n} nodes for {distinct} "
                             "linked ones; relabel them (np.unique(..., return_inverse=True)), pass them as strings, "
                             "or pass num_nodes to confirm the node count")  # fmt: skip
        if num_nodes is not None:
            if num_nodes < n:
                raise ValueError(f"node ids out of range: num_nodes={num_nodes} but a link names node {n - 1}")
            n = num_nodes
        return _checked(n, source, target, weight, bool(directed), None)
    if source.size == 0:
        raise ValueError("the graph is empty: it needs at least one link of positive weight")
    if num_nodes is not None:
        raise ValueError("num_nodes is for integer node ids (node indices); these ids name their nodes themselves")
    return _relabelled(source, target, weight, directed)


def _relabelled(source, target, weight, directed: Optional[bool]) -> Graph:
    """Arbitrary (sortable) node ids as nodes 0..n−1 in sorted id order, the ids kept as node_ids."""
    ids, inverse = np.unique(np.concatenate([source, target]), return_inverse=True)
    m = source.shape[0]
    return _checked(len(ids), inverse[:m], inverse[m:], weight, bool(directed), ids.tolist())


def _read_pajek(path: str, directed: Optional[bool]):
    ids: List[Any] = []
    source, target, weight = [], [], []
    section = None
    arcs = False
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("%") or line.startswith("#"):
                continue
            if line.startswith("*"):
                head = line.split()[0].lower()
                section = head
                if head == "*vertices":
                    ids = list(range(1, int(line.split()[1]) + 1))
                arcs = arcs or head in ("*arcs", "*arcslist")
                continue
            parts = line.split()
            if section in ("*arcslist", "*edgeslist"):  # adjacency lists: "source t1 t2 ...", weight 1 each
                for t in parts[1:]:
                    source.append(int(parts[0]))
                    target.append(int(t))
                    weight.append(1.0)
            elif section in ("*edges", "*arcs", "*links"):
                source.append(int(parts[0]))
                target.append(int(parts[1]))
                weight.append(float(parts[2]) if len(parts) > 2 else 1.0)
    if directed is None:
        directed = arcs
    n = len(ids) if ids else max(max(source), max(target))
    src = np.asarray(source, dtype=np.int64) - 1
    dst = np.asarray(target, dtype=np.int64) - 1
    return _checked(n, src, dst, np.asarray(weight), directed, ids or list(range(1, n + 1)))


def _read_link_list(path: str, directed: Optional[bool]):
    source, target, weight = [], [], []
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#") or line.startswith("%"):
                continue
            parts = line.split()
            source.append(int(parts[0]))
            target.append(int(parts[1]))
            weight.append(float(parts[2]) if len(parts) > 2 else 1.0)
    if not source:
        raise ValueError(f"the graph is empty: {path} holds no links")
    # the ids name nodes, as in infomap (whose link lists are often 1-based): no node for an id that no link names
    return _relabelled(np.asarray(source, dtype=np.int64), np.asarray(target, dtype=np.int64), weight, directed)


def _weight(value: Any, edge) -> float:
    """An edge attribute's weight as a float (ValueError naming the edge for None, strings and the like)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"edge {tuple(edge)} has weight {value!r}: weights must be numbers")
    return float(value)


def as_graph(graph: Any, directed: Optional[bool] = None, num_nodes: Optional[int] = None) -> Graph:
    """Any supported input as a Graph. directed=None: from the input (networkx/igraph say; a sparse matrix is directed
    unless symmetric; Pajek *Arcs are directed; links and link lists default to undirected). Integer ids in link
    arrays are node indices (nodes 0..max id, num_nodes for isolated last ones); ids in a link-list file, and any ids
    that are not integers, name their nodes (node_ids, in sorted order), as infomap reads them."""
    if directed is not None and not isinstance(directed, (bool, np.bool_)):
        raise TypeError(f"directed must be None or a bool, got {directed!r}")
    if num_nodes is not None:
        if isinstance(num_nodes, (bool, np.bool_)) or not isinstance(num_nodes, (int, np.integer)) or num_nodes < 1:
            raise ValueError(f"num_nodes must be None or an int >= 1, got {num_nodes!r}")
        if not isinstance(graph, tuple):
            raise ValueError("num_nodes is for (source, target[, weight]) link arrays of integer node ids; "
                             f"a {type(graph).__name__} gives its node count itself")  # fmt: skip
        num_nodes = int(num_nodes)
    if isinstance(graph, Graph):  # checked as any other input (a hand-made Graph reached the C++ core unchecked)
        if graph.node_ids is not None and len(graph.node_ids) != graph.n:
            raise ValueError(f"Graph.node_ids must name its n = {graph.n} nodes, got {len(graph.node_ids)}")
        return _checked(graph.n, graph.source, graph.target, graph.weight, graph.directed, graph.node_ids)
    if isinstance(graph, (str, os.PathLike)):
        path = os.fspath(graph)
        if not os.path.exists(path):
            raise ValueError(f"no such graph file: {path}")
        return _read_pajek(path, directed) if path.endswith(".net") else _read_link_list(path, directed)
    if isinstance(graph, tuple) and len(graph) in (2, 3):
        return _from_links(graph[0], graph[1], graph[2] if len(graph) == 3 else None, bool(directed), num_nodes)
    module = type(graph).__module__
    if module.startswith("scipy.sparse"):
        a = graph.tocoo(copy=True)
        if a.shape[0] != a.shape[1]:
            raise ValueError(f"an adjacency matrix must be square, got shape {a.shape}")
        if directed is None:
            directed = (abs(graph - graph.T) > 0).nnz != 0
        a.sum_duplicates()
        rows, cols, vals = a.row, a.col, a.data
        if not directed:  # each undirected edge once: the upper entry, or the lower one where no upper entry is stored
            n, r64, c64 = a.shape[0], rows.astype(np.int64), cols.astype(np.int64)
            upper = rows <= cols
            mirrored = np.isin(c64 * n + r64, r64[upper] * n + c64[upper])
            keep = upper | ~mirrored
            lower = ~upper & mirrored  # stored twice: both entries must agree (else the lower weight was dropped)
            if lower.any():
                order = np.argsort(r64[upper] * n + c64[upper])
                keys = (r64[upper] * n + c64[upper])[order]
                partner = vals[upper][order][np.searchsorted(keys, c64[lower] * n + r64[lower])]
                if not np.array_equal(partner, vals[lower]):
                    raise ValueError("directed=False with an asymmetric adjacency matrix: A[i, j] != A[j, i] for some "
                                     "edges; symmetrize it as meant (A + A.T, A.maximum(A.T), or one triangle) or "
                                     "pass directed=True")  # fmt: skip
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        return _checked(a.shape[0], rows, cols, vals, directed, None)
    if module.startswith("networkx"):
        nodes = list(graph.nodes())
        index = {v: i for i, v in enumerate(nodes)}
        edges = list(graph.edges(data="weight", default=1.0))
        src = np.array([index[u] for u, _, _ in edges], dtype=np.int64)
        dst = np.array([index[v] for _, v, _ in edges], dtype=np.int64)
        w = np.array([_weight(d, (u, v)) for u, v, d in edges])
        return _checked(len(nodes), src, dst, w, graph.is_directed() if directed is None else directed, nodes)
    if module.startswith("igraph"):
        edges = np.asarray(graph.get_edgelist(), dtype=np.int64).reshape(-1, 2)
        w = graph.es["weight"] if "weight" in graph.es.attributes() else None
        if w is not None:
            w = [_weight(d, e) for d, e in zip(w, edges.tolist())]
        names = graph.vs["name"] if "name" in graph.vs.attributes() else None
        return _checked(graph.vcount(), edges[:, 0], edges[:, 1], w,
                        graph.is_directed() if directed is None else directed, names)  # fmt: skip
    raise TypeError("graph must be (source, target[, weight]) arrays, a scipy.sparse matrix, a networkx or igraph "
                    f"graph, or a path to a .net / link-list file; got {type(graph).__name__}")  # fmt: skip


def module_array(graph: Graph, modules: Any) -> np.ndarray:
    """A partition given per node index (sequence of length n) or as {node id: module} as a 0-based int64 array."""
    if isinstance(modules, dict):
        try:
            labels = [modules[v] for v in graph.node_ids]
        except KeyError as e:
            raise ValueError(f"modules has no entry for node {e.args[0]!r}") from None
    else:
        labels = list(modules) if not isinstance(modules, np.ndarray) else modules
        if len(labels) != graph.n:
            raise ValueError(f"modules must give one module per node ({graph.n}), got {len(labels)}")
    try:
        _, inverse = np.unique(np.asarray(labels), return_inverse=True)
    except TypeError:
        raise TypeError("modules' labels must be comparable values of one kind (ints or strings, say)") from None
    return inverse.astype(np.int64)


def is_tree(modules: Any) -> bool:
    """True when `modules` gives each node a path of modules (a 2-D array, or per-node tuples/lists) rather than
    one label."""
    if isinstance(modules, np.ndarray):
        return modules.ndim == 2
    values = modules.values() if isinstance(modules, dict) else modules
    first = next(iter(values), None)
    return isinstance(first, (tuple, list, np.ndarray))


def tree_array(graph: Graph, tree: Any) -> np.ndarray:
    """A module tree as int64 paths [depth, n] (−1 below each node's module), from an array [n, depth] padded with
    −1, per-node sequences of module indices from the top (tuples of any length ≥ 1), or {node id: path}."""
    if isinstance(tree, dict):
        try:
            rows = [tree[v] for v in graph.node_ids]
        except KeyError as e:
            raise ValueError(f"tree has no entry for node {e.args[0]!r}") from None
    elif isinstance(tree, np.ndarray):
        if tree.ndim != 2 or tree.shape[0] != graph.n:
            raise ValueError(f"a tree array must have shape [n, depth] with n = {graph.n}, got {tuple(tree.shape)}")
        if not np.issubdtype(tree.dtype, np.integer):
            raise TypeError(f"a tree array must hold integers, got {tree.dtype}")
        return np.ascontiguousarray(tree.T, dtype=np.int64)
    else:
        rows = list(tree)
    if len(rows) != graph.n:
        raise ValueError(f"tree must give one path per node ({graph.n}), got {len(rows)}")
    depth = max((len(r) for r in rows), default=0)
    if depth == 0 or any(len(r) == 0 for r in rows):
        raise ValueError("every node's path needs at least one module")
    out = np.full((depth, graph.n), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        path = np.asarray(r)
        if not np.issubdtype(path.dtype, np.integer) or (path < 0).any():
            raise ValueError(f"node {graph.node_ids[i]!r}: a path holds non-negative integers, got {tuple(r)!r}")
        out[: len(path), i] = path
    return out
