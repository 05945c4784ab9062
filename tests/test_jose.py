"""JoSE: the update algebra (reference vs autograd and vs the official code's formulas), the C++ trainer (steps vs
the reference, jose.c's RNG conventions, determinism, Hogwild), the model API, file formats and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kexue_fast import _core
from kexue_fast.jose import JoSE, KeyedVectors
from kexue_fast.jose import reference as R
from kexue_fast.jose.evaluation import _ranks, evaluate_word_similarity
from kexue_fast.jose.vocab import encode_documents, encode_file

D64 = torch.float64
MASK64 = (1 << 64) - 1


def unit(*shape, dtype=D64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=D64)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype)


def paper_step(x, loss_fn, alpha):
    """x ← retract(x, −(I − xxᵀ)∇, α(1 + xᵀ∇/‖∇‖)) with ∇ from autograd: the paper's rule, independently."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x), x)
    return R.retract(x.detach(), R.riemannian_direction(x.detach(), g), alpha * R.cosine_factor(x.detach(), g))


def small_corpus(n_docs=60, seed=0):
    rng = np.random.default_rng(seed)
    topics = [[f"a{i}" for i in range(12)], [f"b{i}" for i in range(12)], [f"c{i}" for i in range(12)]]
    common = [f"w{i}" for i in range(20)]
    docs = []
    for k in range(n_docs):
        t = topics[k % 3]
        docs.append([str(rng.choice(t)) if rng.random() < 0.6 else str(rng.choice(common)) for _ in range(40)])
    return docs


# ------------------------------------------------------------------------------------------------- update algebra
@pytest.mark.parametrize("dim", [2, 7, 63, 65])
def test_separate_paper_rule_is_the_riemannian_step_of_the_hinge(dim):
    b, m, a = 65, 0.15, 0.3
    u, v, n = unit(b, dim, seed=dim), unit(b, dim, seed=dim + 1), unit(b, dim, seed=dim + 2)
    out = R.separate_update(u, v, n, a, m, "paper")
    act = out.active[:, None]
    assert out.active.any() and (~out.active).any() if dim > 2 else True

    def hinge(uu, vv, nn):
        return ((uu * vv).sum(-1) - (nn * vv).sum(-1)).neg().sum()  # the active part of m − uᵀv + u'ᵀv

    exp_u = paper_step(u, lambda x: hinge(x, v, n), a)
    exp_n = paper_step(n, lambda x: hinge(u, v, x), a)
    exp_v = paper_step(v, lambda x: hinge(u, x, n), a)
    for got, exp, old in ((out.u, exp_u, u), (out.u_neg, exp_n, n), (out.v, exp_v, v)):
        torch.testing.assert_close(got, torch.where(act, exp, old), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.loss, (m - (u * v).sum(-1) + (n * v).sum(-1)).clamp_min(0), atol=1e-15, rtol=0)


