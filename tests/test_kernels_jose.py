"""The JoSE Triton kernels (kernels/jose.py) against the reference algebra and their torch twins (interpreted on CPU
at small shapes), and the mini-batch trainer end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kexue_fast.jose import JoSE
from kexue_fast.jose import reference as R
from kexue_fast.jose.batched import joint_step_torch, retract_torch, separate_step_torch
from kexue_fast.jose.docs import knn_predict

pytest.importorskip("triton")
from kexue_fast.kernels import jose as K

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Thousands of small batches: intra-op threads only add contention on a shared CPU (and change nothing else)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(rows, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype=dtype, device=DEV)


def _retract_all(x, dx, rows):
    K.retract(x, dx, torch.unique(rows))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", R.STEP_RULES)
@pytest.mark.parametrize("dim", [1, 7, 63, 64])
def test_separate_kernel_on_distinct_rows_is_the_reference_update(dtype, rule, dim):
    b = 37
    u, v = unit(2 * b, dim, dtype, dim), unit(b, dim, dtype, dim + 1)
    ui = torch.arange(b, device=DEV)
    ni = ui + b
    ref = R.separate_update(u[:b].double(), v.double(), u[b:].double(), 0.3, 0.05, rule)
    du, dv = torch.zeros_like(u), torch.zeros_like(v)
    loss = K.separate_step(u, v, du, dv, ui, ui, ni, 0.3, 0.05, rule)
    _retract_all(u, du, torch.cat([ui, ni]))
    _retract_all(v, dv, ui)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(u[:b].double(), ref.u, atol=tol, rtol=0)
    torch.testing.assert_close(u[b:].double(), ref.u_neg, atol=tol, rtol=0)
    torch.testing.assert_close(v.double(), ref.v, atol=tol, rtol=0)
    torch.testing.assert_close(loss.double(), ref.loss, atol=tol, rtol=0)
    assert not du.any() and not dv.any()  # the retraction clears the deltas


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", R.STEP_RULES)
@pytest.mark.parametrize("dim", [2, 33, 64])
def test_joint_kernel_on_distinct_rows_is_the_reference_update(dtype, rule, dim):
    b = 29
    u, v, d = unit(2 * b, dim, dtype, 3 * dim), unit(b, dim, dtype, 3 * dim + 1), unit(b, dim, dtype, 3 * dim + 2)
    i = torch.arange(b, device=DEV)
    ref = R.joint_update(u[:b].double(), v.double(), d.double(), u[b:].double(), 0.2, 0.1, rule)
    du, dv, dd = torch.zeros_like(u), torch.zeros_like(v), torch.zeros_like(d)
    K.joint_step(u, v, d, du, dv, dd, i, i, i, i + b, 0.2, 0.1, rule)
    _retract_all(u, du, torch.cat([i, i + b]))
    _retract_all(v, dv, i)
    _retract_all(d, dd, i)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for got, exp in ((u[:b], ref.u), (u[b:], ref.u_neg), (v, ref.v), (d, ref.d)):
        torch.testing.assert_close(got.double(), exp, atol=tol, rtol=0)


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("move_words", [True, False])
def test_kernels_with_shared_rows_match_the_torch_twin(joint, move_words):
    """Collisions inside a batch: both sum the steps of every triple into the deltas (float32 vs float64 truth)."""
    dim, b, vocab = 17, 61, 9
    g = torch.Generator().manual_seed(5)
    idx = [torch.randint(0, vocab, (b,), generator=g).to(DEV) for _ in range(4)]
    tables = [unit(vocab, dim, torch.float64, 90 + i) for i in range(3)]
    results = {}
    for name, dtype in (("triton", torch.float32), ("torch32", torch.float32), ("truth", torch.float64)):
        u, v, d = (t.to(dtype).clone() for t in tables)
        du, dv, dd = torch.zeros_like(u), torch.zeros_like(v), torch.zeros_like(d)
        if joint:
            step = K.joint_step if name == "triton" else joint_step_torch
            step(u, v, d, du, dv, dd, idx[0], idx[1], idx[2], idx[3], 0.1, 0.2, "paper", move_words)
        else:
            step = K.separate_step if name == "triton" else separate_step_torch
            step(u, v, du, dv, idx[0], idx[1], idx[3], 0.1, 0.2, "paper", move_words)
        retract = K.retract if name == "triton" else retract_torch
        for x, dx in ((u, du), (v, dv), (d, dd)):
            retract(x, dx, torch.arange(vocab, device=DEV))
        results[name] = torch.cat([u, v, d]).double()
    err_triton = (results["triton"] - results["truth"]).abs().max()
    err_torch = (results["torch32"] - results["truth"]).abs().max()
    assert err_triton <= 2 * err_torch + 1e-6
    assert (results["truth"] - torch.cat(tables)).abs().max() > 1e-3  # something moved


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_triples_whose_negative_is_the_centre_word_do_nothing(joint, backend):
    """centre= skips a triple whose negative equals its centre word (as jose.c does) inside the step: the deltas
    and hinges equal those of the step on the other triples alone, and the skipped triples' hinges are 0."""
    g = torch.Generator().manual_seed(11)
    b, vocab, dim = 64, 12, 9
    ui, vi, di, ni, cw = (torch.randint(0, vocab, (b,), generator=g).to(DEV) for _ in range(5))
    ni[::3] = cw[::3]  # a third of the negatives collide with the centre word
    keep = ni != cw
    tables = [unit(vocab, dim, torch.float64, 40 + i) for i in range(3)]
    if backend == "triton":
        sep, joi = K.separate_step, K.joint_step
    else:
        sep, joi = separate_step_torch, joint_step_torch
    out = []
    for skip in (True, False):
        u, v, d = (t.clone() for t in tables)
        du, dv, dd = torch.zeros_like(u), torch.zeros_like(v), torch.zeros_like(d)
        sel = slice(None) if skip else keep
        extra = {"centre": cw} if skip else {}
        if joint:
            loss = joi(u, v, d, du, dv, dd, ui[sel], vi[sel], di[sel], ni[sel], 0.1, 0.3, "paper", True, **extra)
        else:
            loss = sep(u, v, du, dv, ui[sel], vi[sel], ni[sel], 0.1, 0.3, "paper", True, **extra)
        out.append((du, dv, dd, loss))
    (du1, dv1, dd1, loss1), (du2, dv2, dd2, loss2) = out
    for a, c in ((du1, du2), (dv1, dv2), (dd1, dd2), (loss1[keep], loss2)):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0)
    assert not loss1[~keep].any() and loss2.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retract_of_a_row_list_with_repeats_equals_the_unique_retraction(dtype):
    """unique=False (the trainer's path: no sort, no sync) on a list where rows repeat: the same tables as retracting
    the unique rows, untouched rows unchanged, every listed delta cleared; the torch path likewise."""
    g = torch.Generator().manual_seed(5)
    x0 = unit(40, 33, dtype, 7)
    dx0 = (torch.randn(40, 33, generator=g, dtype=torch.float64) * 0.1).to(dtype=dtype, device=DEV)
    rows = torch.randint(0, 25, (300,), generator=g).to(DEV)  # repeats, and rows 25..39 never listed
    x_ref, dx_ref = x0.clone(), dx0.clone()
    K.retract(x_ref, dx_ref, torch.unique(rows))
    for retract in (K.retract, retract_torch):
        x, dx = x0.clone(), dx0.clone()
        retract(x, dx, rows, unique=False)
        torch.testing.assert_close(x, x_ref, atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=0)
        assert not dx[rows].any()
        assert torch.equal(dx[25:], dx0[25:]) and torch.equal(x[25:], x0[25:])


