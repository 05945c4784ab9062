"""Denoising score matching and annealed Langevin sampling on analytic Gaussian mixtures (exact noisy scores):
the DSM minimizer is the noisy score, the samplers reproduce the target (per-mode mass, MMD) while plain Langevin
does not, an MDSM-trained energy covers every mode, the losses' formulas, and bad inputs."""

import math

import pytest
import torch
from torch import nn

from kexue_fast.score import (
    GaussianMixture,
    annealed_langevin,
    dde_generator_loss,
    dde_loss,
    denoise,
    dsm_loss,
    geometric_sigmas,
    score_from_energy,
    temperature_schedule,
    tempered_langevin,
)
from kexue_fast.score.reference import annealed_langevin_reference, mmd2_unbiased

D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny ops: one thread avoids oversubscription on a shared machine (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TARGET = dict(weights=[0.5, 0.3, 0.2], means=[[-4.0, -4.0], [4.0, 4.0], [4.0, -4.0]], stds=0.5)


def _mixture_family(params, x, sigma):
    """log p_σ(x) [B] of a 1-D two-component mixture with parameters (μ₁, μ₂, log s, logit π₁); σ [B]."""
    mu1, mu2, log_s, logit = params
    var = torch.exp(2 * log_s) + sigma**2
    logw = torch.log_softmax(torch.stack((logit, -logit)), 0)
    comps = torch.stack((mu1, mu2))
    logn = -0.5 * ((x[:, :1] - comps) ** 2 / var[:, None] + torch.log(2 * math.pi * var)[:, None])
    return torch.logsumexp(logw + logn, dim=1)


@pytest.mark.parametrize("parameterization", ["score", "energy"])
@pytest.mark.parametrize("sigmas", [[0.5], [0.3, 0.6, 1.0]])
def test_dsm_minimizer_is_the_exact_noisy_score(parameterization, sigmas):
    truth = GaussianMixture([0.7, 0.3], [[-1.5], [2.0]], 0.4)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x = truth.sample(n, g)
    noise = torch.randn(n, 1, generator=g, dtype=D64)
    idx = torch.randint(0, len(sigmas), (n,), generator=g)
    params = torch.tensor([-1.0, 1.0, math.log(0.8), 0.0], dtype=D64, requires_grad=True)

    def energy(x_noisy, sigma):
        return -_mixture_family(params, x_noisy, sigma)

    def score(x_noisy, sigma):
        return score_from_energy(energy)(x_noisy, sigma)

    model = energy if parameterization == "energy" else score
    opt = torch.optim.LBFGS([params], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = dsm_loss(model, x, sigmas, parameterization=parameterization, noise=noise, sigma_indices=idx,
                        conditional=True)  # fmt: skip
        loss.backward()
        return loss

    opt.step(closure)
    grid = torch.linspace(-4, 4, 81, dtype=D64)[:, None]
    for sigma in sigmas:
        s = torch.full((81,), sigma, dtype=D64)
        learned = score(grid, s).detach()
        exact = truth.score(grid, sigma)
        clean = truth.score(grid, 0.0)
        err = float((learned - exact).abs().max() / exact.abs().max())
        assert err < 0.03, (sigma, err)
        assert float((clean - exact).abs().max() / exact.abs().max()) > 0.3  # the check tells σ apart


def test_loss_formulas_with_given_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=g, dtype=D64)
    eps = torch.randn(7, 3, generator=g, dtype=D64)
    levels = torch.tensor([0.2, 0.5, 1.3], dtype=D64)
    idx = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    w = torch.randn(3, 3, generator=g, dtype=D64)

    def score(xn, sigma):
        return xn @ w / sigma[:, None]

    sig = levels[idx][:, None]
    xn = x + sig * eps
    ncsn = dsm_loss(score, x, levels, noise=eps, sigma_indices=idx, reduction="none")
    assert torch.allclose(ncsn, 0.5 * (sig**2 * (score(xn, sig[:, 0]) + eps / sig) ** 2).sum(1), atol=1e-13)

    def energy(xn):
        return (xn**2).sum(1) + (xn @ w).pow(3).sum(1)

    mdsm = dsm_loss(energy, x, levels, parameterization="energy", weighting="mdsm", sigma0=0.1, noise=eps,
                    sigma_indices=idx, reduction="none")  # fmt: skip
    grad_e = 2 * xn + 3 * (xn @ w) ** 2 @ w.T
    assert torch.allclose(mdsm, (((x - xn) / 0.01 + grad_e) ** 2).sum(1) / sig[:, 0] ** 2, rtol=1e-12)
    assert torch.allclose(dsm_loss(energy, x, levels, parameterization="energy", weighting="mdsm", noise=eps,
                                   sigma_indices=idx), mdsm.mean())  # fmt: skip
    # DDE: ‖(x̃ − x) + σ²∇f‖² = 2σ² × the DSM loss of the score ∇f
    f = lambda xn: -energy(xn)  # noqa: E731
    dde = dde_loss(f, x, 0.5, noise=eps, reduction="none")
    single = dsm_loss(score_from_energy(energy), x, 0.5, noise=eps, reduction="none")
    assert torch.allclose(dde, 2 * 0.25 * single, rtol=1e-12)


def test_dde_generator_loss_flows_into_the_samples():
    truth = GaussianMixture([1.0], [[0.0, 0.0]], 1.0)
    model = GaussianMixture([1.0], [[1.0, 0.0]], 1.0)
    samples = torch.randn(64, 2, dtype=D64, requires_grad=True)
    eps = torch.randn(64, 2, dtype=D64)
    loss = dde_generator_loss(lambda z: truth.log_prob(z, 0.3), lambda z: model.log_prob(z, 0.3), samples, 0.3,
                              noise=eps)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, samples)
    xn = samples.detach() + 0.3 * eps
    expected = (model.score(xn, 0.3) - truth.score(xn, 0.3)) / 64
    assert torch.allclose(grad, expected, atol=1e-14)
    same = dde_generator_loss(lambda z: truth.log_prob(z, 0.3), lambda z: truth.log_prob(z, 0.3), samples, 0.3)
    assert float(same.detach()) == 0.0


