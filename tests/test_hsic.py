import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import kexue_fast
from kexue_fast.hsic import reference as R

D64 = torch.float64
VARIANTS = [("biased", R.hsic_biased, False), ("biased", R.hsic_biased, True), ("unbiased", R.hsic_unbiased, False),
            ("unbiased", R.hsic_unbiased, True)]  # fmt: skip


def _data(n, dx, dy, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=dtype)
    y = torch.randn(n, dy, generator=g, dtype=dtype) + torch.sin(x[:, :1])
    return x, y


def _naive(x, y, kernel, sx, sy, fn, normalized):
    k, lm = R.gram(x.double(), kernel, sx), R.gram(y.double(), kernel, sy)
    return R.normalized(fn, k, lm) if normalized else fn(k, lm)


BACKENDS = ["torch", "cpp"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [4, 5, 31, 32, 33, 127, 128, 129, 1000])
@pytest.mark.parametrize("dx, dy", [(1, 3), (17, 1), (3, 17)])
def test_tile_edges_every_variant_equals_materialized(n, dx, dy, backend):
    x, y = _data(n, dx, dy, seed=n)
    sx, sy = kexue_fast.median_bandwidth(x), kexue_fast.median_bandwidth(y)
    for estimator, fn, normalized in VARIANTS:
        ours = kexue_fast.hsic(x, y, estimator=estimator, normalize=normalized, tile=32, backend=backend)
        ref = _naive(x, y, "gaussian", sx, sy, fn, normalized)
        assert abs(float(ours - ref)) <= 1e-10 * max(abs(float(ref)), 1e-12), (estimator, normalized)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["gaussian", "laplace", "imq", "linear"])
def test_kernels_equal_materialized(kernel, backend):
    x, y = _data(70, 4, 2, seed=1)
    for estimator, fn, normalized in VARIANTS:
        ours = kexue_fast.hsic(x, y, kernel_x=kernel, bandwidth_x=1.7, bandwidth_y=0.6, estimator=estimator,
                               normalize=normalized, tile=16, backend=backend)  # fmt: skip
        ref = _naive(x, y, kernel, 1.7, 0.6, fn, normalized)
        assert abs(float(ours - ref)) <= 1e-10 * abs(float(ref))


