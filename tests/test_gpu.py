"""CUDA-only checks of the Triton kernels at real sizes (skipped without a GPU; the CPU suite runs the same kernels
under TRITON_INTERPRET=1 at small sizes)."""

import pytest
import torch
from testing import matrix_with_gap, rel_err

import kexue_fast
from kexue_fast.nn import spectral_norm, spectral_norm_layers, update_spectral_norms

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_converges_on_large_mixed_list(dtype):
    shapes = [(1, 1), (7, 3), (63, 65), (127, 129), (1000, 300), (4096, 4096)]
    weights, norms = zip(*(matrix_with_gap(m, n, dtype=dtype, device="cuda", seed=i, with_norm=True)
                           for i, (m, n) in enumerate(shapes)))  # fmt: skip
    sigma, _, _ = kexue_fast.power_iteration(list(weights), n_iters=80, backend="triton")
    assert rel_err(sigma.cpu(), torch.stack(norms)) <= (1e-6 if dtype == torch.float64 else 1e-4)


def test_triton_matches_torch_backend_step_by_step():
    weights = [torch.randn(m, n, device="cuda") for m, n in [(33, 70), (512, 512), (2048, 96)]]
    v0 = [torch.randn(w.shape[1], device="cuda") for w in weights]
    a = kexue_fast.power_iteration(weights, n_iters=3, v=v0, backend="triton")
    b = kexue_fast.power_iteration(weights, n_iters=3, v=v0, backend="torch")
    assert rel_err(a[0], b[0]) < 1e-5
    for x, y in zip(a[1] + a[2], b[1] + b[2]):
        assert rel_err(x, y) < 1e-4


def test_update_spectral_norms_on_cuda_has_no_host_sync():
    model = torch.nn.Sequential(*[spectral_norm(torch.nn.Linear(64 + i, 80), n_power_iterations=0) for i in range(48)])
    model.cuda()
    update_spectral_norms(model)  # builds the plan and the pointer tables
    torch.cuda.set_sync_debug_mode("error")
    try:
        update_spectral_norms(model, n_iters=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for p, w in spectral_norm_layers(model):
        assert torch.isfinite(p.sigma(w)).item()


def test_residual_block_step_captures_in_a_cuda_graph():
    """Device-side roulette, no host sync: the compiled training step runs under CUDA graphs (reduce-overhead)."""
    import warnings

    from kexue_fast.nn import InvertibleResBlock, LipSwish

    g = torch.nn.Sequential(
        spectral_norm(torch.nn.Linear(8, 64), coeff=0.7, n_power_iterations=0), LipSwish(),
        spectral_norm(torch.nn.Linear(64, 8), coeff=0.7, n_power_iterations=0),
    ).cuda()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        block = InvertibleResBlock(g, logdet="roulette")

    def step(x):
        y, logdet = block(x)
        return (0.5 * y.pow(2).sum(1) - logdet).mean()

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    x = torch.randn(256, 8, device="cuda")
    for _ in range(3):
        # a training step as torch documents it for CUDA graphs: gradients reset (not accumulated into tensors a
        # replay overwrites), one step per replay
        block.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        loss = compiled(x)
        loss.backward()
    assert torch.isfinite(loss)


def test_fused_block_matches_torch_on_cuda(monkeypatch):
    """backend='triton' runs the fused block and agrees with the torch path; auto picks torch (measured faster)."""
    from kexue_fast.nn import InvertibleResBlock, LipSwish

    assert kexue_fast._dispatch.choose("invertible_resblock", torch.device("cuda"), torch.float32) == "torch"

    torch.manual_seed(0)
    g = torch.nn.Sequential(
        spectral_norm(torch.nn.Linear(16, 128), coeff=0.9, n_power_iterations=0), LipSwish(),
        spectral_norm(torch.nn.Linear(128, 16), coeff=0.9, n_power_iterations=0),
    ).cuda()  # fmt: skip
    block = InvertibleResBlock(g, n_terms=5)
    x = torch.randn(1024, 16, device="cuda")
    outs = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("KEXUE_FAST_BACKEND", backend)
        torch.manual_seed(1)
        y, logdet = block(x)
        logdet.sum().backward()
        outs[backend] = (y.detach(), logdet.detach(), g[0].parametrizations.weight.original.grad.clone())
        g.zero_grad()
    for a, b in zip(outs["triton"], outs["torch"]):
        assert rel_err(a, b) < 1e-4


def test_hsic_is_triton_on_cuda_and_matches_the_cpp_float64_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 16, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :4]) + torch.randn(20000, 4, generator=g, dtype=torch.float64)
    assert kexue_fast._dispatch.choose("hsic", torch.device("cuda"), torch.float32) == "triton"
    truth = kexue_fast.hsic_stats(x, y, bandwidth_x=4.0, bandwidth_y=1.5, backend="cpp")
    ours = kexue_fast.hsic_stats(x.float().cuda(), y.float().cuda(), bandwidth_x=4.0, bandwidth_y=1.5)
    for field in truth._fields:
        assert abs(float(getattr(ours, field)) / float(getattr(truth, field)) - 1) < 1e-5, field
    a = x.float().cuda().requires_grad_()
    out = kexue_fast.hsic(a, y.float().cuda(), bandwidth_x=4.0, bandwidth_y=1.5, estimator="unbiased", normalize=True)
    (grad,) = torch.autograd.grad(out, a)
    b = x[:4000].clone().requires_grad_()  # the gradient at a CPU-affordable size, against the C++ backward
    ref = kexue_fast.hsic(b, y[:4000], bandwidth_x=4.0, bandwidth_y=1.5, estimator="unbiased", normalize=True)
    (ref_grad,) = torch.autograd.grad(ref, b)
    c = x[:4000].float().cuda().requires_grad_()
    got = kexue_fast.hsic(c, y[:4000].float().cuda(), bandwidth_x=4.0, bandwidth_y=1.5, estimator="unbiased",
                          normalize=True)  # fmt: skip
    (got_grad,) = torch.autograd.grad(got, c)
    assert torch.isfinite(grad).all()
    assert float((got_grad.double().cpu() - ref_grad).abs().max()) < 1e-4 * float(ref_grad.abs().max())