def test_denoise_is_the_posterior_mean():
    gauss = GaussianMixture([1.0], [[2.0, -1.0]], 0.7)
    x_noisy = torch.randn(9, 2, dtype=D64)
    sigma = 0.5
    posterior_mean = (0.49 * x_noisy + sigma**2 * gauss.means) / (0.49 + sigma**2)
    assert torch.allclose(denoise(gauss.score, x_noisy, sigma, sigma), posterior_mean, atol=1e-14)


def _mode_mass(mixture, x):
    return torch.bincount(mixture.responsibilities(x).argmax(1), minlength=mixture.means.shape[0]).double() / len(x)


def test_mixture_log_prob_and_mmd_against_independent_formulas():
    """The test yardsticks themselves: GaussianMixture.log_prob (its absolute value; the DDE losses use only
    differences) against SciPy's normal densities, and mmd2_unbiased against its double sum over i ≠ j."""
    stats = pytest.importorskip("scipy.stats")
    mix = GaussianMixture(weights=[0.2, 0.8], means=[[0.0, 1.0], [2.0, -1.0]], stds=[[0.5, 1.5], [1.0, 0.3]])
    x = torch.tensor([[0.1, 0.2], [1.9, -0.8], [5.0, 5.0]], dtype=D64)
    for sigma in (0.0, 0.7):
        densities = [
            sum(float(w) * stats.multivariate_normal.pdf(p.tolist(), mean=m.tolist(), cov=(s**2 + sigma**2).tolist())
                for w, m, s in zip(mix.weights, mix.means, mix.stds))
            for p in x
        ]  # fmt: skip
        expected = [math.log(d) for d in densities]
        torch.testing.assert_close(mix.log_prob(x, sigma), torch.tensor(expected, dtype=D64), rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 2, generator=g, dtype=D64), torch.randn(7, 2, generator=g, dtype=D64) + 0.5

    def k(p, q):
        return math.exp(-float(((p - q) ** 2).sum()) / (2 * 1.3**2))

    within_a = sum(k(a[i], a[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    within_b = sum(k(b[i], b[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    across = sum(k(p, q) for p in a for q in b) / (5 * 7)
    assert abs(float(mmd2_unbiased(a, b, 1.3)) - (within_a + within_b - 2 * across)) < 1e-14


def test_annealed_langevin_samples_match_the_target():
    target = GaussianMixture(**TARGET, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    n = 4000
    x0 = torch.rand(n, 2, generator=g) * 16 - 8
    x = annealed_langevin(target.score, x0, geometric_sigmas(10.0, 0.01, 30), 50, 2e-5, generator=g,
                          final_denoise=True)  # fmt: skip
    mass = _mode_mass(target, x)
    assert float((mass - target.weights).abs().max()) <= 0.02, mass
    reference = target.sample(n, g)
    assert float(mmd2_unbiased(x, reference, 1.0)) < 1e-3
    # plain Langevin at the smallest σ only (NCSN's motivating failure): the mode masses come out wrong
    plain = annealed_langevin(target.score, x0, [0.01], 1500, 2e-5, generator=g)
    assert float((_mode_mass(target, plain) - target.weights).abs().max()) > 0.05
    assert float(mmd2_unbiased(plain, reference, 1.0)) > 1e-3


def test_annealed_langevin_is_ncsn_algorithm_1():
    target = GaussianMixture(**TARGET)
    x0 = torch.randn(63, 2, dtype=D64, generator=torch.Generator().manual_seed(0)) * 3
    sigmas = [3.0, 1.0, 0.3]
    ours, trajectory = annealed_langevin(target.score, x0, sigmas, 7, 1e-3, generator=torch.Generator().manual_seed(5),
                                         return_trajectory=True, backend="torch")  # fmt: skip
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(63, 2, dtype=D64, generator=g) for _ in range(21)]
    ref = annealed_langevin_reference(target.score, x0, sigmas, 7, 1e-3, noises)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)
    assert len(trajectory) == 3 and torch.equal(trajectory[-1], ours)


def test_annealed_langevin_triton_backend_runs_the_same_dynamics():
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x0 = torch.randn(64, 2, dtype=D64, generator=torch.Generator().manual_seed(0)).to(dev)
    score = GaussianMixture(**TARGET, device=dev).score
    a = annealed_langevin(score, x0, [2.0, 0.5], 3, 1e-2, generator=torch.Generator().manual_seed(2), backend="triton")
    b = annealed_langevin(score, x0, [2.0, 0.5], 3, 1e-2, generator=torch.Generator().manual_seed(2), backend="triton")
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())
    assert not torch.equal(a, x0)


def test_tempered_langevin_keeps_the_target_at_temperature_one():
    target = GaussianMixture(**TARGET)
    g = torch.Generator().manual_seed(3)
    x0 = target.sample(3000, g)
    x = tempered_langevin(lambda z: target.score(z), x0, [1.0] * 100, 0.02, generator=g)
    assert float((_mode_mass(target, x) - target.weights).abs().max()) <= 0.03
    assert abs(float(x[target.responsibilities(x).argmax(1) == 0].std()) - 0.5) < 0.05


def test_mdsm_energy_model_covers_all_modes():
    torch.manual_seed(0)
    toy = GaussianMixture([0.25] * 4, [[-2.0, -2.0], [2.0, 2.0], [2.0, -2.0], [-2.0, 2.0]], 0.3, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 64), nn.Softplus(), nn.Linear(64, 64), nn.Softplus(), nn.Linear(64, 1))

    def energy(x):
        return net(x).squeeze(-1)

    def covered(x):
        labels = toy.responsibilities(x).argmax(1)
        near = (x - toy.means[labels]).norm(dim=1) < 1.0
        mass = torch.bincount(labels[near], minlength=4).float() / len(x)
        return bool((mass > 0.15).all()) and float(near.float().mean()) > 0.9

    x0 = torch.rand(2000, 2, generator=g) * 8 - 4
    temps = temperature_schedule(200, 10.0, 1.0)
    untrained = tempered_langevin(score_from_energy(energy, create_graph=False), x0, temps, 3e-3, sigma0=0.1,
                                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert not covered(untrained)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sigmas = geometric_sigmas(1.5, 0.1, 8)
    for _ in range(800):
        loss = dsm_loss(energy, toy.sample(256, g), sigmas, parameterization="energy", weighting="mdsm",
                        sigma0=0.1, generator=g)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = tempered_langevin(score_from_energy(energy, create_graph=False), x0, temps, 3e-3, sigma0=0.1,
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert covered(x)


def test_bad_inputs():
    x = torch.randn(4, 2)
    score = lambda z, s=None: -z  # noqa: E731
    with pytest.raises(ValueError, match="sigmas must be finite and > 0"):
        dsm_loss(score, x, [0.1, -0.2])
    with pytest.raises(ValueError, match="sigmas must be finite and > 0"):
        dsm_loss(score, x, 0.0)
    with pytest.raises(ValueError, match="sigma0"):
        dsm_loss(score, x, 0.1, weighting="mdsm", sigma0=0.0)
    with pytest.raises(ValueError, match="parameterization"):
        dsm_loss(score, x, 0.1, parameterization="density")
    with pytest.raises(ValueError, match="weighting"):
        dsm_loss(score, x, 0.1, weighting="sigma")
    with pytest.raises(ValueError, match="x's shape"):
        dsm_loss(lambda z: z[:, :1], x, 0.1)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, 1\]"):
        dsm_loss(lambda z: z, x, 0.1, parameterization="energy")
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        dsm_loss(score, x.long(), 0.1)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        dde_loss(lambda z: z.sum(1), x, -1.0)
    with pytest.raises(ValueError, match="step_lr"):
        annealed_langevin(score, x, [1.0], 2, 0.0)
    with pytest.raises(ValueError, match="n_steps_each"):
        annealed_langevin(score, x, [1.0], 0)
    with pytest.raises(ValueError, match="sigmas must be finite and > 0"):
        annealed_langevin(score, x, [1.0, float("nan")])
    with pytest.raises(ValueError, match="temperatures"):
        tempered_langevin(score, x, [1.0, -1.0], 0.1)
    with pytest.raises(ValueError, match="score must return"):
        annealed_langevin(lambda z, s: z[:, 0], x, [1.0], 1)
    with pytest.raises(ValueError, match="backend"):
        annealed_langevin(score, x, [1.0], 1, backend="gpu")
    for sampler in (lambda s: annealed_langevin(s, x, [1.0], 1), lambda s: tempered_langevin(s, x, [1.0], 0.1)):
        with pytest.raises(TypeError, match="score must be callable"):
            sampler(None)
    with pytest.raises(ValueError, match="sigma must be one noise level"):
        dde_loss(lambda z: z.sum(1), x, [0.1, 0.2])
    with pytest.raises(ValueError, match="sigma must be one noise level"):
        dde_generator_loss(lambda z: z.sum(1), lambda z: z.sum(1), x, torch.tensor([0.1, 0.2]))
    from kexue_fast.score import langevin_step

    for bad, name in ((torch.tensor(-1e-3), "step_size"), (torch.tensor(float("nan")), "step_size")):
        with pytest.raises(ValueError, match=f"{name} must be finite and > 0"):
            langevin_step(x, -x, bad)
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        langevin_step(x, -x, 1e-3, temperature=torch.tensor(-1.0))


def test_schedules_keep_their_endpoints_exactly():
    """The geometric σ and temperature schedules hit their endpoints exactly in float64 (their logs were taken in
    float32: σ_max = 7.3 came out as 7.2999999)."""
    g = geometric_sigmas(7.3, 0.037, 10, dtype=D64)
    assert (float(g[0]), float(g[-1])) == (7.3, 0.037)
    assert torch.allclose(g[1:] / g[:-1], (g[1] / g[0]).expand(9), rtol=1e-12, atol=0)
    t = temperature_schedule(10, 37.0, 1.3)
    assert (float(t[0]), float(t[-1])) == (37.0, 1.3)


def test_half_precision_cpu_steps_run_in_float32():
    """float16 on the CPU torch path with α/2 beyond float16's range (σ_1/σ_L = 1e5): the step runs in float32 and
    rounds once, as the Triton path does (it raised "value cannot be converted to type c10::Half")."""
    from kexue_fast.score import langevin_step

    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    score = -x * 1e-6
    got = langevin_step(x.half(), score.half(), 2e5, noise=noise.half(), backend="torch")
    want = (x.half().float() + 1e5 * score.half().float() + math.sqrt(2e5) * noise.half().float()).half()
    assert got.dtype == torch.float16 and torch.equal(got, want)
    _, path = annealed_langevin(lambda z, s: -z / s[:, None] ** 2, x.half(), [1000.0, 0.01], 1, 2e-5, backend="torch",
                                return_trajectory=True)  # fmt: skip
    assert path[0].dtype == torch.float16 and torch.isfinite(path[0].float()).all()  # the level with α/2 = 1e5


def test_compile_fullgraph_smoke():
    from kexue_fast.score import langevin_step

    x, s, z = torch.randn(3, 5, 3).unbind(0)
    step = torch.compile(lambda a, b, c: langevin_step(a, b, 0.1, noise=c, backend="torch"), fullgraph=True)
    assert torch.allclose(step(x, s, z), x + 0.05 * s + 0.1**0.5 * z, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_samplers_follow_x_layout_and_dtype(backend):
    """Non-contiguous starts (the fused kernel writes contiguous buffers), a float32 model sampling float64 x, and
    schedules that must decrease."""
    from kexue_fast.score import AnnealedLangevin, langevin_step

    if backend == "triton":
        pytest.importorskip("triton")
    # Triton on CPU tensors only under the interpreter (no CUDA)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    score32 = lambda x, *args: -x.float()  # noqa: E731
    start = torch.randn(3, 8, dtype=D64, device=dev).T  # [8, 3], transposed: not contiguous
    g = torch.Generator(dev).manual_seed(0)
    tempered = tempered_langevin(score32, start, step_size=0.01, temperatures=[1.0, 0.5], n_steps_each=2,
                                 generator=g, backend=backend)  # fmt: skip
    assert tempered.dtype == D64 and tempered.shape == (8, 3)
    annealed = annealed_langevin(score32, start, [1.0, 0.5], n_steps_each=2, generator=g, backend=backend)
    assert annealed.dtype == D64
    sampler = AnnealedLangevin([1.0, 0.5], n_steps_each=2, device=dev, dtype=D64, backend=backend)
    x = start.clone()
    out = sampler(score32, x, generator=g, inplace=True)
    assert out is x and x.dtype == D64
    with pytest.raises(ValueError, match="strictly decreasing"):
        annealed_langevin(score32, start, [0.1, 1.0], n_steps_each=1)
    z = torch.tensor([1.0, 1.0], device=dev)
    step = langevin_step(torch.tensor([1.0, 1.0], device=dev), torch.tensor([2.0, 2.0], device=dev), 1.0, noise=z,
                         out=z, backend=backend)  # fmt: skip
    assert torch.equal(step, torch.tensor([3.0, 3.0], device=dev))  # x + (α/2)s + √α z, with out aliasing the noise


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_samplers_keep_a_dense_layout_and_refuse_inplace_on_shared_memory(backend):
    """A channels_last start stays channels_last (the score model sees it every step, the Triton kernel runs on its
    memory as it lies: no copy per step); on torch the samples equal the contiguous start's for one seed (the noise
    drawn in the shape's order); langevin_step with given noise equals the contiguous update on either backend;
    inplace=True on an expanded x raises before any step (torch's copy_ refused it after all of them)."""
    from kexue_fast.score import AnnealedLangevin, langevin_step

    if backend == "triton":
        pytest.importorskip("triton")
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    layouts = []

    def score(x, *args):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return -x

    start = torch.randn(2, 3, 4, 5, dtype=D64, device=dev)
    start_cl = start.contiguous(memory_format=torch.channels_last)
    runs = []
    for x0 in (start, start_cl):
        g = torch.Generator(dev).manual_seed(0)
        runs.append(annealed_langevin(score, x0, [1.0, 0.5], n_steps_each=2, generator=g, backend=backend))
    assert layouts[len(layouts) // 2 :] == [True] * (len(layouts) // 2) and runs[1].stride() == start_cl.stride()
    if backend == "torch":
        assert torch.equal(runs[0], runs[1])
    sampler = AnnealedLangevin([1.0, 0.5], n_steps_each=2, device=dev, dtype=D64, backend=backend)
    x = start_cl.clone()
    ptr = x.data_ptr()
    assert sampler(score, x, inplace=True) is x and x.data_ptr() == ptr and not torch.equal(x, start_cl)
    s, z = torch.randn(2, 2, 3, 4, 5, dtype=D64, device=dev).unbind(0)
    want = langevin_step(start, s, 0.1, noise=z, backend=backend)
    to_cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    got = langevin_step(start_cl, to_cl(s), 0.1, noise=to_cl(z), backend=backend)
    assert torch.equal(got, want) and got.stride() == start_cl.stride()
    out = to_cl(torch.empty_like(start))
    assert langevin_step(start_cl, s, 0.1, noise=z, out=out, backend=backend) is out and torch.equal(out, want)
    calls = len(layouts)
    with pytest.raises(ValueError, match=r"inplace=True.*share memory"):
        sampler(score, start[:1].expand(3, 3, 4, 5), inplace=True)
    assert len(layouts) == calls


def test_losses_differentiate_a_sigma_that_requires_grad():
    """dsm_loss and dde_loss detached a sigma tensor that requires grad (its gradient stayed None, silently); the
    levels keep its graph: gradcheck in float64 with the noise and the level indices fixed."""
    from kexue_fast.score import dde_loss

    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 3).double()
    model = lambda t, sigma: linear(t) / sigma[:, None]  # noqa: E731
    x, noise = torch.randn(2, 5, 3, dtype=D64).unbind(0)
    levels = torch.tensor([0.7, 0.3], dtype=D64, requires_grad=True)
    index = torch.tensor([0, 1, 1, 0, 1])
    assert torch.autograd.gradcheck(lambda s: dsm_loss(model, x, s, noise=noise, sigma_indices=index), (levels,))
    one = torch.tensor([0.4], dtype=D64, requires_grad=True)
    energy = lambda t: t.pow(2).sum(1)  # noqa: E731
    assert torch.autograd.gradcheck(lambda s: dde_loss(energy, x, s, noise=noise), (one,))


def test_dsm_loss_with_one_level_draws_no_index():
    """One σ needs no level index: no torch.randint (torch.func.vmap refused it in its default randomness mode)."""
    model = torch.nn.Linear(3, 3).double()
    x, noise = torch.randn(2, 4, 3, dtype=D64).unbind(0)
    per_sample = torch.func.vmap(lambda a, e: dsm_loss(model, a[None], 0.5, noise=e[None]))(x, noise)
    want = torch.stack([dsm_loss(model, a[None], 0.5, noise=e[None]) for a, e in zip(x, noise)])
    torch.testing.assert_close(per_sample, want, rtol=1e-12, atol=0)


def test_sigma_indices_noise_and_sigma0_are_checked():
    """A bool sigma_indices was taken as a mask (all-True [B] with B levels gave every level once), negative ones
    wrapped around, out-of-range ones and lists crashed in indexing; sigma0 = inf dropped MDSM's data term."""
    model = lambda x, *args: -x  # noqa: E731
    x = torch.randn(3, 2, dtype=D64)
    levels = [10.0, 5.0, 2.0]
    picked = dsm_loss(model, x, levels, sigma_indices=torch.tensor([1, 1, 1]), reduction="none")
    assert picked.shape == (3,)
    for bad, error, match in ((torch.ones(3, dtype=torch.bool), TypeError, "not bool"), ([1, 1, 1], TypeError, "list"),
                              (torch.tensor([1.0, 1.0, 1.0]), TypeError, "float"),
                              (torch.tensor([-1, 0, 1]), ValueError, r"\[0, 3\)"),
                              (torch.tensor([0, 3, 1]), ValueError, r"\[0, 3\)"),
                              (torch.tensor([0, 1]), ValueError, "shape")):  # fmt: skip
        with pytest.raises(error, match=match):
            dsm_loss(model, x, levels, sigma_indices=bad)
    with pytest.raises(TypeError, match="noise"):
        dsm_loss(model, x, levels, noise=[[0.0, 0.0]] * 3)
    for sigma0 in (math.inf, 0.0, float("nan")):
        with pytest.raises(ValueError, match="sigma0"):
            dsm_loss(model, x, 1.0, weighting="mdsm", parameterization="energy", sigma0=sigma0)


def test_one_level_schedules_start_at_the_start():
    """n = 1 gave the end (σ_min, T_min) for the geometric schedules but the start for the linear one."""
    assert geometric_sigmas(10.0, 1.0, 1).tolist() == [10.0]
    assert temperature_schedule(1, 100.0, 1.0).tolist() == temperature_schedule(1, 100.0, 1.0, "linear").tolist()
    assert geometric_sigmas(10.0, 1.0, 2).tolist() == [10.0, 1.0]


def test_step_size_takes_numpy_scalars():
    import numpy as np

    from kexue_fast.score import langevin_step

    x = torch.zeros(4)
    z = torch.ones(4)
    for step in (np.float32(0.25), np.float64(0.25), 0.25):
        assert torch.allclose(langevin_step(x, z, step, noise=z), torch.full((4,), 0.125 + 0.5))


def test_sigmas_out_of_the_data_dtype_range_are_named_as_given():
    """Half data: σ = 1e5 became inf and 1e-8 became 0 before the check, which then reported [inf] or [0.0]."""
    x = torch.randn(3, 2, dtype=torch.float16)
    for sigma, shown in ((1e5, "100000.0"), (1e-8, "1e-08")):
        with pytest.raises(ValueError, match=rf"float16: \[{shown}\] became"):
            dsm_loss(lambda x, *args: -x, x, sigma)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_sigma_indices_of_any_integer_dtype_index_the_levels(dtype):
    """uint8 indices were taken as a mask by torch's indexing ([2, 1, 1] gave σ = [10, 5, 2], not [2, 5, 5]), int8
    and int16 ones crashed in it."""
    seen = []

    def model(x, sigma):
        seen.append(sigma.tolist())
        return -x

    x = torch.randn(3, 2, dtype=D64)
    dsm_loss(model, x, [10.0, 5.0, 2.0], sigma_indices=torch.tensor([2, 1, 1], dtype=dtype))
    assert seen == [[2.0, 5.0, 5.0]]


def test_half_precision_losses_are_summed_in_float32():
    """float16 per-sample sums of squares overflowed to inf from 65504 (‖ε‖²/2 ≈ 98 000 at [3, 256, 256])."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 256, 256, generator=g)
    noise = torch.randn(2, 3, 256, 256, generator=g)
    zero = lambda z, *args: torch.zeros_like(z)  # noqa: E731
    want = dsm_loss(zero, x, 0.5, noise=noise, reduction="none")
    for dtype in (torch.float16, torch.bfloat16):
        got = dsm_loss(zero, x.to(dtype), 0.5, noise=noise.to(dtype), reduction="none")
        assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-2)
    energy = lambda z: 0.5 * (z.float() ** 2).sum(1)  # noqa: E731
    toy, eps = torch.randn(512, 2, generator=g), torch.randn(512, 2, generator=g)
    idx = torch.randint(0, 3, (512,), generator=g)
    kwargs = dict(parameterization="energy", weighting="mdsm", sigma0=0.1, sigma_indices=idx)
    want = dsm_loss(energy, toy, [3.0, 1.0, 0.3], noise=eps, **kwargs)
    got = dsm_loss(energy, toy.half(), [3.0, 1.0, 0.3], noise=eps.half(), **kwargs)
    assert torch.isfinite(got) and torch.allclose(got, want, rtol=1e-2)
    assert dde_loss(lambda z: -energy(z), x[:, 0, 0, :2].half(), 0.5).dtype == torch.float32


def test_sampler_levels_must_survive_the_samples_dtype():
    """Half samples: σ = 1e5 reached the score as inf and 1e-8 as 0 (every sample NaN), with no error."""
    x = torch.randn(4, 2, dtype=torch.float16)
    score = lambda z, s: -z  # noqa: E731
    for levels, shown in (([1e5, 1.0], "inf"), ([1.0, 1e-8], "0.0"), ([1.0001, 1.0], "1.0, 1.0")):
        with pytest.raises(ValueError, match=rf"float16: .* became \[.*{shown}.*\]"):
            annealed_langevin(score, x, levels, 1)


def test_energy_scores_under_inference_mode_and_unclear_energies():
    """score_from_energy under torch.inference_mode (a common way to sample) failed with "element 0 of tensors does
    not require grad"; an energy independent of x, or returning a float, failed deep in autograd."""
    energy = lambda z: 0.5 * (z**2).sum(1)  # noqa: E731
    x = torch.randn(4, 2, dtype=D64)
    with torch.inference_mode():
        xi = x.clone()
        assert torch.allclose(score_from_energy(energy)(xi), -x)
        assert torch.isfinite(dsm_loss(energy, xi, 0.5, parameterization="energy"))
        out = tempered_langevin(score_from_energy(energy, create_graph=False), xi, [1.0], 0.1)
        assert out.shape == (4, 2)
    for bad in (lambda z: z.sum(1).detach(), lambda z: torch.zeros(z.shape[0])):
        with pytest.raises(ValueError, match="does not depend on its input x"):
            score_from_energy(bad)(x)
    with pytest.raises(TypeError, match="must return a tensor"):
        score_from_energy(lambda z: 1.0)(x)
    with pytest.raises(TypeError, match="log_density_model must return a tensor"):
        dde_generator_loss(lambda z: z.sum(1), lambda z: 0.0, x, 0.1)


def test_denoise_checks_its_inputs():
    """denoise took σ = −1 as 1, σ = 0 as a no-op, NaN, and broadcast a score of the wrong shape."""
    x = torch.randn(4, 2, dtype=D64)
    score = lambda z: -z  # noqa: E731
    assert torch.allclose(denoise(score, x, 0.5), 0.75 * x)
    per_sample = torch.tensor([0.5, 1.0, 0.5, 1.0], dtype=D64)
    assert torch.allclose(denoise(score, x, per_sample), x * (1 - per_sample**2)[:, None])
    for bad in (0.0, -1.0, float("nan"), torch.tensor([0.5, -0.5, 0.5, 0.5])):
        with pytest.raises(ValueError, match="sigma must be finite and > 0"):
            denoise(score, x, bad)
    with pytest.raises(ValueError, match=r"one per sample \[B\] = \[4\]"):
        denoise(score, x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="x_noisy's shape"):
        denoise(lambda z: z[:, :1], x, 0.5)
    sigma = torch.tensor(0.5, dtype=D64, requires_grad=True)
    denoise(score, x, sigma).sum().backward()
    assert torch.allclose(sigma.grad, -2 * 0.5 * x.sum())  # d/dσ Σ(x − σ²x)


def test_numbers_given_as_numpy_or_0d_tensors_and_bad_containers():
    import numpy as np

    x = torch.randn(4, 2)
    score = lambda z, *args: -z  # noqa: E731
    assert annealed_langevin(score, x, [1.0, 0.5], np.int64(2), torch.tensor(1e-3)).shape == (4, 2)
    assert tempered_langevin(score, x, [1.0], torch.tensor(0.1), n_steps_each=np.int32(2)).shape == (4, 2)
    assert geometric_sigmas(1.0, 0.1, np.int64(3)).shape == (3,)
    assert torch.isfinite(dsm_loss(score, x, 1.0, weighting="mdsm", sigma0=torch.tensor(0.1)))
    with pytest.raises(TypeError, match="sigmas must be a number, a sequence of numbers or a tensor, got str"):
        dsm_loss(score, x, "0.3")
    with pytest.raises(ValueError, match="sigmas must be one level or a 1-D tensor"):
        dsm_loss(score, x, torch.tensor([[1.0, 0.5]]))
    with pytest.raises(TypeError, match="temperatures must be a sequence of numbers or a tensor"):
        tempered_langevin(score, x, "abc", 0.1)
    with pytest.raises(ValueError, match="temperatures must be one value or a 1-D sequence"):
        tempered_langevin(score, x, [[1.0, 0.5]], 0.1)
    with pytest.raises(TypeError, match="noise must be a floating tensor"):
        dsm_loss(score, x, 1.0, noise=torch.ones(4, 2, dtype=torch.long))
    from kexue_fast.score import langevin_step

    with pytest.raises(TypeError, match="noise must be a tensor"):
        langevin_step(x, -x, 0.1, noise=[1.0])
