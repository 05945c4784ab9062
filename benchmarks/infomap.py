"""Infomap: kexue_fast vs the official infomap (2.16) and igraph's community_infomap on the same graphs.

Two-level: LFR benchmark graphs from networkx (tau1 = 3, tau2 = 1.5, average degree 18, min community 20, seed 42)
at n = 10⁴ and 10⁵, and in full mode a planted-partition graph at n = 10⁶ (1,000 communities, average degree 18, 30%
of the links between communities; numpy, seed 0). Hierarchical (multilevel; igraph has none): the LFR graphs at
n = 10⁴, and nested planted partitions (`nested_planted`, a planted three-level hierarchy) at n = 2·10⁴ and, in full
mode, 2·10⁵. Each graph is generated once and saved; each (contestant, graph) runs in its own process,
single-threaded, one trial with seed 123, so its time and peak RSS are its own. Every partition's or tree's
codelength is recomputed by kexue_fast.map_equation (the same formula infomap reports, to 1e-9) for a fair
comparison; NMI is against the planted partition (the bottom level of a tree against the planted bottom groups).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .common import metadata, run_script, write_results

_SCRIPT = r"""
import json, sys, time
import numpy as np
which, path, two_level = sys.argv[1], sys.argv[2], sys.argv[4] == "two-level"
if which == "infomap":  # imports before the memory window: kexue_fast brings torch (hundreds of MB)
    import infomap
elif which == "igraph":
    import igraph
else:
    import kexue_fast
data = np.load(path)
src, dst, n = data["source"], data["target"], int(data["n"])


def rss_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS, after loading the links
    f.write("5")
before = rss_mb("VmRSS")  # from here each contestant's own graph structures count
if which == "infomap":
    im = infomap.Infomap(f"{'--two-level ' if two_level else ''}--silent --num-trials 1 --seed 123")
    im.add_links(zip(src.tolist(), dst.tolist()))
    for v in range(n):
        im.add_node(v)
elif which == "igraph":
    g = igraph.Graph(n=n, edges=np.stack([src, dst], 1).tolist())
start = time.perf_counter()
if which == "infomap":
    im.run()
    paths = {node.node_id: node.path[:-1] for node in im.tree if node.is_leaf}
    depth = max(len(p) for p in paths.values())
    modules = np.full((n, depth), -1, dtype=np.int64)  # the tree: each node's module path, −1 padded
    for v, p in paths.items():
        modules[v, : len(p)] = p
    if two_level:
        modules = modules[:, 0]
elif which == "igraph":
    modules = np.asarray(g.community_infomap(trials=1).membership)
else:
    r = kexue_fast.infomap((src, dst), num_trials=1, seed=123, n_threads=1, num_nodes=n, two_level=two_level)
    modules = r.modules if two_level else r.tree
