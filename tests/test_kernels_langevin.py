"""The fused Langevin kernel (kernels/langevin.py) against the torch update at odd sizes (interpreted on CPU,
float32/float64): the kernel's error is at most 2× torch's own in the same dtype; in-kernel noise is N(0, 1),
reproducible by seed and fresh per step."""

import pytest
import torch

from kexue_fast.score import langevin_step
from kexue_fast.score.reference import langevin_step_reference

pytest.importorskip("triton")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(1,), (7,), (63, 2), (65, 3), (5, 7, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_update_matches_torch(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x, s, z = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    dev = _device()
    truth = langevin_step_reference(x.to(dtype), s.to(dtype), 0.37, z.to(dtype), temperature=0.6)
    args = [t.to(dtype).to(dev) for t in (x, s)]
    ours = langevin_step(*args, 0.37, temperature=0.6, noise=z.to(dtype).to(dev), backend="triton").cpu()
    theirs = langevin_step(*args, 0.37, temperature=0.6, noise=z.to(dtype).to(dev), backend="torch").cpu()
    assert ours.dtype == dtype
    err_ours = float((ours.double() - truth).abs().max())
    err_torch = float((theirs.double() - truth).abs().max())
    assert err_ours <= 2 * err_torch + (1e-15 if dtype == torch.float64 else 1e-7)


def test_in_kernel_noise_is_standard_normal_and_seeded():
    dev = _device()
    n = 40000
    zero = torch.zeros(n, dtype=torch.float64, device=dev)
    a = langevin_step(zero, zero, 4.0, backend="triton", generator=torch.Generator().manual_seed(3)).cpu()
    b = langevin_step(zero, zero, 4.0, backend="triton", generator=torch.Generator().manual_seed(3)).cpu()
    c = langevin_step(zero, zero, 4.0, backend="triton", generator=torch.Generator().manual_seed(4)).cpu()
    assert torch.equal(a, b) and not torch.equal(a, c)
    z = a / 2  # √(αT) = 2
    assert abs(float(z.mean())) < 4 / n**0.5 and abs(float(z.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(torch.stack((a, c)))[0, 1])) < 0.03
    # the update is exact: x + (α/2) s + √α z with the drawn z
    x = torch.randn(n, dtype=torch.float64, device=dev)
    s = torch.randn(n, dtype=torch.float64, device=dev)
    d = langevin_step(x, s, 4.0, backend="triton", generator=torch.Generator().manual_seed(3)).cpu()
    assert torch.allclose(d, x.cpu() + 2 * s.cpu() + a, atol=1e-12)


def test_fused_loop_steps_draw_fresh_noise():
    from kexue_fast.kernels.langevin import langevin_update

    dev = _device()
    x = torch.zeros(4096, device=dev)
    coef = torch.tensor([0.0, 1.0], device=dev)
    seed = torch.tensor([11], dtype=torch.int64, device=dev)
    z0 = langevin_update(x, x, coef, seed=seed, step=0)
    z1 = langevin_update(x, x, coef, seed=seed, step=1)
    assert abs(float(torch.corrcoef(torch.stack((z0, z1)).cpu())[0, 1])) < 0.06
    out = x.clone()
    langevin_update(out, x, coef, seed=seed, step=0, out=out)  # in place
    assert torch.equal(out, z0)


def test_kernel_rejects_bad_inputs():
    from kexue_fast.kernels.langevin import langevin_update

    dev = _device()
    x = torch.zeros(8, device=dev)
    with pytest.raises(ValueError, match="coef"):
        langevin_update(x, x, torch.zeros(2, dtype=torch.float64, device=dev), noise=x)
    with pytest.raises(ValueError, match="score must match"):
        langevin_update(x, torch.zeros(9, device=dev), torch.zeros(2, device=dev), noise=x)
    with pytest.raises(ValueError, match="seed"):
        langevin_update(x, x, torch.zeros(2, device=dev))
    with pytest.raises(ValueError, match="contiguous"):
        y = torch.zeros(4, 4, device=dev).T
        langevin_update(y, y, torch.zeros(2, device=dev), noise=y)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        langevin_update(x.long(), x.long(), torch.zeros(2, device=dev), noise=x.long())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gpu_fused_update_all_dtypes_large(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x, s, z = (torch.randn(1 << 20, 3, device="cuda", generator=g) for _ in range(3))
    truth = langevin_step_reference(x.to(dtype), s.to(dtype), 0.01, z.to(dtype))
    ours = langevin_step(x.to(dtype), s.to(dtype), 0.01, noise=z.to(dtype), backend="triton")
    theirs = langevin_step(x.to(dtype), s.to(dtype), 0.01, noise=z.to(dtype), backend="torch")
    err_ours = float((ours.double() - truth).abs().max())
    err_torch = float((theirs.double() - truth).abs().max())
    assert err_ours <= 2 * err_torch + 1e-6


@pytest.mark.gpu
def test_gpu_sampler_has_no_host_sync_and_captures_in_a_cuda_graph():
    from kexue_fast.score import AnnealedLangevin, GaussianMixture, geometric_sigmas

    target = GaussianMixture([0.5, 0.3, 0.2], [[-4.0, -4.0], [4.0, 4.0], [4.0, -4.0]], 0.5, dtype=torch.float32,
                             device="cuda")  # fmt: skip
    sampler = AnnealedLangevin(geometric_sigmas(10.0, 0.01, 30), 50, 2e-5, device="cuda", backend="triton")
    x = torch.rand(4000, 2, device="cuda") * 16 - 8
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler(target.score, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sampler(target.score, static_x.clone(), inplace=True)  # warm-up (compiles the kernel) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampler(target.score, static_x, inplace=True)
    static_x.copy_(x)
    graph.replay()
    first = static_x.clone()
    static_x.copy_(x)
    graph.replay()
    assert not torch.equal(first, static_x)  # fresh noise on every replay
    labels = target.responsibilities(static_x).argmax(1)
    mass = torch.bincount(labels, minlength=3).double().cpu() / 4000
    assert float((mass - target.weights.cpu()).abs().max()) <= 0.02


def test_strided_out_is_written():
    x = torch.randn(6, 4, device=_device())
    out = torch.empty(4, 6, device=_device()).T  # [6, 4], not contiguous
    s, z = torch.randn(6, 4, device=_device()), torch.randn(6, 4, device=_device())
    result = langevin_step(x, s, 0.1, noise=z, out=out, backend="triton")
    assert result is out
    assert torch.allclose(out, langevin_step(x, s, 0.1, noise=z, backend="torch"), atol=1e-6)