def test_reference_against_definitions():
    """The reference itself, from other formulas than its own: each kernel's values at hand-computed distances,
    HSIC_b by Gretton et al.'s (2005) three sums, HSIC_u as the U-statistic over distinct quadruples (Song et al.
    2012), whose closed form the reference (and so every fast path) uses; hyppo checks only the Gaussian case."""
    import itertools

    pts = torch.tensor([[0.0], [3.0], [4.0]], dtype=D64)  # distances 3, 4 and 1
    d = torch.tensor([[0, 3, 4], [3, 0, 1], [4, 1, 0]], dtype=D64)
    expected = {"gaussian": torch.exp(-(d**2) / (2 * 2.0**2)), "laplace": torch.exp(-d / 2.0),
                "imq": (1 + d**2 / 2.0**2) ** -0.5, "linear": pts @ pts.T}  # fmt: skip
    for kernel, values in expected.items():
        torch.testing.assert_close(R.gram(pts, kernel, 2.0), values, rtol=1e-15, atol=0)
    assert float(R.gram(pts, "imq", 2.0)[0, 1]) == pytest.approx(1 / math.sqrt(1 + 9 / 4), rel=1e-15)
    x, y = _data(7, 2, 1, seed=4)
    k, lm = R.gram(x, "gaussian", 1.1), R.gram(y, "laplace", 0.7)
    n = k.shape[0]
    three_sums = (k * lm).sum() / n**2 - 2 * (k @ lm).sum() / n**3 + k.sum() * lm.sum() / n**4
    assert float(R.hsic_biased(k, lm)) == pytest.approx(float(three_sums), rel=1e-12)

    def h(i, j, q, r):  # the kernel of the U-statistic, symmetrized over the 24 orders
        return sum(k[t, u] * (lm[t, u] + lm[v, w] - 2 * lm[t, v])
                   for t, u, v, w in itertools.permutations((i, j, q, r))) / 24  # fmt: skip

    quads = list(itertools.permutations(range(n), 4))
    u_statistic = sum(float(h(*quad)) for quad in quads) / len(quads)
    assert float(R.hsic_unbiased(k, lm)) == pytest.approx(u_statistic, rel=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_kernel_for_labels(backend):
    x, _ = _data(90, 3, 1, seed=2)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    sx = kexue_fast.median_bandwidth(x)
    k, lm = R.gram(x, "gaussian", sx), R.gram(labels, "delta")
    for estimator, fn, normalized in VARIANTS:
        ours = kexue_fast.hsic(x, labels, kernel_y="delta", estimator=estimator, normalize=normalized, tile=32,
                               backend=backend)  # fmt: skip
        ref = R.normalized(fn, k, lm) if normalized else fn(k, lm)
        assert abs(float(ours - ref)) <= 1e-10 * abs(float(ref))


@pytest.mark.parametrize("n", [50, 300, 2000])
def test_equals_hyppo_statistic(n):
    hyppo = pytest.importorskip("hyppo.independence")
    rng = np.random.default_rng(n)
    xa = rng.normal(size=(n, 3))
    ya = xa[:, :2] ** 2 + rng.normal(size=(n, 2))
    expected = hyppo.Hsic().statistic(xa, ya)
    x, y = torch.from_numpy(xa), torch.from_numpy(ya)
    sigma = kexue_fast.median_bandwidth(x)  # hyppo's convention: the median distance of x for both inputs
    ours = kexue_fast.hsic(x, y, bandwidth_x=sigma, bandwidth_y=sigma, estimator="unbiased", normalize=True)
    assert abs(float(ours) - expected) <= 1e-10 * abs(expected)
    ours32 = kexue_fast.hsic(x.float(), y.float(), bandwidth_x=sigma, bandwidth_y=sigma, estimator="unbiased",
                             normalize=True)  # fmt: skip
    assert abs(float(ours32) - expected) <= 1e-6 * abs(expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["gaussian", "imq", "linear"])  # laplace: autograd of sqrt at d = 0 is NaN
def test_tiled_backward_equals_autograd_through_materialized(kernel, backend):
    x, y = _data(300 if backend == "cpp" else 37, 3, 2, seed=3)  # cpp: 128-row blocks, so n spans three
    x.requires_grad_()
    y.requires_grad_()
    for estimator, fn, normalized in VARIANTS:
        ours = kexue_fast.hsic(x, y, kernel_x=kernel, bandwidth_x=1.3, bandwidth_y=0.9, estimator=estimator,
                               normalize=normalized, tile=8, backend=backend)  # fmt: skip
        gx, gy = torch.autograd.grad(ours, [x, y])
        rx, ry = torch.autograd.grad(_naive(x, y, kernel, 1.3, 0.9, fn, normalized), [x, y])
        assert torch.allclose(gx, rx, atol=1e-10 * float(rx.abs().max()), rtol=0)
        assert torch.allclose(gy, ry, atol=1e-10 * float(ry.abs().max()), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["gaussian", "laplace", "imq"])
def test_gradcheck_ragged_n(kernel, backend):
    x, y = _data(37, 3, 2, seed=4)
    x.requires_grad_()
    y.requires_grad_()

    def f(a, b):
        return kexue_fast.hsic(a, b, kernel_x=kernel, bandwidth_x=1.1, bandwidth_y=0.8, estimator="unbiased",
                               normalize=True, tile=16, backend=backend)  # fmt: skip

    assert torch.autograd.gradcheck(f, (x, y))


@pytest.mark.parametrize("kernel_x, kernel_y", [("laplace", "gaussian"), ("imq", "laplace"), ("linear", "gaussian")])
def test_cpp_backward_equals_torch_backward(kernel_x, kernel_y):
    x, y = _data(300, 5, 2, seed=9)
    x[7] = x[3]  # a zero distance off the diagonal (laplace: subgradient 0)
    grads = {}
    for backend in BACKENDS:
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        out = kexue_fast.hsic(a, b, kernel_x=kernel_x, kernel_y=kernel_y, bandwidth_x=1.2, bandwidth_y=0.7,
                              estimator="unbiased", normalize=True, backend=backend)  # fmt: skip
        grads[backend] = torch.autograd.grad(out, [a, b])
    for ours, ref in zip(grads["cpp"], grads["torch"]):  # torch's tiles use ‖a‖² + ‖b‖² − 2a·b: 1e-11, not 1e-12
        assert torch.allclose(ours, ref, atol=1e-11 * float(ref.abs().max()), rtol=0)


def test_cpp_backward_with_labels_float32_and_one_sided_grad():
    x, _ = _data(260, 4, 1, seed=8)
    labels = (x[:, 0] > 0).long() * 7 - 3  # arbitrary integer ids
    x32 = x.float().requires_grad_()
    x64 = x.clone().requires_grad_()
    for estimator in ("biased", "unbiased"):
        g = {}
        for backend in BACKENDS:
            for t in (x32, x64):
                out = kexue_fast.hsic(t, labels, kernel_y="delta", bandwidth_x=1.5, estimator=estimator,
                                      normalize=True, backend=backend)  # fmt: skip
                g[backend, t.dtype] = torch.autograd.grad(out, t)[0]
        scale = float(g["torch", D64].abs().max())
        assert torch.allclose(g["cpp", D64], g["torch", D64], atol=1e-12 * scale, rtol=0)
        err_cpp = float((g["cpp", torch.float32].double() - g["torch", D64]).abs().max())
        err_torch = float((g["torch", torch.float32].double() - g["torch", D64]).abs().max())
        assert err_cpp <= 2 * err_torch + 1e-7 * scale, (err_cpp, err_torch)


def test_hsic_stats_has_every_variant():
    x, y = _data(60, 2, 2, seed=5)
    stats = kexue_fast.hsic_stats(x, y, tile=16)
    assert abs(float(stats.biased - kexue_fast.hsic(x, y))) < 1e-14
    assert abs(float(stats.unbiased - kexue_fast.hsic(x, y, estimator="unbiased"))) < 1e-14
    assert abs(float(stats.cka - kexue_fast.hsic(x, y, normalize=True))) < 1e-14
    assert abs(float(stats.cka_unbiased - kexue_fast.hsic(x, y, estimator="unbiased", normalize=True))) < 1e-14
    assert abs(float(stats.biased_n1 - stats.biased * 60**2 / 59**2)) < 1e-16
    assert abs(float(kexue_fast.cka(x, y) - kexue_fast.hsic(x, y, kernel_x="linear", normalize=True))) < 1e-15
    small = kexue_fast.hsic_stats(x[:3], y[:3])  # the unbiased variants need 4 samples: NaN, not a CKA of 0
    assert torch.isnan(small.unbiased) and torch.isnan(small.cka_unbiased) and torch.isfinite(small.cka)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        kexue_fast.hsic_test(x, y, method="permutation", seed=2**64)


def test_median_bandwidth_exact_and_subsample():
    for n, repeated in ((2, False), (3, False), (10, False), (257, False), (600, False), (601, True), (700, True)):
        x = torch.randn(n, 4, dtype=D64)
        if repeated:  # many equal distances: the two middle values coincide or sit in one radix bin
            x = torch.round(x * 2) / 2
        iu = torch.triu_indices(n, n, 1)
        expected = float(np.median(torch.cdist(x, x)[iu[0], iu[1]].numpy()))
        assert abs(kexue_fast.median_bandwidth(x) - expected) <= 1e-12 * expected
    x = torch.randn(500, 3, dtype=D64)
    a = kexue_fast.median_bandwidth(x, subsample=100, seed=7)
    assert a == kexue_fast.median_bandwidth(x, subsample=100, seed=7)
    assert abs(a / kexue_fast.median_bandwidth(x) - 1) < 0.2


@pytest.mark.parametrize("backend", BACKENDS)
def test_median_bandwidth_backends_agree(backend):
    for n, d in ((2, 1), (7, 2), (513, 3), (1500, 5)):
        x = torch.randn(n, d, dtype=D64)
        iu = torch.triu_indices(n, n, 1)
        expected = float(np.median(torch.cdist(x, x)[iu[0], iu[1]].numpy()))
        for dtype in (torch.float64, torch.float32):
            ours = kexue_fast.median_bandwidth(x.to(dtype), backend=backend)
            assert abs(ours - expected) <= (1e-12 if dtype == D64 else 1e-6) * expected


def _sorted_pair_values(xa):
    iu = np.triu_indices(xa.shape[0], 1)
    return np.sort(((xa[iu[0]] - xa[iu[1]]) ** 2).sum(1))


@pytest.mark.parametrize("sample, buffer", [(1 << 24, 1 << 23), (0, 1 << 23), (0, 1), (64, 1), (1 << 12, 7)])
def test_cpp_pair_select_is_exact_on_every_path(sample, buffer):
    """The default one-pass path, the full-range start, multi-pass narrowing (buffer 1), a sample too small to hold
    the rank (the bracket is widened), and ties (dyadic data, exact distances: results must match bit for bit)."""
    from kexue_fast import _core

    rng = np.random.default_rng(sample + buffer)
    for n, d, ties in ((2, 1, False), (9, 2, True), (300, 3, True), (700, 4, False)):
        xa = rng.normal(size=(n, d))
        if ties:
            xa = np.round(xa * 2) / 2
        values = _sorted_pair_values(xa)
        m = len(values)
        for k in sorted({0, 1 % m, m // 3, m // 2, m - 2 if m > 1 else 0, m - 1}):
            value, above, passes = _core.kth_pair_sq_distance(xa, k, sample=sample, buffer=buffer)
            expected_above = values[k + 1] if k + 1 < m else np.inf
            if ties:
                assert (value, above) == (values[k], expected_above), (n, k)
            else:  # summation order is the same, FMA contraction may differ: one rounding
                assert abs(value - values[k]) <= 4e-16 * values[k] and (
                    above == expected_above or abs(above - expected_above) <= 4e-16 * expected_above
                )
            assert passes >= 1
            if buffer == 1 and m > 1:
                assert passes > 1  # the histogram narrowing ran


def test_cpp_pair_select_is_one_pass_at_moderate_n():
    from kexue_fast import _core

    xa = np.random.default_rng(0).normal(size=(6000, 3))
    m = 6000 * 5999 // 2
    assert _core.kth_pair_sq_distance(xa, m // 2)[2] == 1


def test_cpp_float32_statistics_are_as_accurate_as_torch_float32():
    """Float32 inputs: C++ tiles are computed in float32 (vectorized exp) with float64 sums, like the torch tiles."""
    x, y = _data(700, 5, 3, seed=11)
    truth = kexue_fast.hsic_stats(x, y, bandwidth_x=2.0, bandwidth_y=1.5, backend="torch")
    errors = {}
    for backend in BACKENDS:
        got = kexue_fast.hsic_stats(x.float(), y.float(), bandwidth_x=2.0, bandwidth_y=1.5, backend=backend)
        errors[backend] = max(abs(float(getattr(got, f)) / float(getattr(truth, f)) - 1) for f in got._fields)
    assert errors["cpp"] <= 2 * errors["torch"] + 1e-7, errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_underflowing_gram_entries_stay_exact(backend):
    """A tiny bandwidth drives exp(−d²/2σ²) below the smallest normal double: flushed to 0, as in the truth."""
    x, y = _data(200, 3, 2, seed=5)
    for estimator, fn, normalized in VARIANTS[:2]:
        ours = kexue_fast.hsic(x, y, bandwidth_x=0.02, bandwidth_y=0.5, estimator=estimator, normalize=normalized,
                               backend=backend)  # fmt: skip
        ref = _naive(x, y, "gaussian", 0.02, 0.5, fn, normalized)
        assert torch.isfinite(ours) and abs(float(ours - ref)) <= 1e-10 * abs(float(ref))


def test_constant_inputs_give_finite_results():
    x = torch.ones(20, 3, dtype=D64)
    y = torch.randn(20, 2, dtype=D64)
    for estimator in ("biased", "unbiased"):
        for normalized in (False, True):
            value = kexue_fast.hsic(x, y, estimator=estimator, normalize=normalized)
            assert torch.isfinite(value) and abs(float(value)) < 1e-12


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"y": torch.randn(9, 2)}, ValueError, "same number of samples"),
        ({"estimator": "unbiased", "x": torch.randn(3, 2), "y": torch.randn(3, 2)}, ValueError, "n >= 4"),
        ({"x": torch.tensor([[0.0, float("nan")]] * 10)}, ValueError, "NaN or Inf"),
        ({"bandwidth_x": 0.0}, ValueError, "bandwidth_x"),
        ({"bandwidth_y": -1.0}, ValueError, "bandwidth_y"),
        ({"kernel_x": "cosine"}, ValueError, "kernel_x"),
        ({"estimator": "v-statistic"}, ValueError, "estimator"),
        (
            {"backend": "triton", "x": torch.randn(10, 2, dtype=D64), "y": torch.randn(10, 2, dtype=D64)},
            NotImplementedError,
            "supports float32, not float64",
        ),
        ({"x": torch.ones(10, 2, dtype=torch.int64)}, TypeError, "floating"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = {"x": torch.randn(10, 2), "y": torch.randn(10, 2)}
    args.update(kwargs)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(error, match=match):
        kexue_fast.hsic(x, y, **args)


_MEMORY_SCRIPT = """
import resource, torch, kexue_fast
x = torch.randn({n}, 8, dtype=torch.float64, requires_grad=True)
y = torch.randn({n}, 8, dtype=torch.float64, requires_grad=True)
sx, sy = kexue_fast.median_bandwidth(x.detach()), kexue_fast.median_bandwidth(y.detach())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kexue_fast.hsic(x, y, bandwidth_x=sx, bandwidth_y=sy, estimator="unbiased").backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_forward_backward_memory_is_linear_in_n():
    """n = 6,000: one float64 n×n matrix alone would be 288 MB; the tiled pass stays far below."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT.format(n=6000)], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert int(out.stdout.strip().splitlines()[-1]) < 100, out.stdout


@pytest.mark.slow
def test_forward_backward_memory_at_20000():
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT.format(n=20000)], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert int(out.stdout.strip().splitlines()[-1]) < 200, out.stdout


def test_gamma_null_parameters_equal_the_materialized_formula():
    x, y = _data(120, 2, 1, seed=8)
    result = kexue_fast.hsic_test(x, y, tile=32)
    n = 120
    k = R.gram(x, "gaussian", kexue_fast.median_bandwidth(x))
    lm = R.gram(y, "gaussian", kexue_fast.median_bandwidth(y))
    h = torch.eye(n, dtype=D64) - 1 / n
    kc, lc = h @ k @ h, h @ lm @ h
    v = (kc * lc / 6) ** 2
    v = 72 * (n - 4) * (n - 5) / n / (n - 1) / (n - 2) / (n - 3) * (v.sum() - v.diag().sum()) / n / (n - 1)
    mx = (k.sum() - k.diag().sum()) / n / (n - 1)
    my = (lm.sum() - lm.diag().sum()) / n / (n - 1)
    mean = (1 + mx * my - mx - my) / n
    assert abs(result.null["shape"] / float(mean**2 / v) - 1) < 1e-10
    assert abs(result.null["scale"] / float(v / mean) - 1) < 1e-10
    assert abs(result.statistic - float(R.hsic_biased(k, lm))) < 1e-14
    stats = kexue_fast.hsic_stats(x, y)
    assert abs(float(stats.gamma_null_mean) / float(mean) - 1) < 1e-12
    assert torch.isnan(kexue_fast.hsic_stats(x, y, kernel_x="linear").gamma_null_mean)  # diagonal ≠ 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, kernel_y", [(45, "gaussian"), (300, "laplace"), (200, "delta")])
def test_permutation_statistics_equal_hsic_of_permuted_y(backend, n, kernel_y):
    from kexue_fast.hsic.independence import _permuted_cross_sums, _permuted_cross_sums_cpp
    from kexue_fast.hsic.tiled import KernelSpec

    x, y = _data(n, 3, 2, seed=9)
    if kernel_y == "delta":
        y = (y[:, 0] > 0).long() + 2 * (y[:, 1] > 1).long()
    perms = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(5)])
    kx, ky = KernelSpec("gaussian", 1.2), KernelSpec(kernel_y, None if kernel_y == "delta" else 0.7)
    if backend == "cpp":
        s_perm = _permuted_cross_sums_cpp(x, y, kx, ky, perms)
    else:
        s_perm = _permuted_cross_sums(x, y, kx, ky, perms, tile=16)
    k = R.gram(x, "gaussian", 1.2)
    for p, perm in enumerate(perms):
        lm = R.gram(y[perm], kernel_y, 0.7)
        expected = (k * lm).sum() - (k.diag() * lm.diag()).sum()
        assert abs(float(s_perm[p] - expected)) < 1e-10 * float(expected)


