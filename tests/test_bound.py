import pytest
import torch
from testing import matrix_with_gap, rel_err

import kexue_fast


def _adversarial_inputs():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(512, 512, dtype=torch.float64, generator=g)
    yield torch.randn(1, 1, dtype=torch.float64, generator=g)
    yield torch.randn(7, 3, dtype=torch.float64, generator=g)
    yield torch.randn(3, 130, dtype=torch.float64, generator=g)
    a, b = torch.randn(40, 1, dtype=torch.float64, generator=g), torch.randn(1, 30, dtype=torch.float64, generator=g)
    yield a @ b  # rank one: ‖W‖_F = ‖W‖₂, the bound is tight to rounding
    yield torch.eye(17, dtype=torch.float64)  # all singular values equal: no gap at all
    yield torch.eye(17, dtype=torch.float64) * 1e-30
    yield torch.eye(5, dtype=torch.float64) * 1e30
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64, generator=g))
    yield q * torch.tensor([1.0] * 2 + [1 - 1e-12] * 18, dtype=torch.float64)  # near-degenerate top
    for seed in range(10):
        yield matrix_with_gap(33, 17, gap=1.0 + 1e-9 * seed, seed=seed)
    yield torch.zeros(4, 6, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_iters", [1, 3, 10])
def test_bound_is_never_below_the_norm(dtype, n_iters):
    for w in _adversarial_inputs():
        w = w.to(dtype)
        bound = kexue_fast.spectral_norm_bound(w, n_iters=n_iters)
        assert bound.dtype == dtype
        exact = torch.linalg.matrix_norm(w.double(), ord=2)
        assert float(bound) >= float(exact), (tuple(w.shape), float(bound), float(exact))
        assert float(bound) >= float(torch.linalg.matrix_norm(w, ord=2))


def test_bound_is_tight_after_ten_iterations():
    w = torch.randn(512, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.matrix_norm(w, ord=2)
    bound = kexue_fast.spectral_norm_bound(w, n_iters=10)
    assert 0 <= float(bound / exact - 1) <= 1e-3
    assert float(kexue_fast.spectral_norm_bound(w, n_iters=3) / exact - 1) > 1e-3  # it does tighten with N


def test_batched_bound_and_gradient():
    w = torch.stack([matrix_with_gap(6, 9, seed=s) for s in range(3)]).requires_grad_()
    bound = kexue_fast.spectral_norm_bound(w, n_iters=8)
    assert bound.shape == (3,)
    bound.sum().backward()
    exact = torch.linalg.matrix_norm(w.detach(), ord=2)
    assert rel_err(bound.detach(), exact) < 1e-6
    w2 = w.detach().clone().requires_grad_()
    torch.linalg.matrix_norm(w2, ord=2).sum().backward()
    assert rel_err(w.grad, w2.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bound_of_a_zero_matrix_has_zero_gradient(dtype):
    # 0 is not differentiable for any norm; like vector_norm's, the bound's gradient there is 0, not 0 · ∞ = NaN
    w = torch.zeros(3, 4, 6, dtype=dtype)
    w[1] = matrix_with_gap(4, 6, seed=2).to(dtype)
    w.requires_grad_()
    bound = kexue_fast.spectral_norm_bound(w)
    bound.sum().backward()
    assert bound.detach()[[0, 2]].tolist() == [0.0, 0.0]
    assert torch.equal(w.grad[0], torch.zeros_like(w.grad[0])) and torch.equal(w.grad[2], w.grad[0])
    assert torch.isfinite(w.grad[1]).all() and w.grad[1].abs().amax() > 0


def test_bound_bad_inputs():
    with pytest.raises(ValueError, match="weight"):
        kexue_fast.spectral_norm_bound(torch.randn(5))
    with pytest.raises(ValueError, match="weight"):
        kexue_fast.spectral_norm_bound(torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="n_iters"):
        kexue_fast.spectral_norm_bound(torch.randn(3, 3), n_iters=0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        kexue_fast.spectral_norm_bound(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="weight"):
        kexue_fast.spectral_norm_bound([[1.0]])