@pytest.mark.parametrize("dim", [3, 64])
def test_separate_jose_c_rule_is_the_official_codes_update(dim):
    b, m, a = 63, 0.15, 0.04
    u, v, n = unit(b, dim, seed=1), unit(b, dim, seed=2), unit(b, dim, seed=3)
    out = R.separate_update(u, v, n, a, m, "jose_c")
    f, h = (u * v).sum(-1, keepdim=True), (n * v).sum(-1, keepdim=True)
    # jose.c, word–context block: neu1e, then u (step 1 − f), u' (step 2h), v (step 1 − (f − h)), each renormalized
    neu1e = u - f * v + h * v - n
    nu = u + a * (1 - f) * (v - f * u)
    nn = n + a * (2 * h) * (h * n - v)
    nv = v + a * (1 - (f - h)) * neu1e
    act = (f - h) < m
    for got, exp, old in ((out.u, nu, u), (out.u_neg, nn, n), (out.v, nv, v)):
        torch.testing.assert_close(got, torch.where(act, exp / exp.norm(dim=-1, keepdim=True), old), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dim", [2, 7, 65])
def test_joint_paper_rule_is_the_riemannian_step_of_the_joint_hinge(dim):
    b, m, a = 64, 0.3, 0.2
    u, v, d, n = (unit(b, dim, seed=10 * dim + i) for i in range(4))
    out = R.joint_update(u, v, d, n, a, m, "paper")
    act = out.active[:, None]

    def hinge(uu, vv, dd, nn):
        return (-(uu * vv).sum(-1) - (uu * dd).sum(-1) + (nn * vv).sum(-1) + (nn * dd).sum(-1)).sum()

    exp = {
        "u": paper_step(u, lambda x: hinge(x, v, d, n), a),
        "v": paper_step(v, lambda x: hinge(u, x, d, n), a),
        "d": paper_step(d, lambda x: hinge(u, v, x, n), a),
        "u_neg": paper_step(n, lambda x: hinge(u, v, d, x), a),
    }
    for name, old in (("u", u), ("v", v), ("d", d), ("u_neg", n)):
        torch.testing.assert_close(getattr(out, name), torch.where(act, exp[name], old), atol=1e-12, rtol=0)


def test_joint_jose_c_rule_closed_form():
    b, dim, m, a = 33, 9, 0.5, 0.1
    u, v, d, n = (unit(b, dim, seed=40 + i) for i in range(4))
    out = R.joint_update(u, v, d, n, a, m, "jose_c")
    f, g, h, k = ((x * y).sum(-1, keepdim=True) for x, y in ((u, v), (u, d), (n, v), (n, d)))
    s = v + d
    sn = s.norm(dim=-1, keepdim=True)
    exp = {
        "u": u + a * (1 - (f + g) / sn) * (s - (f + g) * u),
        "u_neg": n + a * (2 * (h + k) / sn) * ((h + k) * n - s),
        "v": v + a * (1 - (f - h)) * ((u - n) - (f - h) * v),
        "d": d + a * (1 - (g - k)) * ((u - n) - (g - k) * d),
    }
    act = (f + g - h - k) < m
    for name, old in (("u", u), ("v", v), ("d", d), ("u_neg", n)):
        e = exp[name] / exp[name].norm(dim=-1, keepdim=True)
        torch.testing.assert_close(getattr(out, name), torch.where(act, e, old), atol=1e-12, rtol=0)


@pytest.mark.parametrize("rule", R.STEP_RULES)
@pytest.mark.parametrize("joint", [False, True])
def test_updated_vectors_have_unit_norm_in_float32(rule, joint):
    b, dim = 127, 65
    vecs = [unit(b, dim, dtype=torch.float32, seed=70 + i) for i in range(4)]
    if joint:
        out = R.joint_update(vecs[0], vecs[1], vecs[2], vecs[3], 0.5, 2.5, rule)
        rows = (out.u, out.v, out.d, out.u_neg)
    else:
        out = R.separate_update(vecs[0], vecs[1], vecs[3], 0.5, 2.5, rule)
        rows = (out.u, out.v, out.u_neg)
    assert out.active.all()  # margin 2.5 > any cosine gap of separate pairs
    for x in rows:
        assert (x.norm(dim=-1) - 1).abs().max() <= 1e-6


@pytest.mark.parametrize("dim", [2, 17, 64])
def test_tangential_step_is_orthogonal_to_the_old_vector(dim):
    x, g = unit(65, dim, seed=dim), torch.randn(65, dim, dtype=D64, generator=torch.Generator().manual_seed(dim))
    t = R.riemannian_direction(x, g)
    assert (t * x).sum(-1).abs().max() <= 1e-12
    # and the retracted point: xᵀx_new = 1/sqrt(1 + s²‖t‖²) holds exactly when t ⟂ x
    s = torch.rand(65, 1, dtype=D64, generator=torch.Generator().manual_seed(1))
    new = R.retract(x, t, s)
    torch.testing.assert_close((x * new).sum(-1), 1 / torch.sqrt(1 + (s * t.norm(dim=-1, keepdim=True)) ** 2)[:, 0],
                               atol=1e-12, rtol=0)  # fmt: skip


def test_inactive_hinges_leave_every_vector_unchanged():
    u, v, n = unit(20, 8, seed=1), unit(20, 8, seed=2), unit(20, 8, seed=3)
    out = R.separate_update(u, v, n, 0.5, -3.0, "paper")  # margin below any gap: nothing active
    assert not out.active.any()
    assert torch.equal(out.u, u) and torch.equal(out.v, v) and torch.equal(out.u_neg, n)


def test_bad_step_rule_is_rejected():
    u = unit(2, 3)
    with pytest.raises(ValueError, match="step_rule"):
        R.separate_update(u, u, u, 0.1, 0.1, "adam")


# ------------------------------------------------------------------------------------------------- C++ core
@pytest.mark.parametrize("rule", R.STEP_RULES)
@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("dim", [1, 7, 63, 100, 129])
def test_cpp_steps_equal_the_reference(rule, joint, dim):
    """Triples on distinct rows: each C++ step must equal the reference's closed form (float32 rounding only)."""
    b = 40
    rows = np.arange(b)
    u = unit(2 * b, dim, seed=dim).numpy().astype(np.float32)
    v = unit(b, dim, seed=dim + 1).numpy().astype(np.float32)
    d = unit(b, dim, seed=dim + 2).numpy().astype(np.float32)
    t64 = [torch.from_numpy(x.astype(np.float64)) for x in (u[:b], v, d, u[b:])]
    m, a = 0.05, 0.3
    ut, vt, dt = u.copy(), v.copy(), d.copy()
    if joint:
        ref = R.joint_update(t64[0], t64[1], t64[2], t64[3], a, m, rule)
        _, active = _core.jose_apply_steps(ut, vt, dt, rows, rows, rows + b, rows, a, m, R.STEP_RULES.index(rule))
        torch.testing.assert_close(torch.from_numpy(dt).double(), ref.d, atol=2e-6, rtol=0)
    else:
        ref = R.separate_update(t64[0], t64[1], t64[3], a, m, rule)
        _, active = _core.jose_apply_steps(ut, vt, None, rows, rows, rows + b, None, a, m, R.STEP_RULES.index(rule))
    assert np.array_equal(active.astype(bool), ref.active.numpy())
    torch.testing.assert_close(torch.from_numpy(ut[:b]).double(), ref.u, atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.from_numpy(ut[b:]).double(), ref.u_neg, atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.from_numpy(vt).double(), ref.v, atol=2e-6, rtol=0)
    if dim > 1:
        assert 0 < active.sum() < b  # both branches exercised


def _lcg(state):
    return (state * 25214903917 + 11) & MASK64


def test_init_tables_follow_jose_c():
    vocab, docs, dim = 4, 3, 5
    u, v, d = (np.empty((r, dim), np.float32) for r in (vocab, vocab, docs))
    _core.jose_init_tables(u, v, d, 0)
    state = 1
    expected = []
    for rows in (vocab, vocab, docs):  # v (syn1neg) first, then u (syn0), then d
        table = np.empty((rows, dim), np.float32)
        for a in range(rows):
            norm = np.float32(0)
            for c in range(dim):
                state = _lcg(state)
                table[a, c] = np.float32((np.float32(state & 0xFFFF) / np.float32(65536) - 0.5) / dim)
                norm = np.float32(norm + table[a, c] * table[a, c])
            table[a] = (table[a].astype(np.float64) / np.sqrt(np.float64(norm))).astype(np.float32)
        expected.append(table)
    assert np.array_equal(v, expected[0]) and np.array_equal(u, expected[1]) and np.array_equal(d, expected[2])


@pytest.mark.parametrize("counts", [[5, 100, 30, 7, 1], [3, 1, 1], [40, *range(60, 0, -1)]])
def test_negative_table_is_jose_c_table(counts):
    size = 1000
    table = _core.jose_negative_table(np.array(counts), size)
    total = sum(c**0.75 for c in counts)
    i, d1, expected = 0, counts[0] ** 0.75 / total, []
    for a in range(size):
        expected.append(i)
        if a / size > d1:
            i += 1
            d1 += (counts[i] ** 0.75 if i < len(counts) else 0.0) / total
        i = min(i, len(counts) - 1)
    assert table.tolist() == expected


def test_single_thread_training_is_bit_identical_for_a_seed():
    docs = small_corpus()
    kw = dict(dim=16, window=3, epochs=2, min_count=1, workers=1, progress=False)
    runs = [JoSE(seed=s, **kw).fit(docs) for s in (3, 3, 4)]
    assert np.array_equal(runs[0]._u, runs[1]._u) and np.array_equal(runs[0]._v, runs[1]._v)
    assert np.array_equal(runs[0]._d, runs[1]._d)
    assert not np.array_equal(runs[0]._u, runs[2]._u)


@pytest.mark.parametrize("rule", R.STEP_RULES)
@pytest.mark.parametrize("joint", [False, True])
def test_training_keeps_unit_norms_and_lowers_the_loss(rule, joint):
    docs = small_corpus(90)
    kw = dict(dim=24, window=4, min_count=1, workers=1, step_rule=rule, joint_hinge=joint, sample=0, progress=False)
    one = JoSE(epochs=1, **kw).fit(docs)
    many = JoSE(epochs=8, **kw).fit(docs)
    assert many.loss_ < 0.8 * one.loss_  # last-epoch hinge sums: same number of pairs drawn per epoch
    for table in (many._u, many._v, many._d):
        assert np.abs(np.linalg.norm(table, axis=1) - 1).max() <= 1e-6
    # words of one topic end up closer than words of different topics
    wv = many.wv
    same = np.mean([wv.similarity(f"a{i}", f"a{i + 1}") for i in range(10)])
    cross = np.mean([wv.similarity(f"a{i}", f"b{i}") for i in range(10)])
    assert same > cross + 0.1


def test_hogwild_threads_train_every_table():
    docs = small_corpus(120)
    m = JoSE(dim=16, window=3, min_count=1, epochs=3, workers=2, progress=False).fit(docs)
    init = JoSE(dim=16, min_count=1, epochs=1, workers=1, progress=False)
    init.words = m.words
    u0, v0, d0 = init._initial_tables(len(m.words), len(docs))
    for new, old in ((m._u, u0), (m._v, v0), (m._d, d0)):
        assert np.abs(np.linalg.norm(new, axis=1) - 1).max() <= 1e-6
        assert np.abs(new[1:] - old[1:]).max() > 1e-3


def test_hogwild_threads_never_produce_nan_rows():
    """Two Hogwild threads, many seeds: every row stays finite and unit. Before the paper rule's ratios were clamped
    to their range [−1, 1], some such runs ended with NaN rows (this test failed): a window word drawn as its own
    negative (u' = u) read by one thread while another rewrote it made (h − f)/‖u − u'‖ ≈ x/0."""
    docs = small_corpus(120)
    for seed in range(40):
        m = JoSE(dim=16, window=3, min_count=1, epochs=3, workers=2, progress=False, seed=seed).fit(docs)
        for table in (m._u, m._v, m._d):
            assert np.isfinite(table).all(), seed
            assert np.abs(np.linalg.norm(table, axis=1) - 1).max() <= 1e-6, seed


@pytest.mark.parametrize("rule", ["paper", "jose_c"])
def test_step_factors_stay_in_range_when_the_ratios_degenerate(rule):
    """f − h ≠ 0 with ‖u − u'‖ = 0, or f + g ≠ 0 with ‖v + d‖ = 0, can only come from rounding or a race: the
    factors stay in their exact ranges instead of blowing up."""
    f, g, h, k = (torch.tensor([[x]], dtype=torch.float64) for x in (0.3, -0.2, 0.3 + 1e-9, -0.2 - 3e-9))
    zero = torch.zeros(1, 1, dtype=torch.float64)
    for c in R.separate_factors(f, h, zero, rule):
        assert torch.isfinite(c).all() and float(c.abs().max()) <= 2
    for c in R.joint_factors(f, g, h, k, zero, zero, rule):
        assert torch.isfinite(c).all() and float(c.abs().max()) <= 2


def test_infer_vector_recovers_the_topic_of_a_document():
    docs = small_corpus(90)
    m = JoSE(dim=24, window=4, min_count=1, epochs=10, workers=1, sample=0, progress=False).fit(docs)
    inferred = m.infer_vectors(docs[:30], epochs=20)
    assert np.abs(np.linalg.norm(inferred, axis=1) - 1).max() <= 1e-6
    sims = inferred @ m._d.T
    topic = np.arange(90) % 3
    hits = [topic[np.argsort(-sims[i])[:5]].tolist().count(i % 3) for i in range(30)]
    assert np.mean(hits) >= 4  # the nearest trained documents share the topic
    assert np.array_equal(m.infer_vector(docs[0], epochs=5), m.infer_vector(docs[0], epochs=5))
    assert m.infer_vectors([]).shape == (0, 24)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_inferred_vectors_do_not_depend_on_their_place_in_the_batch(backend):
    """A learning rate decaying over the whole batch trained its first documents ~250× more than its last."""
    docs = small_corpus(600, seed=3)
    m = JoSE(dim=16, window=3, min_count=1, epochs=1, workers=1, sample=0, progress=False, backend=backend)
    m.fit(docs[:90])
    first = m.infer_vectors(docs[:100], epochs=1, seed=5)
    batch = m.infer_vectors(docs, epochs=1, seed=5)
    alone = m.infer_vectors(docs[-100:], epochs=1, seed=5)

    def moved(inferred, chunk):  # 1 − cos to the starting vector, which a zero-epoch inference returns
        start = m.infer_vectors(chunk, epochs=1, alpha=1e-30, seed=5)
        return float(np.mean(1 - np.sum(start * inferred, axis=1)))

    ratio = moved(batch[-100:], docs[-100:]) / moved(first, docs[:100])
    assert 0.6 <= ratio <= 1.6, ratio
    assert 0.6 <= moved(batch[-100:], docs[-100:]) / moved(alone, docs[-100:]) <= 1.6
    assert np.array_equal(m.infer_vectors(docs[5:6], epochs=1, alpha=1e-30, seed=5)[0],
                          m.infer_vectors(docs[:10], epochs=1, alpha=1e-30, seed=5)[5])  # fmt: skip


def test_save_load_any_path_and_literal_end_marker(tmp_path):
    m = JoSE(dim=8, window=2, min_count=1, epochs=1, workers=1, progress=False).fit(small_corpus(12))
    path = tmp_path / "model"  # no .npz suffix: save writes exactly here
    m.save(path)
    loaded = JoSE.load(path)
    assert loaded.words == m.words and np.array_equal(loaded._u, m._u)
    np.savez(tmp_path / "old", **dict(np.load(path)))  # np.savez appends .npz, as earlier saves did
    assert np.array_equal(JoSE.load(tmp_path / "old")._u, m._u)
    corpus = tmp_path / "eos.txt"
    corpus.write_text("a b c\nd </s> e\n")
    with pytest.raises(ValueError, match=r"line 2.*</s>"):
        JoSE(dim=8, min_count=1, epochs=1, progress=False).fit(str(corpus))


# ------------------------------------------------------------------------------------------------- vocabulary
def test_file_and_token_list_encodings_agree(tmp_path):
    docs = [["b", "a", "c", "a"], [], ["c", "b", "zz", "b"], ["a", "b"]]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(" ".join(d) for d in docs) + "\n")
    from_file, from_lists = encode_file(path, 2), encode_documents(docs, 2)
    assert from_file.words == from_lists.words == ["</s>", "b", "a", "c"]  # ties by bytes descending
    assert from_file.counts.tolist() == from_lists.counts.tolist() == [4, 4, 3, 2]
    assert from_file.stream.tolist() == from_lists.stream.tolist() == [1, 2, 3, 2, 0, 0, 3, 1, 1, 0, 2, 1, 0]