def test_permutation_test_backends_agree():
    x, y = _data(150, 2, 1, seed=12)
    results = [
        kexue_fast.hsic_test(x, y, method="permutation", n_permutations=200, seed=3, backend=b) for b in BACKENDS
    ]
    assert results[0].pvalue == results[1].pvalue
    assert abs(results[0].statistic - results[1].statistic) <= 1e-12 * results[0].statistic


def test_permutation_test_counts_ties_on_binary_data():
    """On {0, 1} data the Gaussian Gram is an increasing affine map of the delta one, so the p-values must equal the
    delta kernel's (exact sums): permuted statistics tied with the observed one were summed in another order and
    fell below it by rounding (p 0.045 on cpp, 0.1 on torch, against 0.28)."""
    x = torch.tensor([1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0.0], dtype=D64)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0.0], dtype=D64)
    kw = dict(method="permutation", seed=104, n_permutations=199)
    exact = kexue_fast.hsic_test(x.long(), y.long(), kernel_x="delta", kernel_y="delta", **kw).pvalue
    for b in BACKENDS:
        assert kexue_fast.hsic_test(x, y, bandwidth_x=1.0, bandwidth_y=1.0, backend=b, **kw).pvalue == exact, b


@pytest.mark.parametrize("method", ["gamma", "permutation"])
def test_constant_input_gives_pvalue_one(method):
    """A constant x: K constant, HSIC = 0 exactly and every permutation ties: p = 1 (the permutation test's rounding
    noise rejected, p down to 0.02; the Gamma fit's 0/0 gave NaN)."""
    x = torch.full((30,), 2.5, dtype=D64)
    for seed in range(5):
        y = torch.randn(30, generator=torch.Generator().manual_seed(seed), dtype=D64)
        assert kexue_fast.hsic_test(x, y, method=method, seed=0, n_permutations=99).pvalue == 1.0
    labels = torch.zeros(30, dtype=torch.long)
    assert kexue_fast.hsic_test(y, labels, kernel_y="delta", method=method, seed=0, n_permutations=99).pvalue == 1.0