def test_bad_kernel_inputs_are_rejected():
    u = torch.zeros(4, 3, device=DEV)
    i = torch.zeros(2, dtype=torch.int64, device=DEV)
    with pytest.raises(TypeError, match="du"):
        K.separate_step(u, u, u.double(), u, i, i, i, 0.1, 0.1, "paper")
    with pytest.raises(ValueError, match="contiguous"):
        K.retract(u.t(), u, i)
    with pytest.raises(ValueError, match="centre must hold one word per triple"):
        K.separate_step(u, u, u.clone(), u.clone(), i, i, i, 0.1, 0.1, "paper", centre=torch.zeros_like(u[:, 0]).long())
    # shapes the kernels trust (a delta buffer smaller than its table was written past its end)
    with pytest.raises(ValueError, match=r"du must have u's shape \(4, 3\)"):
        K.separate_step(u, u, u[:1].clone(), u.clone(), i, i, i, 0.1, 0.1, "paper")
    with pytest.raises(ValueError, match="v must have 3 columns"):
        K.separate_step(u, torch.zeros(4, 5, device=DEV), u.clone(), torch.zeros(4, 5, device=DEV), i, i, i, 0.1,
                        0.1, "paper")  # fmt: skip
    with pytest.raises(ValueError, match="ni must hold 2 indices"):
        K.separate_step(u, u, u.clone(), u.clone(), i, i, i[:1], 0.1, 0.1, "paper")
    with pytest.raises(ValueError, match="dd must have d's shape"):
        K.joint_step(u, u, u, u.clone(), u.clone(), u[:2].clone(), i, i, i, i, 0.1, 0.1, "paper")
    with pytest.raises(TypeError, match="rows must be an int32 or int64"):
        K.retract(u, u.clone(), i.float())