# ------------------------------------------------------------------------------------------------- vectors & files
def _kv(seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "eps"]
    return KeyedVectors(words, rng.standard_normal((5, 7)).astype(np.float32))


@pytest.mark.parametrize("binary", [False, True])
def test_word2vec_format_round_trip(tmp_path, binary):
    kv = _kv()
    kv.save_word2vec_format(tmp_path / "v", binary=binary)
    back = KeyedVectors.load_word2vec_format(tmp_path / "v", binary=binary)
    assert back.index_to_key == kv.index_to_key
    assert np.array_equal(back.vectors, kv.vectors)


@pytest.mark.parametrize("binary", [False, True])
def test_word2vec_format_is_gensim_compatible(tmp_path, binary):
    gensim_models = pytest.importorskip("gensim.models")
    kv = _kv(1)
    kv.save_word2vec_format(tmp_path / "ours", binary=binary)
    theirs = gensim_models.KeyedVectors.load_word2vec_format(str(tmp_path / "ours"), binary=binary)
    assert theirs.index_to_key == kv.index_to_key
    np.testing.assert_array_equal(theirs.vectors, kv.vectors)
    theirs.save_word2vec_format(str(tmp_path / "gensim"), binary=binary)
    back = KeyedVectors.load_word2vec_format(tmp_path / "gensim", binary=binary)
    assert back.index_to_key == kv.index_to_key
    np.testing.assert_array_equal(back.vectors, kv.vectors)
    assert [w for w, _ in back.most_similar("alpha", topn=3)] == [w for w, _ in theirs.most_similar("alpha", topn=3)]