def _rejection_rate(method, replicates, dependent, n=200, **kwargs):
    g = torch.Generator().manual_seed(2026 + dependent)
    rejected = 0
    for r in range(replicates):
        x = torch.randn(n, 1, generator=g, dtype=D64)
        noise = torch.randn(n, 1, generator=g, dtype=D64)
        y = torch.cos(x) + noise if dependent else noise
        result = kexue_fast.hsic_test(x, y, method=method, seed=r, **kwargs)
        rejected += result.pvalue < 0.05
    return rejected / replicates


def test_gamma_test_is_calibrated_and_powerful():
    assert 0.035 <= _rejection_rate("gamma", 1000, dependent=False, bandwidth_x=1.0, bandwidth_y=1.0) <= 0.065
    assert _rejection_rate("gamma", 100, dependent=True) >= 0.7


def test_permutation_test_has_power():
    assert _rejection_rate("permutation", 40, dependent=True, n_permutations=100) >= 0.7


@pytest.mark.slow
def test_permutation_test_is_calibrated():
    rate = _rejection_rate("permutation", 1000, dependent=False, n_permutations=200, bandwidth_x=1.0, bandwidth_y=1.0)
    assert 0.035 <= rate <= 0.065


def test_hsic_test_bad_inputs():
    x, y = torch.randn(20, 2), torch.randn(20, 2)
    with pytest.raises(ValueError, match="method"):
        kexue_fast.hsic_test(x, y, method="bootstrap")
    with pytest.raises(ValueError, match="n_permutations"):
        kexue_fast.hsic_test(x, y, method="permutation", n_permutations=0)
    with pytest.raises(ValueError, match="unit diagonal"):
        kexue_fast.hsic_test(x, y, kernel_x="linear")


