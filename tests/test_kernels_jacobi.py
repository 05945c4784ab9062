"""The Jacobi Triton kernel (kernels/jacobi.py) against the torch reference and SciPy at odd sizes; interpreted on CPU
(float32 and float64): the kernel's error is at most 2× torch's own in the same dtype (vs float64)."""

import numpy as np
import pytest
import torch
from testing import jacobi_truth

from kexue_fast.rope import ellipj, elliptic

pytest.importorskip("triton")
sp = pytest.importorskip("scipy.special")
D64 = torch.float64


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    edges = torch.tensor([0.0, 1e-12, 1e-9, 1 - 1e-10, 1 - 1e-14, 1.0, 0.5, 1e-5], dtype=D64)
    m = torch.cat([torch.rand(n, generator=g, dtype=D64), edges])[: max(n, 1)]
    u = (torch.rand(m.shape, generator=g, dtype=D64) - 0.5) * 20
    return u, m


@pytest.mark.parametrize("n", [1, 7, 63, 65])
def test_kernel_float64_matches_scipy_and_torch(n):
    u, m = _inputs(n, seed=n)
    dev = _device()
    ours = ellipj(u.to(dev), m.to(dev), backend="triton")
    ref = ellipj(u, m, backend="torch")
    theirs = jacobi_truth(u, m)  # SciPy; mpmath where SciPy's series near m = 1 is wrong
    for a, r, s in zip(ours, ref, theirs):
        a = a.cpu()
        assert float((a - r).abs().max()) <= 1e-14
        assert np.max(np.abs(a.numpy() - s)) <= 1e-12


@pytest.mark.parametrize("n", [7, 64])
def test_kernel_float32_as_accurate_as_torch(n):
    u, m = _inputs(n, seed=100 + n)
    dev = _device()
    truth = ellipj(u, m, backend="torch")
    ours = ellipj(u.float().to(dev), m.float().to(dev), backend="triton")
    torch32 = ellipj(u.float(), m.float(), backend="torch")
    for name, a, b, t in zip("sn cn dn am".split(), ours, torch32, truth):
        # both see the same float32-rounded inputs: compare with the float64 function of those inputs
        t = getattr(ellipj(u.float().double(), m.float().double(), backend="torch"), name)
        err_kernel = float((a.cpu().double() - t).abs().max())
        err_torch = float((b.double() - t).abs().max())
        assert err_kernel <= 2 * err_torch + 1e-6, (name, err_kernel, err_torch)


def test_kernel_zeta_and_out_of_range():
    from kexue_fast.kernels.jacobi import jacobi_elliptic

    u, m = _inputs(40, seed=5)
    m = torch.cat([m, torch.tensor([1.5, -0.1, float("nan")], dtype=D64)])
    u = torch.cat([u, torch.ones(3, dtype=D64)])
    dev = _device()
    sn, *_, zeta = (t.cpu() for t in jacobi_elliptic(u.to(dev), m.to(dev)))
    assert torch.isnan(sn[-3:]).all() and torch.isnan(zeta[-3:]).all()
    ok = m[:-3]
    assert float((zeta[:-3] - elliptic.jacobi_zeta(u[:-3], ok)).abs().max()) <= 1e-14


def test_kernel_gradient_and_negative_m():
    dev = _device()
    u = torch.tensor([0.4, -2.1, 5.0, 1.3], dtype=D64, device=dev, requires_grad=True)
    m = torch.tensor([0.3, 0.7, -2.0, 0.99], dtype=D64, device=dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tuple(ellipj(a, b, backend="triton")), (u, m), atol=1e-6)
    a = ellipj(u.detach(), m.detach(), backend="triton")
    b = ellipj(u.detach(), m.detach(), backend="torch")
    for x, y in zip(a, b):
        assert float((x - y).abs().max()) <= 1e-14
    far = torch.tensor([-1e3, -1e6], dtype=D64, device=dev)  # 1 − μ passed along (HAS_MP): as the torch path
    a = ellipj(torch.tensor([25.0, 0.9], dtype=D64, device=dev), far, backend="triton")
    b = ellipj(torch.tensor([25.0, 0.9], dtype=D64), far.cpu(), backend="torch")
    for x, y in zip(a, b):
        assert float((x.cpu() - y).abs().max() / y.abs().max()) <= 1e-14