def test_most_similar_is_the_brute_force_ranking():
    kv = _kv(2)
    n = kv.vectors / np.linalg.norm(kv.vectors, axis=1, keepdims=True)
    q = (n[0] + n[1] - n[2]) / 3
    scores = n @ (q / np.linalg.norm(q))
    order = [kv.index_to_key[i] for i in np.argsort(-scores) if i not in (0, 1, 2)]
    got = kv.most_similar(positive=["alpha", "beta"], negative=["gamma"], topn=2)
    assert [w for w, _ in got] == order[:2]
    assert abs(got[0][1] - scores[kv.get_index(order[0])]) < 1e-6
    with pytest.raises(KeyError, match="nope"):
        kv.most_similar("nope")


def test_rank_correlation_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.standard_normal(40)
    assert abs(np.corrcoef(_ranks(a), _ranks(b))[0, 1] - stats.spearmanr(a, b).statistic) < 1e-12


def test_evaluate_word_similarity_on_a_planted_table(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(30)]
    vec = rng.standard_normal((30, 5)).astype(np.float32)
    kv = KeyedVectors(words, vec)
    lines = ["# header"]
    for i in range(0, 28, 2):
        lines.append(f"W{i}\tw{i + 1}\t{kv.similarity(f'w{i}', f'w{i + 1}') * 10:.4f}")
    lines.append("w0\tunknown\t3.0")
    pairs.write_text("\n".join(lines) + "\n")
    res = evaluate_word_similarity(kv, str(pairs))
    assert res.pairs == 14 and abs(res.oov_ratio - 1 / 15) < 1e-12 and res.spearman > 0.999


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        JoSE(progress=False).fit([])
    with pytest.raises(ValueError, match="empty"):
        JoSE(progress=False).fit([[], []])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        JoSE(progress=False).fit(empty)
    with pytest.raises(ValueError, match="min_count=5"):
        JoSE(progress=False).fit([["a", "b", "c"]])
    with pytest.raises(ValueError, match="dim"):
        JoSE(dim=0)
    with pytest.raises(ValueError, match="margin"):
        JoSE(margin=0)
    with pytest.raises(ValueError, match="margin"):
        JoSE(margin=-0.1)
    with pytest.raises(ValueError, match="window"):
        JoSE(window=0)
    with pytest.raises(ValueError, match="step_rule"):
        JoSE(step_rule="official")
    with pytest.raises(TypeError, match="dim"):
        JoSE(dim=10.5)
    with pytest.raises(ValueError, match="device"):
        JoSE(device="tpu")
    with pytest.raises(TypeError, match=r"corpus\[0\]"):
        JoSE(progress=False).fit(["not", "token", "lists"])
    with pytest.raises(ValueError, match="not a file"):
        JoSE(progress=False).fit(tmp_path / "missing.txt")
    with pytest.raises(RuntimeError, match="fit"):
        _ = JoSE().wv
    with pytest.raises(NotImplementedError, match="C\\+\\+ backend runs on CPU"):
        JoSE(backend="cpp", device="cuda", progress=False).fit(small_corpus())  # explicit: never a silent fallback
    bad_table = np.zeros((3, 4), np.float64)
    with pytest.raises(ValueError, match="float32"):
        _core.jose_init_tables(bad_table, bad_table, bad_table, 0)


