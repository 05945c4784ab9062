"""The HSIC Triton kernels (kernels/hsic.py) against the torch tiles and the materialized formulas, at odd shapes;
interpreted on CPU (float32 tiles, float64 sums)."""

import pytest
import torch

import kexue_fast
from kexue_fast.hsic import reference as R

pytest.importorskip("triton")

D64 = torch.float64
VARIANTS = [("biased", R.hsic_biased, False), ("biased", R.hsic_biased, True), ("unbiased", R.hsic_unbiased, False),
            ("unbiased", R.hsic_unbiased, True)]  # fmt: skip


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _data(n, dx, dy, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=D64)
    y = torch.randn(n, dy, generator=g, dtype=D64) + torch.sin(x[:, :1])
    return x, y


def _naive(x, y, kernel_x, kernel_y, sx, sy, fn, normalized):
    k, lm = R.gram(x.double(), kernel_x, sx), R.gram(y if kernel_y == "delta" else y.double(), kernel_y, sy)
    return R.normalized(fn, k, lm) if normalized else fn(k, lm)


@pytest.mark.parametrize("n", [4, 5, 31, 32, 33, 63, 64, 65, 127, 128, 129])
@pytest.mark.parametrize(
    "kernel_x, kernel_y, dx, dy",
    [
        ("gaussian", "gaussian", 3, 17),
        ("laplace", "imq", 1, 3),
        ("imq", "gaussian", 17, 1),
        ("linear", "gaussian", 4, 3),
        ("gaussian", "delta", 5, 1),
    ],
)
def test_triton_forward_as_accurate_as_torch_float32(n, kernel_x, kernel_y, dx, dy):
    x, y = _data(n, dx, dy, seed=n + dx)
    if kernel_y == "delta":
        y = (y[:, 0] > 0).long() * 5 + (y[:, 0] > 1).long()
    dev = _device()
    x32 = x.float().to(dev)
    y32 = (y.float() if y.is_floating_point() else y).to(dev)
    for estimator, fn, normalized in VARIANTS:
        kwargs = dict(kernel_x=kernel_x, kernel_y=kernel_y, bandwidth_x=1.3, bandwidth_y=0.9, estimator=estimator,
                      normalize=normalized)  # fmt: skip
        truth = float(_naive(x, y, kernel_x, kernel_y, 1.3, 0.9, fn, normalized))
        ours = float(kexue_fast.hsic(x32, y32, backend="triton", **kwargs))
        theirs = float(kexue_fast.hsic(x32, y32, backend="torch", **kwargs))
        if truth != truth:  # the materialized formula divides 0 by 0 (a zero self-term); the estimators return 0
            assert ours == theirs == 0.0
            continue
        floor = max(2e-6, 2 * _float32_amplified(x, y, kernel_x, kernel_y, estimator, normalized)) * abs(truth)
        assert abs(ours - truth) <= 2 * abs(theirs - truth) + floor, (estimator, normalized)