def test_auto_uses_the_cpp_core_on_cpu_and_agrees_with_torch():
    from kexue_fast import _dispatch

    assert _dispatch.choose("hsic", torch.device("cpu"), D64) == "cpp"
    x, y = _data(700, 5, 2, seed=10)
    a = kexue_fast.hsic_stats(x, y, backend="cpp")
    b = kexue_fast.hsic_stats(x, y, backend="torch")
    for name in ("biased", "unbiased", "cka", "cka_unbiased"):
        assert abs(float(getattr(a, name) - getattr(b, name))) <= 1e-12 * abs(float(getattr(b, name)))


def _paper_hsic(a, b, sigma, normalized):
    """The HSIC-bottleneck paper code's `hsic_regular` / `hsic_normalized`, materialized."""

    def kernelmat(t):
        r = (t * t).sum(1, keepdim=True)
        dist = (r - 2 * t @ t.T + r.T).clamp_min(0)
        h = torch.eye(t.shape[0], dtype=t.dtype) - 1 / t.shape[0]
        return torch.exp(-dist / (2 * sigma * sigma * t.shape[1])) @ h

    def regular(p, q):
        return (kernelmat(p) * kernelmat(q).T).mean()

    value = regular(a, b)
    return value / (regular(a, a).sqrt() * regular(b, b).sqrt()) if normalized else value


@pytest.mark.parametrize("normalized", [False, True])
def test_bottleneck_loss_equals_the_papers_formulas(normalized):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(50, 10, generator=g, dtype=D64)
    labels = torch.randint(0, 4, (50,), generator=g)
    z = torch.randn(50, 6, generator=g, dtype=D64, requires_grad=True)
    loss, hzx, hzy = kexue_fast.hsic.bottleneck_loss(z, x, labels, beta=50.0, sigma=3.0, normalized=normalized)
    onehot = torch.nn.functional.one_hot(labels).double()
    ref_zx, ref_zy = _paper_hsic(z, x, 3.0, normalized), _paper_hsic(z, onehot, 3.0, normalized)
    assert abs(float((hzx - ref_zx).detach())) <= 1e-8 * abs(float(ref_zx.detach()))
    assert abs(float((hzy - ref_zy).detach())) <= 1e-8 * abs(float(ref_zy.detach()))
    (grad,) = torch.autograd.grad(loss, z)
    (ref_grad,) = torch.autograd.grad(ref_zx - 50.0 * ref_zy, z)
    assert torch.allclose(grad, ref_grad, atol=1e-8 * float(ref_grad.abs().max()), rtol=0)


def test_bottleneck_loss_bad_inputs():
    z, x = torch.randn(10, 3), torch.randn(10, 4)
    with pytest.raises(ValueError, match="sigma"):
        kexue_fast.hsic.bottleneck_loss(z, x, torch.zeros(10, dtype=torch.long), beta=1.0, sigma=0.0)
    with pytest.raises(ValueError, match="labels"):
        kexue_fast.hsic.bottleneck_loss(z, x, torch.zeros(10, 2, dtype=torch.long), beta=1.0)
    with pytest.raises(TypeError, match="beta"):
        kexue_fast.hsic.bottleneck_loss(z, x, torch.zeros(10, dtype=torch.long), beta="big")
    labels = torch.arange(10) % 3
    with pytest.raises(ValueError, match=r"z, x and y must have the same number of samples.*y \(9,\)"):
        kexue_fast.hsic.bottleneck_loss(z, x, labels[:9], beta=1.0)  # it named x and y of an inner call
    with pytest.raises(TypeError, match=r"z must be a torch\.Tensor"):
        kexue_fast.hsic.bottleneck_loss(z.numpy(), x, labels, beta=1.0)
    with pytest.raises(ValueError, match=r"n_classes = 2 but y has label 2"):
        kexue_fast.hsic.bottleneck_loss(z, x, labels, beta=1.0, n_classes=2)
    with pytest.raises(ValueError, match=r"class indices >= 0, got label -1"):  # one_hot's RuntimeError before
        kexue_fast.hsic.bottleneck_loss(z, x, labels - 1, beta=1.0)