# ------------------------------------------------------------------------------------------------- quality (slow)
def _have_offline_sources():
    from kexue_fast.datasets.offline import available_sources

    have = available_sources()
    return have["gcide"] and have["wordnet"] and have["gensim"]


offline = pytest.mark.skipif(not _have_offline_sources(),
                             reason="needs `apt-get install -y wordnet-base dict-gcide` and gensim")  # fmt: skip


@pytest.fixture(scope="module")
def offline_path():
    from kexue_fast.datasets import offline_corpus

    return offline_corpus()


def _fit_offline(path, rule, workers=2):
    return JoSE(dim=100, window=10, negative=2, margin=0.15, min_count=5, epochs=3, step_rule=rule, workers=workers,
                progress=False).fit(path)  # fmt: skip


@pytest.mark.slow
@offline
def test_paper_rule_word_table_quality(offline_path):
    m = _fit_offline(offline_path, "paper")
    assert evaluate_word_similarity(m.wv, "wordsim353").spearman >= 0.60
    assert evaluate_word_similarity(m.wv, "simlex999").spearman >= 0.33


@pytest.mark.slow
@offline
def test_jose_c_rule_context_table_reproduces_the_official_scores(offline_path):
    m = _fit_offline(offline_path, "jose_c")
    assert abs(evaluate_word_similarity(m.cv, "wordsim353").spearman - 0.58) <= 0.03
    assert abs(evaluate_word_similarity(m.cv, "simlex999").spearman - 0.34) <= 0.03


@pytest.mark.slow
def test_newsgroup_doc_vectors_3nn_accuracy():
    pytest.importorskip("gensim")
    from kexue_fast.datasets import mini_newsgroup
    from kexue_fast.datasets.offline import gensim_documents
    from kexue_fast.jose.docs import knn_predict

    docs, labels, _ = mini_newsgroup()
    filler = list(gensim_documents())
    # one worker: deterministic (seeds 0, 1, 2 give 0.945, 0.875, 0.905 here)
    m = JoSE(dim=100, window=5, min_count=3, epochs=20, workers=1, seed=0, progress=False).fit(docs + filler)
    dv = m._d[: len(docs)]
    pred = knn_predict(dv, np.array(labels), dv, k=3, exclude_self=True)
    assert (pred == np.array(labels)).mean() >= 0.85


