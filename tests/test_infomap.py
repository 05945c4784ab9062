"""The map equation and the two-level Infomap against the official infomap package (2.16)."""

import warnings

import numpy as np
import pytest

import kexue_fast

nx = pytest.importorskip("networkx")
im_pkg = pytest.importorskip("infomap")


def _official(links, directed=False, extra="", num_trials=1):
    """(codelength, {node: module}) from the official infomap, two-level, seed 123."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flags = f"--two-level --silent --num-trials {num_trials} --seed 123{' --directed' if directed else ''}{extra}"
        im = im_pkg.Infomap(flags)
        for link in links:
            im.add_link(*[int(v) for v in link[:2]], *([float(link[2])] if len(link) > 2 else []))
        im.run()
        return im.codelength, {nd.node_id: nd.module_id for nd in im.tree if nd.is_leaf}


def _planted_directed(n=150, groups=5, seed=5, dangling_every=17):
    rng = np.random.default_rng(seed)
    comm = np.repeat(np.arange(groups), n // groups)
    a = rng.random((n, n)) < np.where(comm[:, None] == comm[None, :], 0.12, 0.01)
    np.fill_diagonal(a, False)
    a[::dangling_every] = False  # nodes without out-links
    src, dst = np.nonzero(a)
    return src, dst, rng.uniform(0.5, 2.0, len(src))


def _lfr(n, mu, seed=42):
    g = nx.LFR_benchmark_graph(n, 3, 1.5, mu, average_degree=15, min_community=20, max_degree=50,
                               max_community=200 if n <= 1000 else 500, seed=seed)  # fmt: skip
    planted = np.array([min(g.nodes[v]["community"]) for v in g.nodes])
    return g, planted


def test_karate_club():
    r = kexue_fast.infomap(nx.Graph(nx.karate_club_graph().edges()))
    assert r.num_modules == 3
    assert abs(r.codelength - 4.311792646) < 5e-10
    assert abs(r.index_codelength + r.module_codelength - r.codelength) < 1e-12


@pytest.mark.parametrize(
    "case", ["undirected", "weighted", "self-loops", "directed", "directed markov time 2", "directed recorded"]
)
def test_map_equation_of_infomaps_partition_equals_its_codelength(case):
    markov_time = 1.0
    if case in ("undirected", "weighted"):
        g = nx.karate_club_graph()
        links = [(u, v, d["weight"]) if case == "weighted" else (u, v) for u, v, d in g.edges(data=True)]
        directed = False
    elif case == "self-loops":
        g, _ = _lfr(1000, 0.1)
        assert nx.number_of_selfloops(g) > 0
        links, directed = list(g.edges()), False
    else:
        src, dst, w = _planted_directed()
        links, directed = list(zip(src, dst, w)), True
        markov_time = 2.0 if "markov" in case else 1.0
    recorded = "recorded" in case
    flags = f" --markov-time {markov_time}{' --recorded-teleportation' if recorded else ''}"
    expected, partition = _official(links, directed, flags)
    arrays = tuple(np.array([link[i] for link in links]) for i in range(len(links[0])))
    ours = kexue_fast.map_equation(arrays, partition, directed=directed, markov_time=markov_time,
                                   recorded_teleportation=recorded)  # fmt: skip
    assert abs(ours.codelength - expected) < 1e-9


@pytest.mark.parametrize("n", [1000, 10000])
@pytest.mark.parametrize("mu", [0.1, 0.3, 0.5])
def test_lfr_codelength_and_nmi_as_good_as_infomap(n, mu):
    from sklearn.metrics import normalized_mutual_info_score as nmi

    g, planted = _lfr(n, mu)
    src, dst = np.array(g.edges()).T
    ours = kexue_fast.infomap((src, dst), num_trials=1, seed=123)
    expected, partition = _official(list(g.edges()))
    assert ours.codelength <= expected * (1 + 5e-4)
    theirs = np.array([partition[v] for v in range(n)])
    assert nmi(planted, ours.modules) >= nmi(planted, theirs) - 0.01


def test_input_formats_agree(tmp_path):
    scipy_sparse = pytest.importorskip("scipy.sparse")
    g = nx.karate_club_graph()
    src, dst = np.array(g.edges()).T
    w = np.array([d["weight"] for _, _, d in g.edges(data=True)], dtype=float)
    expected = kexue_fast.infomap((src, dst, w)).codelength
    a = scipy_sparse.coo_matrix((w, (src, dst)), shape=(34, 34))
    pajek = tmp_path / "karate.net"
    pajek.write_text("*Vertices 34\n*Edges\n" + "".join(f"{u + 1} {v + 1} {x}\n" for u, v, x in zip(src, dst, w)))
    link_list = tmp_path / "karate.txt"
    link_list.write_text("# source target weight\n" + "".join(f"{u} {v} {x}\n" for u, v, x in zip(src, dst, w)))
    inputs = [g, a + a.T, str(pajek), link_list]
    try:
        import igraph

        ig = igraph.Graph(n=34, edges=list(zip(src.tolist(), dst.tolist())))
        ig.es["weight"] = w.tolist()
        inputs.append(ig)
    except ImportError:
        pass
    for graph in inputs:
        assert abs(kexue_fast.infomap(graph).codelength - expected) < 1e-12, type(graph).__name__
    r = kexue_fast.infomap(nx.relabel_nodes(g, {v: f"n{v}" for v in g.nodes}))
    assert set(r.modules_dict()) == {f"n{v}" for v in range(34)}


def test_deterministic_for_a_seed_and_thread_count_independent():
    g, _ = _lfr(1000, 0.3)
    src, dst = np.array(g.edges()).T
    a = kexue_fast.infomap((src, dst), num_trials=4, seed=7, n_threads=1)
    b = kexue_fast.infomap((src, dst), num_trials=4, seed=7, n_threads=3)
    assert np.array_equal(a.modules, b.modules) and a.codelength == b.codelength
    assert a.codelength <= kexue_fast.infomap((src, dst), num_trials=1, seed=7).codelength


def test_isolated_nodes_and_self_loops_work():
    src = np.array([0, 1, 2, 3, 4, 5, 0, 3, 3])
    dst = np.array([1, 2, 0, 4, 5, 3, 0, 3, 0])
    r = kexue_fast.infomap((src, dst), num_nodes=8)
    assert r.modules.shape == (8,) and r.flow[6] == 0 and r.flow[7] == 0
    assert r.num_modules >= 2


@pytest.mark.parametrize(
    "graph, match",
    [
        ((np.array([0, 1]), np.array([1, 2]), np.array([1.0, -1.0])), "non-negative"),
        ((np.array([0, 1]), np.array([1, 2]), np.array([1.0, np.nan])), "finite"),
        ((np.array([0, -1]), np.array([1, 2])), "out of range"),
        ((np.array([], dtype=np.int64), np.array([], dtype=np.int64)), "empty"),
        ((np.array([0, 1]), np.array([1, 0]), np.array([0.0, 0.0])), "empty"),
    ],
)
def test_bad_input(graph, match):
    with pytest.raises(ValueError, match=match):
        kexue_fast.infomap(graph)
    with pytest.raises(ValueError, match="out of range"):
        kexue_fast.infomap((np.array([0, 1]), np.array([1, 5])), num_nodes=4)


def test_bad_arguments():
    g = nx.karate_club_graph()
    with pytest.raises(ValueError, match="num_trials"):
        kexue_fast.infomap(g, num_trials=0)
    with pytest.raises(ValueError, match="teleportation_probability"):
        kexue_fast.infomap(g, directed=True, teleportation_probability=1.5)
    with pytest.raises(ValueError, match="modules"):
        kexue_fast.map_equation(g, [0, 1, 2])
    with pytest.raises(TypeError, match="graph must be"):
        kexue_fast.infomap(object())
    for name, value in (("core_loop_limit", 0), ("n_threads", -1), ("n_threads", 1.5), ("seed", 2**64),
                        ("tune_iteration_limit", -1)):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            kexue_fast.infomap(g, **{name: value})


@pytest.mark.parametrize("recorded", [False, True])
def test_zero_weight_out_links_and_stalled_pagerank_match_infomap(recorded):
    """A node whose only out-link weighs 0 is dangling (its flows were 0/0 = NaN, the codelength silently 0); two
    disjoint triangles keep PageRank uniform from the first step, where infomap 2 nudges α by 1e-12 (1e-10 was
    1.2e-8 bits off with recorded teleportation)."""
    extra = " --recorded-teleportation" if recorded else ""
    for links in ([(0, 1, 1), (1, 2, 1), (2, 0, 1), (3, 4, 1), (4, 5, 1), (5, 3, 1), (6, 3, 0.0)],
                  [(0, 1, 1), (1, 2, 1), (2, 0, 1), (3, 4, 1), (4, 5, 1), (5, 3, 1)]):  # fmt: skip
        src, dst, w = (np.array([link[i] for link in links]) for i in range(3))
        official, modules = _official(links, directed=True, extra=extra)
        ours = kexue_fast.map_equation((src, dst, w.astype(float)), [modules.get(i, 7) for i in range(src.max() + 2)
                                       if i <= max(src.max(), dst.max())], directed=True,
                                       recorded_teleportation=recorded)  # fmt: skip
        assert abs(ours.codelength - official) <= 1e-12
        result = kexue_fast.infomap((src, dst, w.astype(float)), directed=True, recorded_teleportation=recorded)
        assert np.isfinite(result.flow).all() and abs(result.codelength - official) <= 1e-9


def test_undirected_sparse_triangles_and_pajek_adjacency_lists(tmp_path):
    sparse = pytest.importorskip("scipy.sparse")
    g = nx.karate_club_graph()
    full = nx.to_scipy_sparse_array(g, format="coo")
    expected = kexue_fast.infomap(full, directed=False).codelength
    lower = sparse.tril(full).tocoo()
    assert kexue_fast.infomap(lower, directed=False).codelength == pytest.approx(expected, abs=1e-12)
    mixed = sparse.triu(full).tolil()
    mixed[0, 5], mixed[5, 0] = 0, full.tocsr()[0, 5]  # one edge stored only below the diagonal
    assert kexue_fast.infomap(mixed.tocoo(), directed=False).codelength == pytest.approx(expected, abs=1e-12)
    lists = tmp_path / "lists.net"
    lists.write_text("*Vertices 6\n*Edgeslist\n1 2 3\n2 3\n4 5 6\n5 6\n3 4\n")
    edges = tmp_path / "edges.net"
    edges.write_text("*Vertices 6\n*Edges\n1 2\n1 3\n2 3\n4 5\n4 6\n5 6\n3 4\n")
    assert kexue_fast.infomap(str(lists)).codelength == pytest.approx(kexue_fast.infomap(str(edges)).codelength)


def test_clu_and_tree_files_round_trip(tmp_path):
    g = nx.karate_club_graph()
    r = kexue_fast.infomap(nx.relabel_nodes(g, {v: v + 1 for v in g.nodes}))
    r.write_clu(tmp_path / "k.clu")
    r.write_tree(tmp_path / "k.tree")
    clu = [line.split() for line in (tmp_path / "k.clu").read_text().splitlines() if not line.startswith("#")]
    assert {int(v): int(m) - 1 for v, m, _ in clu} == r.modules_dict()
    assert abs(sum(float(x) for _, _, x in clu) - 1) < 1e-9
    tree = [line.split() for line in (tmp_path / "k.tree").read_text().splitlines() if not line.startswith("#")]
    paths = [tuple(int(x) for x in p.split(":")) for p, *_ in tree]
    assert sorted(paths) == paths and len(set(paths)) == 34  # modules in order, ranks 1.. within each
    for (module, _), (_, _, _, node) in zip(paths, tree):
        assert r.modules_dict()[int(node)] == module - 1
    flows = [float(f) for _, f, _, _ in tree]
    for a, b, pa, pb in zip(flows, flows[1:], paths, paths[1:]):
        assert pa[0] != pb[0] or a >= b  # decreasing flow within a module


@pytest.mark.parametrize("recorded", [False, True], ids=["unrecorded", "recorded"])
def test_directed_codelength_as_good_as_infomap_with_five_trials(recorded):
    src, dst, w = _planted_directed()
    flags = " --recorded-teleportation" if recorded else ""
    expected, _ = _official(list(zip(src, dst, w)), directed=True, extra=flags, num_trials=5)
    ours = kexue_fast.infomap((src, dst, w), directed=True, num_trials=5, seed=123, recorded_teleportation=recorded)
    # Recorded: over seeds 1..10 our single-trial codelengths run ~0.2% above infomap's (median 6.709 vs 6.697 bits
    # here; 20 trials reach infomap's best, 6.6718), so that search is held to 3e-3.
    assert ours.codelength <= expected * (1 + (3e-3 if recorded else 5e-4))
    again = kexue_fast.map_equation((src, dst, w), ours.modules, directed=True, recorded_teleportation=recorded)
    assert abs(again.codelength - ours.codelength) < 1e-12


def test_recorded_teleportation_needs_a_directed_graph():
    with pytest.raises(ValueError, match="recorded_teleportation needs a directed graph"):
        kexue_fast.infomap(nx.karate_club_graph(), recorded_teleportation=True)


# ------------------------------------------------------------------------------------- fixes from an audit
def test_more_hierarchical_trials_are_never_worse():
    """A hierarchical trial that found no structure kept codelength 0 and so beat every trial that found modules:
    num_trials=8 returned one module where trial 0 alone (num_trials=1) found three."""
    rng = np.random.default_rng(2)
    a = np.triu(rng.random((40, 40)) < rng.uniform(0.08, 0.2), 1)
    s, t = np.nonzero(a)
    one = kexue_fast.infomap((s, t), two_level=False, num_trials=1, seed=1)
    more = kexue_fast.infomap((s, t), two_level=False, num_trials=8, seed=1)
    assert more.codelength <= one.codelength + 1e-12 and one.num_modules > 1
    s, t = np.nonzero(np.triu(np.ones((6, 6), bool), 1))  # a clique: no structure, the one-level code
    flat = kexue_fast.infomap((s, t), two_level=False, num_trials=3)
    assert flat.num_modules == 1 and flat.codelength == pytest.approx(flat.one_level_codelength, abs=1e-12)


def _exact_pagerank(n, src, dst, w, tau):
    """The stationary PageRank of recorded teleportation (to links: ∝ the in-weight), by an eigen-solve."""
    out = np.bincount(src, w, minlength=n)
    p = np.zeros((n, n))
    np.add.at(p, (dst, src), w / out[src])
    teleport = np.bincount(dst, w, minlength=n) / w.sum()
    dangling = (out == 0).astype(float)
    m = (1 - tau) * (p + np.outer(teleport, dangling)) + tau * np.outer(teleport, np.ones(n))
    vals, vecs = np.linalg.eig(m)
    v = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
    return v / v.sum()


def test_directed_flow_converges_where_infomaps_200_steps_do_not():
    """A period-2 directed graph (a 10-cycle with a chord) at τ = 0.005: 200 power steps from the nodes' strengths
    left the flows 5e-5 off their stationary values (this test on the previous flow.py); the steps now go on to the
    change's rounding floor."""
    from kexue_fast.infomap.flow import flow_model
    from kexue_fast.infomap.graph import as_graph

    n = 10
    src, dst = np.r_[np.arange(n), 0], np.r_[(np.arange(n) + 1) % n, 5]
    w = np.r_[np.ones(n), 5.0]
    g = as_graph((src, dst, w), directed=True)
    exact = _exact_pagerank(n, src, dst, w, 0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        flow = flow_model(g, 0.005, recorded_teleportation=True)
    assert np.max(np.abs(flow.node - exact)) < 1e-10


def test_directed_flow_warns_when_it_cannot_converge(monkeypatch):
    from kexue_fast.infomap import flow as flow_module
    from kexue_fast.infomap.graph import as_graph

    monkeypatch.setattr(flow_module, "_MAX_STEPS", 500)
    src, dst = np.r_[np.arange(10), 0], np.r_[(np.arange(10) + 1) % 10, 5]  # period 2, no teleportation
    with pytest.warns(RuntimeWarning, match="did not converge in 500 power steps"):
        flow_module.flow_model(as_graph((src, dst), directed=True), 0.0)


def test_link_list_ids_name_nodes(tmp_path):
    """Integer ids in a link-list file were array indices: a 1-based file (infomap's usual) got a phantom node 0,
    an extra module and an extra .clu line; infomap reads the ids as names."""
    path = tmp_path / "two_triangles.txt"
    path.write_text("1 2\n2 3\n3 1\n4 5\n5 6\n6 4\n3 4\n")
    r = kexue_fast.infomap(str(path))
    assert r.node_ids == [1, 2, 3, 4, 5, 6] and r.num_modules == 2
    official, _ = _official([(1, 2), (2, 3), (3, 1), (4, 5), (5, 6), (6, 4), (3, 4)])
    assert r.codelength == pytest.approx(official, abs=1e-9)
    r.write_clu(tmp_path / "out.clu")
    assert len([ln for ln in (tmp_path / "out.clu").read_text().splitlines() if not ln.startswith("#")]) == 6
    assert kexue_fast.map_equation(str(path), {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}).codelength == pytest.approx(
        r.codelength, abs=1e-12
    )


def test_isolated_nodes_keep_their_own_modules_without_structure():
    """With no structure in the linked part, the one-module fill also swallowed the isolated nodes (infomap, and
    this core when there is structure, keep each in its own module)."""
    s, t = np.array([0, 1, 2]), np.array([1, 2, 0])
    for two_level in (True, False):
        r = kexue_fast.infomap((s, t), num_nodes=5, two_level=two_level)
        assert r.modules.tolist() == [0, 0, 0, 1, 2] and r.num_modules == 3
        assert r.codelength == pytest.approx(r.one_level_codelength, abs=1e-12)


def test_graph_inputs_that_were_read_wrong_or_raised_raw_errors():
    sp = pytest.importorskip("scipy.sparse")
    a = sp.coo_matrix(([1.0, 5.0, 1.0, 1.0], ([0, 1, 1, 2], [1, 0, 2, 0])), shape=(3, 3))
    with pytest.raises(ValueError, match="asymmetric adjacency matrix"):  # the lower weight 5 was dropped
        kexue_fast.map_equation(a, [0, 0, 1], directed=False)
    lower = sp.coo_matrix(([1.0, 1.0, 1.0], ([1, 2, 2], [0, 0, 1])), shape=(3, 3))  # one triangle: each edge once
    upper = sp.coo_matrix(([1.0, 1.0, 1.0], ([0, 0, 1], [1, 2, 2])), shape=(3, 3))
    assert kexue_fast.map_equation(lower, [0, 0, 1], directed=False) == kexue_fast.map_equation(
        upper, [0, 0, 1], directed=False
    )
    with pytest.raises(ValueError, match="integer node ids are node indices"):  # went on to a MemoryError
        kexue_fast.infomap((np.array([0, 1, 2]), np.array([1, 2, 10**12])))
    with pytest.raises(ValueError, match="num_nodes is for integer node ids"):  # ignored silently
        kexue_fast.infomap((np.array(["a", "b"]), np.array(["b", "c"])), num_nodes=5)
    g = nx.Graph([(0, 1), (1, 2)])
    with pytest.raises(ValueError, match="num_nodes is for"):
        kexue_fast.infomap(g, num_nodes=5)
    g.add_edge(2, 0, weight=None)
    with pytest.raises(ValueError, match=r"edge \(0, 2\) has weight None"):
        kexue_fast.infomap(g)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [({"num_nodes": 5.5}, ValueError, "num_nodes"), ({"num_nodes": "5"}, ValueError, "num_nodes"),
     ({"teleportation_probability": "0.1"}, ValueError, "teleportation_probability"),
     ({"markov_time": "2"}, ValueError, "markov_time"), ({"directed": "no"}, TypeError, "directed"),
     ({"recorded_teleportation": "yes", "directed": True}, TypeError, "recorded_teleportation"),
     ({"tune_iteration_limit": 2**31 - 1}, ValueError, "tune_iteration_limit")],
)  # fmt: skip
def test_arguments_are_checked_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        kexue_fast.infomap((np.array([0, 1, 2]), np.array([1, 2, 0])), **kwargs)