def test_kernel_rejects_bad_inputs():
    from kexue_fast.kernels.jacobi import jacobi_elliptic

    dev = _device()
    half = ellipj(torch.ones(4, dtype=torch.float16, device=dev), 0.5, backend="triton")
    assert half.sn.dtype == torch.float32  # half types compute in float32
    with pytest.raises(TypeError, match="float32 and float64"):
        jacobi_elliptic(torch.ones(4, dtype=torch.float16, device=dev), torch.ones(4, dtype=torch.float16, device=dev))
    with pytest.raises(ValueError, match="share shape"):
        jacobi_elliptic(torch.ones(4, device=dev), torch.ones(5, device=dev))
    with pytest.raises(ValueError, match="contiguous"):
        jacobi_elliptic(torch.ones(4, 4, device=dev).T, torch.ones(4, 4, device=dev).T)


@pytest.mark.gpu
def test_gpu_kernel_large_batch_matches_torch():
    g = torch.Generator(device="cuda").manual_seed(0)
    m = torch.rand(1 << 20, device="cuda", dtype=D64, generator=g)
    u = (torch.rand(1 << 20, device="cuda", dtype=D64, generator=g) - 0.5) * 40
    for a, b in zip(ellipj(u, m, backend="triton"), ellipj(u, m, backend="torch")):
        assert float((a - b).abs().max()) <= 1e-13


def test_troposkein_on_the_triton_backend_matches_torch():
    from kexue_fast.rope import troposkein

    dev = _device()
    L = torch.tensor([1.2, 2.5], dtype=D64, device=dev)
    a = troposkein(L, 1.0, 17, backend="triton")
    b = troposkein(L.cpu(), 1.0, 17, backend="torch")
    for x, y in ((a.x, b.x), (a.s, b.s), (a.tension, b.tension)):
        assert float((x.cpu() - y).abs().max()) <= 1e-13


def test_kernel_at_m_one_for_small_arguments():
    """m = 1: tanh u and sech u through the kernel's expm1, whose Taylor branch (|x| < 1/2) once returned x·e^x."""
    dev = _device()
    u = torch.linspace(-0.6, 0.6, 25, dtype=D64)
    ours = ellipj(u.to(dev), torch.ones_like(u).to(dev), backend="triton")
    assert float((ours.sn.cpu() - torch.tanh(u)).abs().max()) <= 1e-15
    assert float((ours.cn.cpu() - 1 / torch.cosh(u)).abs().max()) <= 1e-15
    assert float((ours.dn.cpu() - 1 / torch.cosh(u)).abs().max()) <= 1e-15


def test_kernel_matches_torch_at_m_one_and_small_m_for_large_arguments():
    """The kernel follows the torch reference where the m = 1 closed forms meet cosh's overflow (|u| > 355, NaN
    before) and where the first-order series in small m gives way to the Landen path (m·|u| ≥ 1e-8)."""
    dev = _device()
    u = torch.tensor([300.0, 356.0, 1e3, -1e6, 1e6, 1e6, 1e6, 5.0], dtype=D64)
    m = torch.tensor([1.0, 1.0, 1.0, 1.0, 5e-10, 9.9e-10, 1.1e-9, 5e-10], dtype=D64)
    ours = ellipj(u.to(dev), m.to(dev), backend="triton")
    want = ellipj(u, m, backend="torch")
    for a, b in zip(ours, want):
        assert torch.isfinite(a).all() and float((a.cpu() - b).abs().max()) <= 1e-9


def test_kernel_mixed_batch_with_m_one_and_negative_m():
    from test_rope import check_mixed_batch_with_m_one_and_negative_m

    check_mixed_batch_with_m_one_and_negative_m("triton", _device())