# ------------------------------------------------------------------------------------------------- doc helpers
def test_spherical_kmeans_and_knn_recover_planted_directions():
    from kexue_fast.jose.docs import knn_predict, spherical_kmeans

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16))
    labels = np.repeat(np.arange(3), 21)
    x = centres[labels] + 0.3 * rng.standard_normal((63, 16))
    res = spherical_kmeans(x, 3, seed=1)
    # the found partition equals the planted one up to relabelling
    pairs = {(int(a), int(b)) for a, b in zip(res.labels, labels)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3
    assert np.allclose(np.linalg.norm(res.centers, axis=1), 1)
    assert (knn_predict(x, labels, x, k=3, exclude_self=True) == labels).all()
    train = np.r_[0:15, 21:36, 42:57]
    query = np.setdiff1d(np.arange(63), train)
    assert (knn_predict(x[train], labels[train], x[query], k=1) == labels[query]).all()
    with pytest.raises(ValueError, match="k must be"):
        spherical_kmeans(x, 0)
    with pytest.raises(ValueError, match="zero row"):
        knn_predict(np.zeros((3, 2)), np.arange(3), np.ones((1, 2)))
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(x, labels[:5], x)


# ------------------------------------------------------------------------------------------------- jose.c replay
def _jose_c_replay(stream, counts, n_docs, dim, window, negative, epochs, alpha0, sample, margin, table_size, seed=0):
    """jose.c's single-thread training loop (TrainModelThread), transcribed statement by statement in float32 numpy:
    the same LCG draws in the same order, sentence reading, sub-sampling, dynamic window, negative table, 10k-word
    learning-rate steps and update order. Returns (u, v, d)."""
    f32 = np.float32
    vocab = len(counts)
    u, v, d = (np.empty((r, dim), np.float32) for r in (vocab, vocab, n_docs))
    _core.jose_init_tables(u, v, d, seed)  # init checked separately (test_init_tables_follow_jose_c)
    table = _core.jose_negative_table(np.asarray(counts), table_size)
    train_words = int(sum(counts))
    st = f32(f32(sample) * f32(train_words))
    keep = [f32((np.sqrt(np.float64(f32(c) / st)) + 1) * np.float64(st) / max(c, 1)) for c in counts]
    state = 0
    length = len(stream)

    def rnd():
        nonlocal state
        state = _lcg(state)
        return state

    def negative_for(word):
        r = rnd()
        target = int(table[(r >> 16) % table_size])
        if target == 0:
            target = r % (vocab - 1) + 1
        return None if target == word else target

    def step(x, direction, scale):
        x += f32(scale) * direction
        x /= f32(np.sqrt(f32((x * x).sum(dtype=np.float32))))

    def hinge(uu, vv, nn, a):  # the word–context / word–document block of jose.c (step rule jose_c)
        f = f32((u[uu] * vv).sum(dtype=np.float32))
        h = f32((u[nn] * vv).sum(dtype=np.float32))
        if not f - h < f32(margin):
            return
        neu1e = u[uu] - f * vv + h * vv - u[nn]
        step(u[uu], vv - f * u[uu], a * (f32(1) - f))
        step(u[nn], h * u[nn] - vv, a * (f32(2) * h))
        step(vv, neu1e, a * (f32(1) - (f - h)))

    alpha, word_count_actual = f32(alpha0), 0
    pos = doc = word_count = last_word_count = 0
    sen, sentence_position, local_iter = [], 0, epochs
    while True:
        if word_count - last_word_count > 10000:
            word_count_actual += word_count - last_word_count
            last_word_count = word_count
            alpha = f32(alpha0) * (f32(1) - f32(word_count_actual) / f32(epochs * length + 1))
            alpha = max(alpha, f32(alpha0 * 0.0001))
        eof = False
        if not sen:
            sentence_doc = doc
            while True:
                if pos >= length:
                    eof = True
                    break
                w = int(stream[pos])
                pos += 1
                word_count += 1
                if w == 0:
                    doc += 1
                    break
                if sample > 0 and keep[w] < f32(rnd() & 0xFFFF) / f32(65536):
                    continue
                sen.append(w)
                if len(sen) >= 1000:  # MAX_SENTENCE_LENGTH: the document goes on in the next sentence
                    break
            sentence_position = 0
        if eof:
            word_count_actual += word_count - last_word_count
            local_iter -= 1
            if local_iter == 0:
                return u, v, d
            word_count = last_word_count = pos = doc = 0
            sen = []
            continue
        if not sen:
            continue
        word = sen[sentence_position]
        b = rnd() % window
        for a in range(b, 2 * window + 1 - b):
            c = sentence_position - window + a
            if a == window or c < 0 or c >= len(sen):
                continue
            for _ in range(negative):
                target = negative_for(word)
                if target is not None:
                    hinge(sen[c], v[word], target, alpha)
        for _ in range(negative):
            target = negative_for(word)
            if target is not None:
                hinge(word, d[sentence_doc], target, alpha)
        sentence_position += 1
        if sentence_position >= len(sen):
            sen = []


# margin 2.5: every hinge active; α = 0.01: no hinge decision lies within rounding of the margin. (At α = 0.04 and
# m = 0.15 a decision flips on float32 summation order after a few thousand words, and the tables then diverge.)
@pytest.mark.parametrize("margin, alpha", [(2.5, 0.04), (0.15, 0.01)])
def test_cpp_trainer_replays_jose_c_single_thread(margin, alpha):
    """The C++ trainer (jose_c rule, one thread) against the statement-level replay: only float32 summation order
    differs, so every table agrees to float32 noise after 2 epochs over > 10k words (learning-rate steps included)."""
    rng = np.random.default_rng(7)
    docs = [[f"w{int(z)}" for z in rng.zipf(1.4, size=rng.integers(3, 40)) if z < 300] for _ in range(500)]
    docs.insert(250, [f"w{int(z)}" for z in rng.integers(1, 60, size=2500)])  # > 1000 words: split into sentences
    enc = encode_documents(docs, 3)
    assert len(enc.stream) > 10000
    dim, window, negative, epochs, sample, table = 8, 3, 2, 2, 1e-2, 4096
    ru, rv, rd = _jose_c_replay(enc.stream, enc.counts.tolist(), enc.n_docs, dim, window, negative, epochs, alpha,
                                sample, margin, table)  # fmt: skip
    u, v, d = (np.empty_like(x) for x in (ru, rv, rd))
    _core.jose_init_tables(u, v, d, 0)
    _core.jose_train(enc.stream, enc.counts, enc.n_docs, u, v, d, window=window, negative=negative, epochs=epochs,
                     threads=1, margin=margin, alpha=alpha, sample=sample, step_rule=1, joint=False,
                     update_words=True, seed=0, table_size=table)  # fmt: skip
    u0 = np.empty_like(u)
    _core.jose_init_tables(u0, np.empty_like(v), np.empty_like(d), 0)
    assert np.abs(u - u0).max() > 0.1  # training moved the tables
    for ours, replay in ((u, ru), (v, rv), (d, rd)):
        np.testing.assert_allclose(ours, replay, atol=5e-5)


def test_model_save_load_round_trip(tmp_path):
    docs = small_corpus(30)
    m = JoSE(dim=8, window=2, min_count=1, epochs=1, workers=1, step_rule="jose_c", progress=False).fit(docs)
    m.save(tmp_path / "model.npz")
    back = JoSE.load(tmp_path / "model.npz")
    assert back.step_rule == "jose_c" and back.dim == 8 and back.words == m.words
    for a, b in ((m._u, back._u), (m._v, back._v), (m._d, back._d)):
        assert np.array_equal(a, b)
    assert back.most_similar("a1", topn=3) == m.most_similar("a1", topn=3)
    assert np.array_equal(back.infer_vector(docs[0], epochs=2), m.infer_vector(docs[0], epochs=2))


# ------------------------------------------------------------------------------------- fixes from an audit
def test_trainer_refuses_tokens_after_the_last_document_end():
    """Tokens after the stream's last 0 trained against document row n_docs, one past d's end (a write outside it)."""
    counts = np.array([1, 600, 600], dtype=np.int64)
    u, v, d = (np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32), np.zeros((1, 4), np.float32))
    _core.jose_init_tables(u, v, d, 0)
    for stream, n_docs in (([1, 2] * 600 + [0] + [1, 2] * 600, 1), ([1, 2] * 600, 0)):
        with pytest.raises(ValueError, match="must end with 0"):
            _core.jose_train(np.array(stream, np.int32), counts, n_docs, u, v, d[:n_docs], window=2, negative=2,
                             epochs=1, threads=1, margin=0.15, alpha=0.04, sample=0.0, step_rule=0, joint=False,
                             update_words=True, seed=0, progress=None, decay=True)  # fmt: skip