def _float32_amplified(x, y, kernel_x, kernel_y, estimator, normalized) -> float:
    """The torch path's float32 tile sums' relative error (against float64) times the estimator's relative condition
    number in them, Σ|∂v/∂s|·|s| / |v|: what float32 statistics alone allow the value to be off. The unbiased
    estimator at n = 4 amplifies them by thousands, so the two paths' values there differ by luck of rounding."""
    from kexue_fast.hsic import estimators
    from kexue_fast.hsic.tiled import KernelSpec, streaming_stats

    specs = [KernelSpec(k, None if k in ("linear", "delta") else s) for k, s in ((kernel_x, 1.3), (kernel_y, 0.9))]
    y32 = y.float() if y.is_floating_point() else y
    stats = streaming_stats(x, y, *specs)
    error = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
                for a, b in zip(streaming_stats(x.float(), y32, *specs), stats))  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in stats]
    value = estimators.estimate(estimator, normalized)(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    total = sum(float((g.abs() * t.abs()).sum()) for g, t in zip(grads, stats) if g is not None)
    return error * total / abs(float(value.detach()))


@pytest.mark.parametrize(
    "kernel_x, kernel_y", [("gaussian", "gaussian"), ("laplace", "imq"), ("linear", "gaussian"), ("imq", "delta")]
)
def test_triton_backward_as_accurate_as_torch_float32(kernel_x, kernel_y):
    x, y = _data(70, 3, 2, seed=4)
    if kernel_y == "delta":
        y = (y[:, 0] > 0).long()
    dev = _device()
    truth, got = {}, {}
    for name, dtype, backend in (("truth", D64, "torch"), ("torch32", torch.float32, "torch"),
                                 ("triton", torch.float32, "triton")):  # fmt: skip
        a = x.to(dtype).to(dev).requires_grad_()
        b = y.to(dtype).to(dev).requires_grad_() if y.is_floating_point() else y.to(dev)
        out = kexue_fast.hsic(a, b, kernel_x=kernel_x, kernel_y=kernel_y, bandwidth_x=1.1, bandwidth_y=0.8,
                              estimator="unbiased", normalize=True, backend=backend)  # fmt: skip
        grads = torch.autograd.grad(out, [a, b] if b.requires_grad else [a])
        (truth if name == "truth" else got).setdefault(name, [g.double().cpu() for g in grads])
    for i, ref in enumerate(truth["truth"]):
        err_triton = float((got["triton"][i] - ref).abs().max())
        err_torch = float((got["torch32"][i] - ref).abs().max())
        assert err_triton <= 2 * err_torch + 1e-6 * float(ref.abs().max()), (i, err_triton, err_torch)


def test_triton_is_deterministic_and_rejects_bad_inputs():
    x, y = _data(100, 3, 2, seed=1)
    dev = _device()
    x32, y32 = x.float().to(dev), y.float().to(dev)
    first = kexue_fast.hsic_stats(x32, y32, backend="triton")
    assert kexue_fast.hsic_stats(x32, y32, backend="triton") == first
    with pytest.raises(NotImplementedError, match="float32"):
        kexue_fast.hsic(x.to(dev), y.to(dev), backend="triton")
    wide = torch.randn(10, 129, device=dev)
    with pytest.raises(NotImplementedError, match="d <= 128"):
        kexue_fast.hsic(wide, wide[:, :3], backend="triton")


def test_laplace_gradient_of_near_duplicate_samples():
    """laplace's ∂K/∂x has 1/d: the Triton tiles' float32 ‖a‖² + ‖b‖² − 2a·b distance was ~100% off for a pair
    1e-3 apart; that backward runs the torch tiles (d from the differences in float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g) * 3 + 5
    x[1] = x[0] + 1e-3 * torch.randn(8, generator=g) / 8**0.5
    y = torch.randn(40, 2, generator=g) + x[:, :1]
    x, y = x.to(_device()), y.to(_device())  # Triton on CPU tensors only under the interpreter (no CUDA)
    grads = {}
    for backend in ("torch", "triton"):
        xx = x.clone().requires_grad_()
        value = kexue_fast.hsic(xx, y, kernel_x="laplace", bandwidth_x=1.0, bandwidth_y=1.0, backend=backend)
        grads[backend] = torch.autograd.grad(value, xx)[0]
    error = (grads["triton"][:2] - grads["torch"][:2]).abs().max() / grads["torch"][:2].abs().max()
    assert float(error) <= 1e-4


def test_backend_variable_is_not_forced_onto_the_bandwidth_helper(monkeypatch):
    """KEXUE_FAST_BACKEND=triton, meant for hsic, also reached its median_bandwidth call, which has no Triton path:
    hsic raised where backend="triton" as an argument ran."""
    x, y = torch.randn(64, 3, device=_device()), torch.randn(64, 2, device=_device())
    want = kexue_fast.hsic(x, y, backend="triton")
    monkeypatch.setenv("KEXUE_FAST_BACKEND", "triton")
    assert torch.equal(kexue_fast.hsic(x, y), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_laplace_of_duplicate_rows_in_float32(backend):
    """laplace's d = √(‖a‖² + ‖b‖² − 2a·b) in float32 was ~3e-4·‖a‖ for two equal rows (k = 0.996 for 1): the
    statistic on this data (20 points each repeated ~10 times) was 2.7e-4 (torch) and 2.5e-4 (Triton) off float64 at
    b9dc632, the C++ core's, which takes differences, 1.6e-8. Now every backend takes laplace's distances from
    differences."""
    g = torch.Generator().manual_seed(1)
    points = torch.randn(20, 3, generator=g, dtype=D64) * 3 + 5
    x = points[torch.randint(0, 20, (200,), generator=g)]
    y = torch.randn(200, 2, generator=g, dtype=D64) + x[:, :1]
    kw = dict(kernel_x="laplace", bandwidth_x=1.0, bandwidth_y=1.0)
    truth = kexue_fast.hsic(x, y, backend="torch", **kw)
    got = kexue_fast.hsic(x.float().to(_device()), y.float().to(_device()), backend=backend, **kw)
    assert float(abs(got.double().cpu() - truth) / truth) <= 1e-6


def test_mixed_precision_inputs_dispatch_on_the_wider_dtype():
    """x float32 with y float64: the Triton kernels (float32 only) cast y down where C++ and torch keep float64; the
    backend is now chosen for the wider dtype, so an explicit "triton" refuses it as for float64 inputs."""
    x = torch.randn(40, 3, device=_device())
    y = torch.randn(40, 2, dtype=D64, device=_device())
    with pytest.raises(NotImplementedError, match="float64"):
        kexue_fast.hsic(x, y, backend="triton")
    assert torch.isfinite(kexue_fast.hsic(x, y))