def test_far_from_the_origin_and_label_only_inputs():
    """Every estimator is translation invariant: samples far from the origin must not cancel (‖a‖² + ‖b‖² − 2a·b in
    the torch tiles and the median, uncentred d×d products in the linear statistics)."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 3, dtype=D64), torch.randn(200, 2, dtype=D64)
    y = y + 0.5 * x[:, :2]
    for kernel in ("linear", "gaussian"):
        expected = float(kexue_fast.cka(x, y, kernel=kernel))
        for offset in (1e3, 1e4):
            assert float(kexue_fast.cka(x + offset, y - offset, kernel=kernel)) == pytest.approx(expected, abs=1e-8)
    expected32 = float(kexue_fast.hsic(x.float(), y.float(), backend="cpp"))
    assert float(kexue_fast.hsic(x.float() + 3e3, y.float(), backend="torch")) == pytest.approx(expected32, rel=1e-3)
    truth = float(torch.pdist(x).median())  # an odd count of pairs: the middle one
    far = x[:151] + 1e8
    exact = float(torch.pdist(far - 1e8).median())  # the stored points' exact differences (Sterbenz)
    for backend in ("cpp", "torch"):
        assert kexue_fast.median_bandwidth(far, backend=backend) == pytest.approx(exact, rel=1e-12)
    assert truth > 0
    labels_x, labels_y = torch.randint(0, 3, (64,)), torch.randint(0, 3, (64,))
    labels_y[:40] = labels_x[:40]
    value = kexue_fast.hsic(labels_x, labels_y, kernel_x="delta", normalize=True)
    assert value.dtype == D64 and float(value) > 0.1  # was an int64 tensor truncated to 0


def test_hsic_test_leaves_the_global_generator_alone_and_exact_pvalues():
    torch.manual_seed(123)
    x, y = torch.randn(40, 2, dtype=D64), torch.randn(40, 2, dtype=D64)
    torch.manual_seed(7)
    result = kexue_fast.hsic_test(x, y, method="permutation", n_permutations=99)
    after = torch.rand(3)
    torch.manual_seed(7)
    kexue_fast.hsic_test(x, y, method="permutation", n_permutations=99)
    assert torch.equal(torch.rand(3), after) and torch.initial_seed() == 7  # reproducible, never reseeded
    assert isinstance(result.pvalue, float) and result.pvalue == round(result.pvalue * 100) / 100  # k/(B+1) exactly
    with pytest.raises(ValueError, match="seed"):
        kexue_fast.hsic_test(x, y, method="permutation", seed=1.5)
    with pytest.raises(ValueError, match="tile"):
        kexue_fast.hsic(x, y, tile=-1)
    with pytest.raises(ValueError, match="NaN"):
        kexue_fast.median_bandwidth(torch.tensor([[0.0], [float("nan")], [float("nan")]]))


def test_cpp_calls_take_torchs_thread_count(monkeypatch):
    """The C++ HSIC core and the power iteration run on torch.get_num_threads() threads (torch.set_num_threads(1),
    as in DataLoader workers, is honoured), with results equal across counts up to the reduction order."""
    import kexue_fast._core as core

    seen = []

    def spy(original):
        def call(*args, **kwargs):
            seen.append(kwargs.get("n_threads", args[-1]))
            return original(*args, **kwargs)

        return call

    for name in ("hsic_stats", "hsic_grad", "power_iteration"):
        monkeypatch.setattr(core, name, spy(getattr(core, name)))
    x = torch.randn(300, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(300, 2, dtype=torch.float64)
    before = torch.get_num_threads()
    values = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            seen.clear()
            value = kexue_fast.hsic(x, y, backend="cpp")
            (grad,) = torch.autograd.grad(value, x)
            kexue_fast.spectral.power_iteration([torch.randn(20, 10)], n_iters=3)
            assert seen == [threads, threads, threads]
            values.append((value.detach(), grad))
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(values[0][0], values[1][0], rtol=1e-12) and torch.allclose(values[0][1], values[1][1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_take_an_explicit_torch_backend(dtype):
    """auto ran half inputs on the torch path, but backend="torch" refused them (its registration said float32/64)."""
    x, y = torch.randn(64, 3).to(dtype), torch.randn(64, 2).to(dtype)
    assert torch.equal(kexue_fast.hsic(x, y, backend="torch"), kexue_fast.hsic(x, y))
    assert kexue_fast.median_bandwidth(x, backend="torch") == kexue_fast.median_bandwidth(x)


def test_cka_names_its_kernel_argument():
    """cka(..., kernel_x=...) failed inside with 'got multiple values for keyword argument'."""
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="cka takes kernel="):
        kexue_fast.cka(x, y, kernel_x="gaussian")
    assert torch.allclose(kexue_fast.cka(x, y, kernel="gaussian"), kexue_fast.hsic(x, y, normalize=True))


def test_laplace_gradient_of_coincident_pairs_in_float64():
    """The torch backward took laplace's d from ‖a‖² + ‖b‖² − 2a·b even in float64: rows 1e-7 and 3e-8 apart at
    scale 8 had gradients up to 0.6% off the C++ core's (which takes differences) at b9dc632; now both take
    differences."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64) + 8
    x[1] = x[0] + 1e-7
    x[3] = x[2] + 3e-8
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    grads = {}
    for backend in ("torch", "cpp"):
        leaf = x.clone().requires_grad_()
        value = kexue_fast.hsic(leaf, y, kernel_x="laplace", bandwidth_x=1.0, bandwidth_y=1.0, backend=backend)
        grads[backend] = torch.autograd.grad(value, leaf)[0]
    error = (grads["torch"] - grads["cpp"]).norm(dim=1) / grads["cpp"].norm(dim=1)
    assert float(error.max()) <= 1e-6


def test_gamma_test_of_an_exactly_zero_statistic():
    """A balanced design has HSIC_b = 0 exactly, which rounds to about −2e-16: gammaincc of the negative argument made
    the p-value NaN (the permutation test gives 1)."""
    x = torch.tensor([0.0, 0.0, 1.0, 1.0] * 3, dtype=torch.float64)[:, None]
    y = torch.tensor([0.0, 1.0, 0.0, 1.0] * 3, dtype=torch.float64)[:, None]
    for backend in ("torch", "cpp"):
        result = kexue_fast.hsic_test(x, y, method="gamma", backend=backend)
        assert 1 - 1e-9 <= result.pvalue <= 1.0, (backend, result)  # +2e-16 on one backend: p just below 1


