"""Two-level Infomap: kexue_fast vs the official infomap (2.16) and igraph's community_infomap on the same graphs.

LFR benchmark graphs from networkx (tau1 = 3, tau2 = 1.5, average degree 18, min community 20, seed 42) at n = 10⁴
and 10⁵, and in full mode a planted-partition graph at n = 10⁶ (1,000 communities, average degree 18, 30% of the
links between communities; numpy, seed 0). Each graph is generated once and saved; each (contestant, graph) runs in
its own process, single-threaded, one trial with seed 123, so its time and peak RSS are its own. Every partition's
codelength is recomputed by kexue_fast.map_equation (the same formula infomap reports, to 1e-9) for a fair
comparison; NMI is against the planted partition.
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
which, path = sys.argv[1], sys.argv[2]
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
    im = infomap.Infomap("--two-level --silent --num-trials 1 --seed 123")
    im.add_links(zip(src.tolist(), dst.tolist()))
    for v in range(n):
        im.add_node(v)
elif which == "igraph":
    g = igraph.Graph(n=n, edges=np.stack([src, dst], 1).tolist())
start = time.perf_counter()
if which == "infomap":
    im.run()
    modules = np.zeros(n, dtype=np.int64)
    for node in im.tree:
        if node.is_leaf:
            modules[node.node_id] = node.module_id
elif which == "igraph":
    modules = np.asarray(g.community_infomap(trials=1).membership)
else:
    modules = kexue_fast.infomap((src, dst), num_trials=1, seed=123, n_threads=1, num_nodes=n).modules
seconds = time.perf_counter() - start
rss = rss_mb("VmHWM") - before
np.save(sys.argv[3], modules)
print(json.dumps({"seconds": seconds, "rss_mb": rss}))
"""

CONTESTANTS = ("kexue_fast", "infomap", "igraph")


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


def measure(which: str, graph_file: Path, out_file: Path, timeout: float = 1800) -> Optional[Dict[str, float]]:
    return run_script(_SCRIPT, [which, str(graph_file), str(out_file)], f"infomap/{which}", timeout)


def run(out_dir: Path, quick: bool = True, device: str = "cpu") -> Path:
    from sklearn.metrics import normalized_mutual_info_score as nmi

    import kexue_fast

    cases = [("LFR", 10_000, mu) for mu in (0.1, 0.3, 0.5)]
    if not quick:
        cases += [("LFR", 100_000, mu) for mu in (0.1, 0.3, 0.5)] + [("planted", 1_000_000, 0.3)]
    rows: List[list] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, n, mu in cases:
            src, dst, planted = lfr_graph(n, mu) if kind == "LFR" else planted_partition(n, mixing=mu)
            graph_file = Path(tmp) / "graph.npz"
            np.savez(graph_file, source=src, target=dst, n=n)
            results = {}
            for which in CONTESTANTS:
                r = measure(which, graph_file, Path(tmp) / f"{which}.npy")
                if r is not None:
                    modules = np.load(Path(tmp) / f"{which}.npy")
                    r["codelength"] = kexue_fast.map_equation((src, dst), modules, num_nodes=n).codelength
                    r["nmi"] = nmi(planted, modules)
                    r["modules"] = len(np.unique(modules))
                results[which] = r
            ours = results["kexue_fast"]
            for which, r in results.items():
                label = f"{kind} n={n} mu={mu} ({len(src)} links)"
                if r is None:
                    rows.append([label, which, "failed/timeout", "", "", "", "", ""])
                    continue
                ratio = f"{r['seconds'] / ours['seconds']:.1f}x" if ours and which != "kexue_fast" else ""
                rows.append([label, which, f"{r['seconds']:.2f}", ratio, f"{r['rss_mb']:.0f}",
                             f"{r['codelength']:.6f}", r["modules"], f"{r['nmi']:.4f}"])  # fmt: skip
            print(f"  infomap/cpu: {kind} n={n} mu={mu} done", flush=True)
    header = ["graph", "contestant", "seconds", "time / kexue_fast", "peak RSS increase MB", "codelength (bits)",
              "modules", "NMI vs planted"]  # fmt: skip
    notes = (
        "Undirected, unweighted; single-threaded, one trial, seed 123, one run each in a fresh process. Time: the "
        "search only (infomap's and igraph's graph construction excluded; kexue_fast's time includes its flow "
        "computation and input checks). Peak RSS: the increase over the loaded link arrays, graph construction "
        "included. Codelengths recomputed with kexue_fast.map_equation."
    )
    return write_results(out_dir, f"infomap-{device}", "Two-level Infomap vs infomap 2.16 and igraph",
                         metadata(device), header, rows, notes)  # fmt: skip