@pytest.mark.parametrize("table_size", [7, 1000, 100_003])
def test_negative_table_built_word_by_word_is_the_slot_loops(table_size):
    """The table is built per word (O(V + size/1024)); jose.c's loop over slots, replayed here, is the truth,
    words of tiny shares included (several advance on consecutive slots, some get none)."""
    rng = np.random.default_rng(table_size)
    for _ in range(5):
        counts = np.concatenate([[rng.integers(1, 50)], rng.choice([1, 2, 3, 10**6, 10**8], size=rng.integers(2, 300))])
        table = _core.jose_negative_table(counts, table_size).tolist()
        pw = counts.astype(np.float64) ** 0.75
        total = 0.0
        for x in pw:
            total += x
        i, d1, expected = 0, pw[0] / total, []
        for a in range(table_size):
            expected.append(i)
            if a / table_size > d1:
                i += 1
                d1 += (pw[i] if i < len(counts) else 0.0) / total
            i = min(i, len(counts) - 1)
        assert table == expected


def test_corpora_that_are_not_utf8_train_and_keep_their_bytes(tmp_path):
    """A Latin-1 file raised UnicodeDecodeError (no file, no line) and token lists with surrogateescape tokens a
    UnicodeEncodeError; jose.c takes any bytes. The words keep their bytes through word2vec files."""
    path = tmp_path / "latin1.txt"
    path.write_bytes("café bar café\nbar café thé\n".encode("latin-1"))
    m = JoSE(dim=4, window=2, min_count=1, epochs=1, workers=1, progress=False).fit(str(path))
    assert "caf\udce9" in m.wv.key_to_index and "th\udce9" in m.wv.key_to_index
    docs = [w.split() for w in path.read_bytes().decode("utf-8", "surrogateescape").splitlines()]
    listed = JoSE(dim=4, window=2, min_count=1, epochs=1, workers=1, progress=False).fit([*docs, ["\ud800"]])
    assert "\ud800" in listed.words
    out = tmp_path / "vectors.txt"
    m.wv.save_word2vec_format(out)
    assert "café".encode("latin-1") + b" " in out.read_bytes()
    assert KeyedVectors.load_word2vec_format(out).index_to_key == m.wv.index_to_key
    m.save(tmp_path / "m.npz")
    assert JoSE.load(tmp_path / "m.npz").words == m.words


