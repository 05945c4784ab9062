"""The multilevel map equation and the hierarchical Infomap against the official infomap package (2.16)."""

import warnings

import numpy as np
import pytest

import kexue_fast
from kexue_fast.benchmarks.infomap import nested_planted

im_pkg = pytest.importorskip("infomap")


def _nested_planted(branch, leaf, degrees, directed=False, seed=0):
    """(n, source, target) of a graph with a planted hierarchy (see benchmarks/infomap.py)."""
    src, dst, planted = nested_planted(branch, leaf, degrees, directed=directed, seed=seed)
    return len(planted), src, dst


def _official_tree(n, src, dst, directed, seed=123, two_level=False, weight=None, recorded=False):
    """(codelength, paths [n, depth] 0-based and −1 padded) from the official infomap."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = im_pkg.Infomap(silent=True, directed=directed, two_level=two_level, num_trials=1, seed=seed,
                            recorded_teleportation=recorded)  # fmt: skip
        im.add_nodes(range(n))
        if weight is None:
            im.add_links(zip(src.tolist(), dst.tolist()))
        else:
            im.add_links(zip(src.tolist(), dst.tolist(), weight.tolist()))
        im.run()
        paths = {nd.node_id: tuple(p - 1 for p in nd.path[:-1]) for nd in im.tree if nd.is_leaf}
        codelength = im.codelength
    depth = max(len(p) for p in paths.values())
    tree = np.full((n, depth), -1, dtype=np.int64)
    for v, p in paths.items():
        tree[v, : len(p)] = p
    return codelength, tree


@pytest.mark.parametrize(
    "directed, recorded", [(False, False), (True, False), (True, True)], ids=["undirected", "directed", "recorded"]
)
@pytest.mark.parametrize("weighted", [False, True])
def test_map_equation_of_infomaps_tree_equals_its_multilevel_codelength(directed, recorded, weighted):
    n, src, dst = _nested_planted((3, 4), 30, (1.5, 3, 10), directed=directed, seed=3)
    weight = np.random.default_rng(1).uniform(0.5, 2.0, len(src)) if weighted else None
    expected, tree = _official_tree(n, src, dst, directed, weight=weight, recorded=recorded)
    # a real hierarchy; with recorded teleportation infomap keeps two levels here (teleport codewords make deeper
    # levels cost more than they save)
    assert tree.shape[1] >= (1 if recorded else 2)
    graph = (src, dst) if weight is None else (src, dst, weight)
    kw = dict(directed=directed, num_nodes=n, recorded_teleportation=recorded)
    got = kexue_fast.map_equation(graph, tree, **kw)
    assert abs(got.codelength - expected) < 1e-9
    assert abs(got.index_codelength + got.module_codelength - got.codelength) < 1e-12
    # the same tree as per-node paths and as a dict
    paths = [tuple(int(m) for m in row if m >= 0) for row in tree]
    assert abs(kexue_fast.map_equation(graph, paths, **kw).codelength - expected) < 1e-9
    assert abs(kexue_fast.map_equation(graph, dict(enumerate(paths)), **kw).codelength - expected) < 1e-9


def test_tree_of_depth_one_is_the_two_level_map_equation():
    n, src, dst = _nested_planted((2, 3), 20, (1, 2, 8), seed=4)
    modules = np.random.default_rng(0).integers(0, 5, n)
    two = kexue_fast.map_equation((src, dst), modules, num_nodes=n)
    tree = kexue_fast.map_equation((src, dst), modules[:, None], num_nodes=n)
    assert abs(two.codelength - tree.codelength) < 1e-12
    assert abs(two.index_codelength - tree.index_codelength) < 1e-12


CASES = [((4, 4, 4), 50, (0.5, 1.5, 4, 12)), ((5, 5), 40, (1, 3, 12)), ((8, 8), 30, (1, 3, 10))]


@pytest.mark.parametrize("directed", [False, True], ids=["undirected", "directed"])
@pytest.mark.parametrize("case", CASES, ids=["4x4x4x50", "5x5x40", "8x8x30"])
def test_hierarchical_codelength_matches_infomap_multilevel(case, directed):
    n, src, dst = _nested_planted(*case, directed=directed)
    expected, official_tree = _official_tree(n, src, dst, directed)
    two_level, _ = _official_tree(n, src, dst, directed, two_level=True)
    kw = dict(directed=directed, num_nodes=n, seed=123)
    r = kexue_fast.infomap((src, dst), two_level=False, **kw)
    ours_two = kexue_fast.infomap((src, dst), **kw)
    assert abs(r.codelength - expected) <= 1e-3 * expected
    assert r.codelength <= ours_two.codelength and r.codelength <= two_level
    assert r.num_levels == official_tree.shape[1] + 1 >= 3
    # the reported codelength is the map equation of the reported tree
    again = kexue_fast.map_equation((src, dst), r.tree, directed=directed, num_nodes=n)
    assert abs(again.codelength - r.codelength) < 1e-12
    assert abs(again.index_codelength - r.index_codelength) < 1e-12


@pytest.mark.parametrize("case", CASES, ids=["4x4x4x50", "5x5x40", "8x8x30"])
def test_hierarchical_with_recorded_teleportation_as_good_as_infomap(case):
    n, src, dst = _nested_planted(*case, directed=True)
    expected, _ = _official_tree(n, src, dst, True, recorded=True)
    kw = dict(directed=True, num_nodes=n, recorded_teleportation=True)
    r = kexue_fast.infomap((src, dst), two_level=False, **kw)
    assert r.codelength <= expected * (1 + 1e-3)
    assert abs(kexue_fast.map_equation((src, dst), r.tree, **kw).codelength - r.codelength) < 1e-12


def test_hierarchical_recovers_a_planted_hierarchy():
    branch, leaf = (5, 5), 40
    n, src, dst = _nested_planted(branch, leaf, (1, 3, 12), seed=2)
    r = kexue_fast.infomap((src, dst), two_level=False, num_nodes=n)
    top, bottom = np.arange(n) // (n // branch[0]), np.arange(n) // leaf
    assert r.tree.shape[1] == 2
    for level, planted in ((1, top), (2, bottom)):
        found = r.modules_at(level)
        # the same partition: a bijection between found and planted labels
        pairs = set(zip(found.tolist(), planted.tolist()))
        assert len(pairs) == len(set(found.tolist())) == len(set(planted.tolist()))


def test_hierarchical_is_deterministic_and_thread_count_independent():
    n, src, dst = _nested_planted((3, 3), 25, (1, 3, 8), seed=5)
    a = kexue_fast.infomap((src, dst), two_level=False, num_nodes=n, num_trials=3, seed=7, n_threads=1)
    b = kexue_fast.infomap((src, dst), two_level=False, num_nodes=n, num_trials=3, seed=7, n_threads=3)
    assert a.codelength == b.codelength and np.array_equal(a.tree, b.tree)


def test_no_structure_gives_one_module():
    n = 12
    src, dst = np.nonzero(~np.eye(n, dtype=bool))
    r = kexue_fast.infomap((src, dst), two_level=False)
    assert r.num_modules == 1 and r.num_levels == 2
    assert abs(r.codelength - r.one_level_codelength) < 1e-12


def test_two_level_result_is_a_tree_of_depth_one():
    n, src, dst = _nested_planted((2, 2), 20, (1, 2, 8), seed=6)
    r = kexue_fast.infomap((src, dst), num_nodes=n)
    assert r.num_levels == 2 and np.array_equal(r.tree[:, 0], r.modules)
    assert r.paths() == [(int(m),) for m in r.modules]


def test_tree_file_of_a_hierarchical_result(tmp_path):
    n, src, dst = _nested_planted((3, 4), 30, (1.5, 3, 10), seed=3)
    r = kexue_fast.infomap((src, dst), two_level=False, num_nodes=n)
    r.write_tree(tmp_path / "h.tree")
    r.write_clu(tmp_path / "h.clu")
    rows = [line.split() for line in (tmp_path / "h.tree").read_text().splitlines() if not line.startswith("#")]
    paths = [tuple(int(x) - 1 for x in p.split(":")) for p, *_ in rows]
    assert sorted(paths) == paths and len(set(paths)) == n
    got = {int(node): p[:-1] for p, (_, _, _, node) in zip(paths, rows)}
    assert got == dict(enumerate(r.paths()))
    clu = [line.split() for line in (tmp_path / "h.clu").read_text().splitlines() if not line.startswith("#")]
    assert {int(v): int(m) - 1 for v, m, _ in clu} == r.modules_dict()


def test_bad_trees():
    n, src, dst = _nested_planted((2, 2), 10, (1, 2, 6), seed=1)
    graph = (src, dst)
    good = [(0, 0)] * 20 + [(1, 0)] * 20
    assert kexue_fast.map_equation(graph, good, num_nodes=n).codelength > 0
    with pytest.raises(ValueError, match="all nodes or all modules"):
        kexue_fast.map_equation(graph, [(0,), *good[1:]], num_nodes=n)  # module 0 holds a node and a module
    with pytest.raises(ValueError, match="gap"):
        tree = np.c_[np.array(good), np.zeros(n, dtype=np.int64)]
        tree[0] = (0, -1, 0)
        kexue_fast.map_equation(graph, tree, num_nodes=n)
    with pytest.raises(ValueError, match="one path per node"):
        kexue_fast.map_equation(graph, good[:-1], num_nodes=n)
    with pytest.raises(ValueError, match="shape"):
        kexue_fast.map_equation(graph, np.zeros((n - 1, 2), dtype=np.int64), num_nodes=n)
    with pytest.raises(ValueError, match="non-negative"):
        kexue_fast.map_equation(graph, [(0, -2), *good[1:]], num_nodes=n)
    with pytest.raises(ValueError, match="at least one module"):
        kexue_fast.map_equation(graph, [(), *good[1:]], num_nodes=n)
    with pytest.raises(TypeError, match="integers"):
        kexue_fast.map_equation(graph, np.zeros((n, 2)), num_nodes=n)