def test_permutations_are_drawn_in_blocks_with_the_same_result(monkeypatch):
    """The permutation test held all P permutations as one [P, n] int64 tensor; it now draws and uses them a block
    at a time, in the same order: the same p-value and null whatever the block."""
    from kexue_fast.hsic import independence

    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = x[:, :1] ** 2 + torch.randn(30, 1, generator=g, dtype=torch.float64)
    for backend in ("torch", "cpp"):
        whole = kexue_fast.hsic_test(x, y, method="permutation", n_permutations=50, seed=7, backend=backend)
        monkeypatch.setattr(independence, "PERMUTATION_BLOCK_ELEMENTS", 30 * 7)  # 7 permutations a block
        blocks = kexue_fast.hsic_test(x, y, method="permutation", n_permutations=50, seed=7, backend=backend)
        monkeypatch.undo()
        assert blocks.pvalue == whole.pvalue and blocks.null == whole.null, backend


def test_wide_linear_cka_streams_its_gram_tiles(monkeypatch):
    """Linear kernels on both sides always took d×d cross products: d² float64 memory, gigabytes for CKA of wide
    layers (d ≫ n, its typical use). Wider than there are samples (and than a tile), they stream the Gram tiles."""
    from kexue_fast.hsic import api

    g = torch.Generator().manual_seed(4)
    x = torch.randn(24, 40, generator=g, dtype=torch.float64)
    y = x[:, :30] @ torch.randn(30, 35, generator=g, dtype=torch.float64) + torch.randn(24, 35, generator=g)
    k, lm = x @ x.T, y @ y.T
    want = R.normalized(R.hsic_biased, k, lm)
    calls = []
    feature_stats = api._feature_stats
    monkeypatch.setattr(api, "_feature_stats", lambda *a: calls.append(1) or feature_stats(*a))
    for backend in ("torch", "cpp"):
        leaf = x.clone().requires_grad_()
        got = kexue_fast.cka(leaf, y, tile=16, backend=backend)  # dx + dy = 75 > max(n, tile) = 24
        assert abs(float(got) - float(want)) <= 1e-12 and not calls, backend
        assert torch.autograd.grad(got, leaf)[0].shape == x.shape
    assert abs(float(kexue_fast.cka(x, y)) - float(want)) <= 1e-12 and calls  # tile 512: the d×d products