def _topic_corpus(n_docs, topics=4, words=30, length=30, seed=0):
    rng = np.random.default_rng(seed)
    vocab = [[f"t{t}_{i}" for i in range(words)] for t in range(topics)]
    return [[str(rng.choice(vocab[k % topics])) for _ in range(length)] for k in range(n_docs)]


@pytest.mark.parametrize("joint", [False, True])
def test_torch_minibatch_trainer_learns_topics(joint):
    docs = _topic_corpus(160)
    m = JoSE(dim=32, window=3, min_count=1, epochs=5, sample=0, joint_hinge=joint, backend="torch", batch_size=1024,
             progress=False).fit(docs)  # fmt: skip
    assert m.backend_ == "torch"
    for table in (m._u, m._v, m._d):
        assert np.abs(np.linalg.norm(table, axis=1) - 1).max() <= 1e-5
    topic = np.arange(160) % 4
    # leave-one-out 1-NN of the document vectors recovers the planted topic (chance: 0.25)
    assert (knn_predict(m._d, topic, m._d, k=1, exclude_self=True) == topic).mean() >= 0.9
    inferred = m.infer_vectors(docs[:8], epochs=10)
    assert inferred.shape == (8, 32) and np.abs(np.linalg.norm(inferred, axis=1) - 1).max() <= 1e-5
    nearest = np.argmax(inferred @ m._d.T, axis=1)
    assert (topic[nearest] == topic[:8]).mean() >= 0.75


def test_triton_minibatch_trainer_runs_and_matches_torch_semantics():
    docs = _topic_corpus(12, topics=2, words=8, length=12)
    kw = dict(dim=8, window=2, min_count=1, epochs=1, sample=0, batch_size=256, seed=3, progress=False)
    tri = JoSE(backend="triton", device=DEV, **kw).fit(docs)
    ref = JoSE(backend="torch", device=DEV, **kw).fit(docs)
    assert tri.backend_ == "triton"
    # same triples (same generator), float32 atomics vs index_add_: equal up to summation order
    np.testing.assert_allclose(tri._u, ref._u, atol=1e-5)
    np.testing.assert_allclose(tri._d, ref._d, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_trainer_matches_cpu_word_similarity():
    from kexue_fast.datasets import offline_corpus
    from kexue_fast.datasets.offline import available_sources
    from kexue_fast.jose.evaluation import evaluate_word_similarity

    if not all(available_sources().values()):
        pytest.skip("needs `apt-get install -y wordnet-base dict-gcide` and gensim")
    path = offline_corpus()
    kw = dict(dim=100, window=10, negative=2, margin=0.15, min_count=5, epochs=3, progress=False)
    cpu = JoSE(device="cpu", **kw).fit(path)
    gpu = JoSE(device="cuda", **kw).fit(path)
    for ds in ("wordsim353", "simlex999"):
        a = evaluate_word_similarity(cpu.wv, ds).spearman
        b = evaluate_word_similarity(gpu.wv, ds).spearman
        assert abs(a - b) <= 0.03, (ds, a, b)