seconds = time.perf_counter() - start
rss = rss_mb("VmHWM") - before
np.save(sys.argv[3], modules)
print(json.dumps({"seconds": seconds, "rss_mb": rss}))
"""

CONTESTANTS = ("kexue_fast", "infomap", "igraph")
MULTILEVEL_CONTESTANTS = ("kexue_fast", "infomap")


def lfr_graph(n: int, mu: float, seed: int = 42):
    import networkx as nx

    g = nx.LFR_benchmark_graph(n, 3, 1.5, mu, average_degree=18, min_community=20, max_degree=100,
                               max_community=max(200, n // 100), seed=seed)  # fmt: skip
    planted = np.array([min(g.nodes[v]["community"]) for v in range(n)])
    src, dst = np.array(g.edges(), dtype=np.int64).T
    return src, dst, planted


def planted_partition(n: int, communities: int = 1000, degree: float = 18.0, mixing: float = 0.3, seed: int = 0):
    """Equal communities; each node draws ~degree/2 link ends, a fraction `mixing` anywhere, the rest inside."""
    rng = np.random.default_rng(seed)
    planted = np.arange(n) % communities
    m = int(n * degree / 2)
    src = rng.integers(0, n, m)
    inside = rng.random(m) >= mixing
    dst = np.where(inside, planted[src] + communities * rng.integers(0, n // communities, m), rng.integers(0, n, m))
    keep = src != dst
    return src[keep].astype(np.int64), dst[keep].astype(np.int64), planted


def nested_planted(branch=(10, 10, 10), leaf: int = 20, degrees=(0.5, 1.5, 4, 12), directed: bool = False,
                   seed: int = 0):  # fmt: skip
    """A planted hierarchy: prod(branch) bottom groups of `leaf` nodes, nested in groups of groups (branch[0] at the
    top); degrees[d]: expected links per node to a random node sharing its group at depth d (d = 0: any node).
    Returns (source, target, planted bottom group)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(branch)) * leaf
    sizes = [n] + [n // int(np.prod(branch[: d + 1])) for d in range(len(branch))]
    src, dst = [], []
    for size, k in zip(sizes, degrees):
        u = rng.integers(0, n, int(n * k / (1 if directed else 2)))
        v = (u // size) * size + rng.integers(0, size, len(u))
        src.append(u[u != v])
        dst.append(v[u != v])
    return np.concatenate(src), np.concatenate(dst), np.arange(n) // leaf


def measure(which: str, graph_file: Path, out_file: Path, two_level: bool = True,
            timeout: float = 1800) -> Optional[Dict[str, float]]:  # fmt: skip
    mode = "two-level" if two_level else "multilevel"
    return run_script(_SCRIPT, [which, str(graph_file), str(out_file), mode], f"infomap/{which}", timeout)


DEVICES = ("cpu",)  # the C++ core against infomap and igraph: no GPU path to time


def run(out_dir: Path, quick: bool = True, device: str = "cpu") -> Path:
    from sklearn.metrics import normalized_mutual_info_score as nmi

    import kexue_fast

    cases = [("LFR", 10_000, mu, True) for mu in (0.1, 0.3, 0.5)]
    if not quick:
        cases += [("LFR", 100_000, mu, True) for mu in (0.1, 0.3, 0.5)] + [("planted", 1_000_000, 0.3, True)]
    cases += [("LFR", 10_000, mu, False) for mu in (0.1, 0.3, 0.5)] + [("nested", 20_000, None, False)]
    if not quick:
        cases += [("nested", 200_000, None, False)]
    rows: List[list] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, n, mu, two_level in cases:
            if kind == "LFR":
                src, dst, planted = lfr_graph(n, mu)
            elif kind == "planted":
                src, dst, planted = planted_partition(n, mixing=mu)
            else:
                src, dst, planted = nested_planted(branch=(10, 10, n // 2000))
            graph_file = Path(tmp) / "graph.npz"
            np.savez(graph_file, source=src, target=dst, n=n)
            results = {}
            for which in CONTESTANTS if two_level else MULTILEVEL_CONTESTANTS:
                r = measure(which, graph_file, Path(tmp) / f"{which}.npy", two_level)
                if r is not None:
                    modules = np.load(Path(tmp) / f"{which}.npy")
                    r["codelength"] = kexue_fast.map_equation((src, dst), modules, num_nodes=n).codelength
                    bottom = modules if modules.ndim == 1 else np.unique(modules, axis=0, return_inverse=True)[1]
                    r["nmi"] = nmi(planted, bottom.reshape(-1))
                    r["modules"] = len(np.unique(modules if modules.ndim == 1 else modules[:, 0]))
                    r["levels"] = 2 if modules.ndim == 1 else modules.shape[1] + 1
                results[which] = r
            ours = results["kexue_fast"]
            for which, r in results.items():
                label = f"{kind} n={n}{f' mu={mu}' if mu is not None else ''} ({len(src)} links)"
                mode = "two-level" if two_level else "multilevel"
                if r is None:
                    rows.append([mode, label, which, "failed/timeout", "", "", "", "", "", ""])
                    continue
                ratio = f"{r['seconds'] / ours['seconds']:.1f}x" if ours and which != "kexue_fast" else ""
                rows.append([mode, label, which, f"{r['seconds']:.2f}", ratio, f"{r['rss_mb']:.0f}",
                             f"{r['codelength']:.6f}", r["levels"], r["modules"], f"{r['nmi']:.4f}"])  # fmt: skip
            print(f"  infomap/cpu: {kind} n={n} mu={mu} {'two-level' if two_level else 'multilevel'} done", flush=True)
    header = ["mode", "graph", "contestant", "seconds", "time / kexue_fast", "peak RSS increase MB",
              "codelength (bits)", "levels", "top modules", "NMI vs planted"]  # fmt: skip
    notes = (
        "Undirected, unweighted; single-threaded, one trial, seed 123, one run each in a fresh process. Time: the "
        "search only (infomap's and igraph's graph construction excluded; kexue_fast's time includes its flow "
        "computation and input checks). Peak RSS: the increase over the loaded link arrays, graph construction "
        "included. Codelengths recomputed with kexue_fast.map_equation (of the partition, or of the tree in "
        "multilevel mode). Levels count the leaf level, as infomap does. NMI: the bottom modules against the planted "
        "partition (for nested graphs, the planted bottom groups)."
    )
    return write_results(out_dir, f"infomap-{device}", "Infomap vs infomap 2.16 and igraph", metadata(device),
                         header, rows, notes)  # fmt: skip