def test_save_keeps_any_word_without_padding(tmp_path):
    """Words were saved as a fixed-width string array: one long word padded every word to its length (×4 bytes a
    character), and words ending in NUL could not be saved."""
    docs = small_corpus(30) + [["x" * 20000, "nul\0", "\udcff", "\ud800z"]] * 2
    m = JoSE(dim=4, window=2, min_count=2, epochs=1, workers=1, progress=False).fit(docs)
    m.save(tmp_path / "m.npz")
    back = JoSE.load(tmp_path / "m.npz")
    assert back.words == m.words and "nul\0" in back.words
    assert (tmp_path / "m.npz").stat().st_size < 4 * len(m.words) * 20000 // 10


def test_inference_refuses_tokens_that_are_not_str():
    m = JoSE(dim=4, window=2, min_count=1, epochs=1, workers=1, progress=False).fit(small_corpus(12))
    with pytest.raises(TypeError, match="document 0 holds a int token"):
        m.infer_vector([1, 2, 3])
    with pytest.raises(TypeError, match="document 1 holds a bytes token"):
        m.infer_vectors([["a1"], [b"a1"]])


def test_one_dimensional_tables_have_no_nan_rows():
    """dim = 1: a coordinate drawn exactly 0 (1 in 65536) made a 0/0 row, NaN for good; such rows are drawn again."""
    u, v = np.empty((200_000, 1), np.float32), np.empty((200_000, 1), np.float32)
    _core.jose_init_tables(u, v, np.empty((0, 1), np.float32), 0)
    assert np.array_equal(np.abs(u), np.ones_like(u)) and np.array_equal(np.abs(v), np.ones_like(v))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"alpha": 1e39}, "alpha must lie in float32"), ({"margin": 1e-45}, "margin must lie in float32"),
     ({"seed": 2**64}, "seed must be in"), ({"negative": 2**31}, "negative must be in"),
     ({"window": 2**31}, "window must be in"), ({"alpha": 1e20}, "alpha must be at most 1e\\+06")],
)  # fmt: skip
def test_hyperparameters_beyond_the_trainers_types_are_refused(kwargs, match):
    """float32 and int32 arguments: alpha = 1e39 became inf (NaN tables), seed = 2**64 an opaque pybind TypeError."""
    with pytest.raises(ValueError, match=match):
        JoSE(**kwargs)
    JoSE(seed=2**64 - 1)


@pytest.mark.parametrize("scale", [1e20, 1e-24])
def test_cosines_of_extreme_vectors(scale):
    """Norms were taken in float32: squares overflowed at 1e20 (cosine 0) and underflowed at 1e-24."""
    kv = KeyedVectors(["a", "b"], np.array([[3.0, 4.0], [4.0, 4.0]], np.float32) * np.float32(scale))
    assert kv.similarity("a", "b") == pytest.approx(28 / (5 * np.sqrt(32)), rel=1e-6)


def test_spherical_kmeans_checks_its_iteration_counts():
    from kexue_fast.jose import spherical_kmeans

    x = unit(12, 3).numpy()
    for name in ("max_iter", "n_init"):
        with pytest.raises(ValueError, match=name):
            spherical_kmeans(x, 2, **{name: 0})
    assert (spherical_kmeans(x, 2, max_iter=1, n_init=1).labels >= 0).all()


def test_keyed_vectors_take_row_indices_and_topn_none_as_gensim():
    """wv[0] raised KeyError and most_similar(topn=None) TypeError, where gensim returns the row and every score."""
    vectors = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    kv = KeyedVectors(["a", "b", "c", "d"], vectors)
    assert np.array_equal(kv[0], vectors[0]) and np.array_equal(kv[np.int64(3)], vectors[3])
    with pytest.raises(KeyError):
        kv[4]
    scores = kv.most_similar("a", topn=None)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert scores.shape == (4,) and np.allclose(scores, unit @ unit[0], atol=1e-6)
    with pytest.raises(ValueError, match="topn must be an int >= 1 or None"):
        kv.most_similar("a", topn=0)


def test_deterministic_mode_refuses_the_timing_dependent_trainers():
    """torch.use_deterministic_algorithms(True) raised nowhere: JoSE(workers=2) ran and two fits differed. Now the
    Hogwild trainer with workers > 1 raises as torch's nondeterministic ops do (a warning with warn_only=True), and
    workers=1 trains, bit-reproducibly."""
    corpus = [["a", "b", "c", "a"], ["b", "c", "d"], ["a", "d", "b"]] * 4
    make = lambda workers: JoSE(dim=4, min_count=1, epochs=1, workers=workers, progress=False)  # noqa: E731
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match=r"workers=2 .*deterministic.*pass workers=1"):
            make(2).fit(corpus)
        first, second = make(1).fit(corpus), make(1).fit(corpus)
        assert np.array_equal(first.wv.vectors, second.wv.vectors)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="deterministic"):
            make(2).fit(corpus)
    finally:
        torch.use_deterministic_algorithms(before)