def test_huge_weights_handmade_graphs_and_one_shot_module_iterators():
    """Weights of 1e308 summed to inf: NaN flows crashed the C++ core (segfault) or gave codelength 0; a hand-made
    Graph skipped every check (a NaN weight segfaulted, a negative one ran); markov_time = 1e308 gave NaN; an
    iterator of module labels lost its first label to is_tree's peek (a wrong codelength, no error)."""
    from kexue_fast.infomap import Graph

    path = ([0, 1, 2], [1, 2, 3])
    unit = kexue_fast.map_equation((*path, [1.0] * 3), [0, 0, 1, 1]).codelength
    assert kexue_fast.map_equation((*path, [1e308] * 3), [0, 0, 1, 1]).codelength == pytest.approx(unit, rel=1e-12)
    found = kexue_fast.infomap((*path, [1e308] * 3), seed=0)
    assert np.isfinite(found.codelength) and np.all(np.isfinite(found.flow))
    for bad in (np.nan, -1.0):
        g = Graph(4, np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([1.0, bad, 1.0]), False, [0, 1, 2, 3])
        with pytest.raises(ValueError, match="finite and non-negative"):
            kexue_fast.infomap(g)
    with pytest.raises(ValueError, match="markov_time"):
        kexue_fast.infomap((*path,), markov_time=1e308)
    with pytest.raises(TypeError, match="complex"):
        kexue_fast.map_equation((*path, [1 + 5j] * 3), [0, 0, 1, 1])
    with pytest.raises(TypeError, match="two_level must be a bool"):
        kexue_fast.infomap((*path,), two_level="no")
    labels = [0, 0, 1, 1]
    listed = kexue_fast.map_equation((*path,), labels).codelength
    assert kexue_fast.map_equation((*path,), iter(labels)).codelength == listed
    with pytest.raises(ValueError, match="one module per node"):
        kexue_fast.map_equation((*path,), iter([*labels, 1]))
    with pytest.raises(TypeError, match="modules must be one label per node"):
        kexue_fast.map_equation((*path,), 0)