@pytest.mark.parametrize("scale", [1e-25, 1e21])
def test_float32_radial_kernels_at_extreme_scales(scale):
    """The statistic with the median bandwidth is scale invariant, but float32 inputs at 1e-25 gave NaN (−1/(2σ²)
    overflowed to −inf against d² = 0) and at 1e21 NaN or a wrong value (d² overflowed): inputs and σ are now divided
    by a power of two near σ (exact), and the median taken on data brought to O(1)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :2]) + 0.3 * torch.randn(60, 2, generator=g, dtype=torch.float64)
    for kernel in ("gaussian", "laplace", "imq"):
        want = float(kexue_fast.hsic(x, y, kernel_x=kernel, backend="torch"))
        for backend in ("torch", "cpp"):
            got = float(kexue_fast.hsic((x * scale).float(), y.float(), kernel_x=kernel, backend=backend))
            assert abs(got - want) <= 1e-5 * abs(want), (kernel, backend, got, want)
        given = float(kexue_fast.hsic((x * scale).float(), y.float(), kernel_x=kernel, bandwidth_x=1.5 * scale))
        assert abs(given - float(kexue_fast.hsic(x, y, kernel_x=kernel, bandwidth_x=1.5))) <= 1e-5 * abs(want)


def test_permutation_test_of_few_samples():
    """Only the Gamma approximation needs n >= 6 (its variance has (n − 4)(n − 5)); permutations ran only from 6 too."""
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    result = kexue_fast.hsic_test(x, x**2, method="permutation", n_permutations=23, seed=1)
    assert 1 / 24 <= result.pvalue <= 1.0 and result.null["n_permutations"] == 23
    with pytest.raises(ValueError, match="n >= 6"):
        kexue_fast.hsic_test(x, x**2, method="gamma")


def test_one_permutation_has_no_null_spread():
    """A single permutation gives a valid p-value (1/2 or 1) and no spread of the null: NaN, said so, not torch's
    degrees-of-freedom warning from std() of one value."""
    x = torch.randn(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = kexue_fast.hsic_test(x, x.sin(), method="permutation", n_permutations=1, seed=0)
    assert result.pvalue in (0.5, 1.0) and math.isnan(result.null["null_std"])
    assert math.isfinite(result.null["null_mean"])


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _dense_hsic_b(x, y, sigma_x, sigma_y):
    """tr(KHLH)/n² with Gaussian kernels, materialized in float64."""
    x, y = x.double(), y.double()
    k = torch.exp(-(torch.cdist(x, x) ** 2) / (2 * sigma_x**2))
    l_ = torch.exp(-(torch.cdist(y, y) ** 2) / (2 * sigma_y**2))
    n = x.shape[0]
    h = torch.eye(n, dtype=D64) - 1.0 / n
    return torch.trace(k @ h @ l_ @ h) / n**2


def test_autocast_and_half_inputs_keep_the_tiles_in_float32():
    """Under torch.autocast the torch path's Gram tiles (‖a‖² + ‖b‖² − 2a·b) ran in bfloat16: HSIC 0.072 against 0.031
    (64 points in 200 dimensions); float16 / bfloat16 inputs were tiled in half precision (2–3% off the value, 10–30%
    off the gradient). Both now compute in float32 (at least) and return the inputs' dtype."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 200, generator=g), torch.randn(64, 200, generator=g)
    y = y + x
    want = _dense_hsic_b(x, y, 20.0, 28.0)
    for backend in ("torch", "cpp"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = kexue_fast.hsic(x, y, bandwidth_x=20.0, bandwidth_y=28.0, backend=backend)
        assert got.dtype == torch.float32 and _rel(got, want) <= 1e-5
    centers = torch.randn(4, 3, generator=g) * 4
    xc = centers[torch.arange(96) % 4] + 0.05 * torch.randn(96, 3, generator=g)
    yc = xc[:, :2] + 0.1 * torch.randn(96, 2, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        xh, yh = xc.to(dtype).requires_grad_(), yc.to(dtype)
        got = kexue_fast.hsic(xh, yh, bandwidth_x=2.0, bandwidth_y=2.0, backend="torch")
        assert got.dtype == dtype
        exact = _dense_hsic_b(xh.detach(), yh, 2.0, 2.0)
        assert abs(float(got) / float(exact) - 1) <= 4e-3  # the result's own rounding to half precision
        (grad,) = torch.autograd.grad(got, xh)
        x64 = xh.detach().double().requires_grad_()
        (want_grad,) = torch.autograd.grad(_dense_hsic_b(x64, yh.double(), 2.0, 2.0), x64)
        assert _rel(grad.double(), want_grad) <= 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_bandwidth_too_small_for_the_data_raises(backend):
    """σ ≪ the data's spread overflowed the tiles' squared distances: NaN on the torch path (float64 below ~1e-154,
    float32 below ~1e-19 for data of spread ~3), NaN or a number on the C++ one; now a ValueError on both."""
    x, y = _data(60, 3, 2, seed=7)
    for dtype, small, fine in ((torch.float64, 1e-160, 1e-100), (torch.float32, 1e-19, 1e-15)):
        with pytest.raises(ValueError, match=r"bandwidth_x=1e-\d+ is too small for the data"):
            kexue_fast.hsic(x.to(dtype), y.to(dtype), bandwidth_x=small, backend=backend)
        with pytest.raises(ValueError, match=r"bandwidth_y=.* too small"):
            kexue_fast.hsic(x.to(dtype), y.to(dtype), bandwidth_x=1.0, bandwidth_y=small, backend=backend)
        value = kexue_fast.hsic(x.to(dtype), y.to(dtype), bandwidth_x=fine, backend=backend)  # K = I: still exact
        ref = R.hsic_biased(torch.eye(60, dtype=D64), R.gram(y - y.mean(0), "gaussian", float(
            kexue_fast.median_bandwidth(y))))  # fmt: skip
        assert abs(float(value) - float(ref)) <= 1e-5 * abs(float(ref))


def test_hsic_inputs_checked_and_dtypes_promoted():
    """[n, 0] inputs crashed in a reduction; the gamma test's n < 6 blamed "the biased estimator"; an invalid
    bandwidth passed unchecked with the linear kernel; float32 x with float64 y came back float32; cka(...,
    normalize=) and a non-bool normalize; a constant input's unbiased CKA came out ±1e-7, not 0; a first call with a
    tensor that requires grad warned about converting it to a scalar."""
    x, y = torch.randn(20, 3), torch.randn(20, 2)
    with pytest.raises(ValueError, match=r"x must be \[n, d\] with d >= 1"):
        kexue_fast.hsic(torch.randn(20, 0), y)
    with pytest.raises(ValueError, match=r"hsic_test\(method='gamma'\) needs n >= 6"):
        kexue_fast.hsic_test(x[:5], y[:5])
    with pytest.raises(ValueError, match="bandwidth_x must be"):
        kexue_fast.hsic(x, y, kernel_x="linear", bandwidth_x=-5.0)
    assert kexue_fast.hsic(x, y.double()).dtype == D64
    with pytest.raises(TypeError, match="cka is normalized by definition"):
        kexue_fast.cka(x, y, normalize=False)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        kexue_fast.hsic(x, y, normalize="no")
    const = torch.ones(100, 3, dtype=D64)
    for n in (37, 100):
        z = torch.randn(n, 2, dtype=D64)
        assert float(kexue_fast.cka(const[:n], z, estimator="unbiased")) == 0.0
        assert float(kexue_fast.cka(const[:n], z, kernel="gaussian", estimator="unbiased")) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        kexue_fast.hsic(x.clone().requires_grad_(), y)


def test_bottleneck_and_bandwidth_arguments_are_named():
    from kexue_fast.hsic.bottleneck import bottleneck_loss

    z, x, y = torch.randn(10, 4), torch.randn(10, 3), torch.randint(0, 3, (10,))
    with pytest.raises(TypeError, match="z must be a floating tensor"):
        bottleneck_loss(z.long(), x, y, beta=1.0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        bottleneck_loss(z, x, y, beta=1.0, sigma=float("inf"))
    with pytest.raises(ValueError, match="beta must be finite"):
        bottleneck_loss(z, x, y, beta=float("nan"))
    for bad in (2.5, "5", 1):
        with pytest.raises(ValueError, match="subsample must be an int >= 2"):
            kexue_fast.median_bandwidth(x, subsample=bad)
    with pytest.raises(ValueError, match="seed must be an int"):
        kexue_fast.median_bandwidth(x, subsample=5, seed=-1)


def test_torch_func_transforms_run_linear_kernels_and_refuse_the_tiles_clearly():
    """Under torch.func transforms linear kernels on both sides run (the d×d cross products: vmap equals the loop,
    the NaN check skipped there); other kernels raise a NotImplementedError naming hsic.reference, where the C++
    median bandwidth crashed on a data pointer or the tiles' Function lacked setup_context."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 3, 10, 2, dtype=D64, generator=g).unbind(0)
    mapped = torch.func.vmap(lambda a, b: kexue_fast.hsic(a, b, kernel_x="linear"))(x, y)
    want = torch.stack([kexue_fast.hsic(a, b, kernel_x="linear") for a, b in zip(x, y)])
    torch.testing.assert_close(mapped, want, rtol=1e-12, atol=0)
    for kernel in ("gaussian", "laplace"):
        with pytest.raises(NotImplementedError, match=r"torch\.func transforms.*hsic\.reference"):
            torch.func.vmap(lambda a, b: kexue_fast.hsic(a, b, kernel_x=kernel))(x, y)  # noqa: B023
        with pytest.raises(NotImplementedError, match=r"torch\.func transforms"):
            torch.func.grad(lambda a: kexue_fast.hsic(a, y[0], kernel_x=kernel))(x[0])  # noqa: B023
