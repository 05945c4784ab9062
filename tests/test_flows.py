import copy
import hashlib
import math
import warnings

import pytest
import torch
from torch import nn

from kexue_fast.flows import lipschitz_report, reference
from kexue_fast.flows import logdet as L
from kexue_fast.nn import ActNorm, InvertibleResBlock, LipSwish, Squeeze, spectral_norm, update_spectral_norms

D64 = torch.float64


def mlp(dim, hidden=16, coeff=0.9, act=LipSwish):
    g = nn.Sequential(
        spectral_norm(nn.Linear(dim, hidden), coeff=coeff, n_power_iterations=0),
        act(),
        spectral_norm(nn.Linear(hidden, dim), coeff=coeff, n_power_iterations=0),
    ).double()
    update_spectral_norms(g, n_iters=200, tol=1e-12)
    return g


def linear_g(eigenvalues):
    """g(x) = A x with A symmetric of the given spectrum (so log det(I + A) and the truncated series are known)."""
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=D64, generator=torch.Generator().manual_seed(d)))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=D64)) @ q.T
    g = nn.Linear(d, d, bias=False).double()
    with torch.no_grad():
        g.weight.copy_(a)
    return g


def truncated_value(eigenvalues, n_terms):
    return sum((-1) ** (k + 1) * sum(lam**k for lam in eigenvalues) / k for k in range(1, n_terms + 1))


def true_logdet(eigenvalues):
    return sum(math.log(1 + lam) for lam in eigenvalues)


@pytest.mark.parametrize("dim", [1, 2, 3, 5, 8, 13, 16])
def test_exact_logdet_equals_slogdet_of_autograd_jacobian(dim):
    torch.manual_seed(dim)
    block = InvertibleResBlock(mlp(dim), logdet="exact")
    x = torch.randn(3, dim, dtype=D64)
    y, logdet = block(x)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda z: z + block.g(z), x[b : b + 1]).reshape(dim, dim)
        assert abs(float(logdet[b].detach()) - float(torch.linalg.slogdet(jac).logabsdet)) <= 1e-10
    assert torch.allclose(y, x + block.g(x))


def test_series_with_exact_traces_equals_closed_form():
    eig = [0.9, -0.5, 0.3, 0.05]
    g = linear_g(eig)
    d = len(eig)
    x = torch.randn(2, d, dtype=D64)
    # probes √d·e_i averaged over i give exact traces
    probes = [math.sqrt(d) * torch.eye(d, dtype=D64)[i].expand(2, d) for i in range(d)]
    for n in (1, 2, 5, 9):
        _, value = L.series_logdet(g, x, [L.truncated_plan(n)] * d, probes, neumann_grad=True, memory_efficient=True)
        assert torch.allclose(value, torch.full_like(value, truncated_value(eig, n)), atol=1e-8, rtol=0)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_series_mean_is_the_truncated_value(probe):
    eig = [0.8, 0.6, 0.4]  # truncation bias ≈ 0.17, far above the standard error
    torch.manual_seed(0)
    block = InvertibleResBlock(linear_g(eig), logdet="series", n_terms=2, probe=probe)
    x = torch.zeros(20000, 3, dtype=D64)  # each row gets its own probe: independent estimates
    with torch.no_grad():
        _, values = block(x)
    mean, se = float(values.mean()), float(values.std() / math.sqrt(values.numel()))
    assert abs(mean - truncated_value(eig, 2)) <= 4 * se
    assert abs(mean - true_logdet(eig)) > 4 * se  # truncation bias is real: the mean is not the log-det


def test_roulette_is_unbiased_over_10000_calls():
    eig = [0.5, -0.4, 0.3]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lip = 0.5: 0.25 < 1 - p, no variance warning
        block = InvertibleResBlock(linear_g(eig), logdet="roulette", n_exact_terms=1, roulette_p=0.5)
        x = torch.zeros(1, 3, dtype=D64)
        with torch.no_grad():
            values = torch.cat([block(x)[1] for _ in range(10000)])
    mean, se = float(values.mean()), float(values.std() / math.sqrt(values.numel()))
    assert abs(mean - true_logdet(eig)) <= 4 * se


def test_roulette_variance_warnings():
    with pytest.warns(RuntimeWarning, match="finite variance only if"):
        InvertibleResBlock(linear_g([0.9, 0.1]), logdet="roulette", roulette_p=0.5)(torch.zeros(1, 2, dtype=D64))
    with pytest.warns(RuntimeWarning, match="variance is infinite"):
        InvertibleResBlock(linear_g([0.3, 0.1]), logdet="roulette", roulette="poisson")


def test_neumann_gradient_is_unbiased():
    eig = [0.45, -0.3, 0.2]
    torch.manual_seed(2)
    g = linear_g(eig)
    block = InvertibleResBlock(g, logdet="roulette", n_exact_terms=1, roulette_p=0.5, n_probes=1)
    x = torch.randn(1, 3, dtype=D64)
    grads = []
    for _ in range(4000):
        g.zero_grad()
        block(x)[1].sum().backward()
        grads.append(g.weight.grad.flatten().clone())
    grads = torch.stack(grads)
    w = g.weight.detach().clone().requires_grad_()
    torch.linalg.slogdet(torch.eye(3, dtype=D64) + w).logabsdet.backward()
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
    assert bool(((mean - w.grad.flatten()).abs() <= 4 * se).all()), (mean, w.grad.flatten(), se)


@pytest.fixture(params=["auto", "torch"])
def dense_backend(request, monkeypatch):
    """Dense-chain blocks on the CPU by `auto` (the C++ block, kexue_fast.flows.chain_cpp: these tests' steps are
    small enough for it at any torch thread count, chain_cpp.use_cpp) and by the torch closed form
    (kexue_fast.flows.chain_neumann)."""
    monkeypatch.setenv("KEXUE_FAST_BACKEND", request.param)
    return request.param


def _weighted_grads(memory_efficient, neumann_grad=True, n_terms=4, logdet="series", path="autograd", act=LipSwish):
    torch.manual_seed(3)
    g = mlp(3, coeff=0.8, act=act)
    torch.manual_seed(4)
    x = torch.randn(6, 3, dtype=D64, requires_grad=True)
    block = InvertibleResBlock(g, logdet=logdet, n_terms=n_terms, n_probes=2, neumann_grad=neumann_grad,
                               memory_efficient=memory_efficient)  # fmt: skip
    if path == "autograd":
        block._chain = None
    assert block.series_path == path
    torch.manual_seed(5)  # the same probes
    _y, value = block(x)
    weights = torch.tensor([1.0, 2.0, 3.0, 0.0, -1.0, 5.0], dtype=D64)
    (value * weights).sum().backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in g.parameters()]
    return value.detach(), [t.clone() for t in grads] + [x.grad.clone() if x.grad is not None else torch.zeros_like(x)]


def test_memory_efficient_equals_plain_neumann_with_per_sample_weights():
    value_a, grads_a = _weighted_grads(memory_efficient=True)
    value_b, grads_b = _weighted_grads(memory_efficient=False)
    assert torch.equal(value_a, value_b)
    assert len(grads_a) == len(grads_b) > 1 and all(bool(t.abs().sum() > 0) for t in grads_a[:2])
    for a, b in zip(grads_a, grads_b):
        assert (a - b).abs().max() <= 1e-12 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("act", [LipSwish, nn.ELU, nn.Tanh, lambda: nn.LeakyReLU(0.3)])
@pytest.mark.parametrize("neumann_grad", [True, False])
@pytest.mark.parametrize("logdet", ["series", "roulette"])
def test_dense_chain_path_equals_autograd_path(act, neumann_grad, logdet, dense_backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # roulette variance notice
        value_a, grads_a = _weighted_grads(True, neumann_grad, logdet=logdet, path="autograd", act=act)
        value_c, grads_c = _weighted_grads(True, neumann_grad, logdet=logdet, path="dense-chain", act=act)
    assert torch.allclose(value_a, value_c, atol=1e-13, rtol=0)
    for a, c in zip(grads_a, grads_c):
        assert torch.allclose(a, c, atol=1e-12, rtol=1e-10)


def _closed_form_run(closed, act, depth, norm, bias, n_probes, logdet, x_grad, train, device="cpu", neumann=True):
    """(y, log-det, gradients of a loss on both, state after) by the closed form (the block's eager path) or by
    differentiating the surrogate (neumann) or the series (not neumann) through torch's graph (chain_series_logdet,
    the compiled path)."""
    from kexue_fast.flows.chain import chain_series_logdet

    torch.manual_seed(11)
    dims = [4] + [7] * (depth - 1) + [4]
    layers = []
    for i in range(depth):
        layer = nn.Linear(dims[i], dims[i + 1], bias=bias)
        if norm == "spectral":
            layer = spectral_norm(layer, coeff=0.9, n_power_iterations=1)
        elif norm == "weight_norm":  # another parametrization: read through .weight
            layer = nn.utils.parametrizations.weight_norm(layer)
        layers += [layer, act()] if i < depth - 1 else [layer]
    g = nn.Sequential(*layers).double().train(train).to(device)
    block = InvertibleResBlock(g, logdet=logdet, n_terms=4, n_probes=n_probes, neumann_grad=neumann)
    x = torch.randn(6, 4, dtype=D64).to(device).requires_grad_(x_grad)
    wy = torch.randn(6, 4, dtype=D64, device=device)
    wl = torch.tensor([1.0, 2.0, 3.0, 0.0, -1.0, 5.0], dtype=D64, device=device)
    torch.manual_seed(5)  # the same probes, then the same roulette lengths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # roulette variance notice
        if closed:
            y, value = block(x)
        else:
            probes = [L.draw_probe(x, block.probe) for _ in range(n_probes)]
            gx, value = chain_series_logdet(block._chain, x, block._plans(x), probes, neumann_grad=neumann)
            y = x + gx
    ((y * wy).sum() + (value * wl).sum()).backward()
    grads = [p.grad for p in g.parameters()] + ([x.grad] if x_grad else [])
    return y.detach(), value.detach(), grads, g.state_dict()


@pytest.mark.parametrize("act", [LipSwish, nn.ELU, nn.Tanh, lambda: nn.LeakyReLU(0.3)])
@pytest.mark.parametrize(
    "depth, norm, bias, n_probes, logdet, x_grad, train",
    [(2, "spectral", True, 1, "series", True, True), (2, "plain", True, 2, "series", False, False),
     (3, "spectral", True, 2, "roulette", True, True), (3, "weight_norm", False, 1, "series", True, True),
     (2, "spectral", False, 3, "roulette", False, False)],
)  # fmt: skip
@pytest.mark.parametrize(
    "backend, host_scalars, neumann",
    [
        ("torch", True, True),
        ("torch", False, True),
        ("torch", True, False),
        ("torch", False, False),
        ("cpp", True, True),
        ("cpp", True, False),
    ],
)
def test_closed_form_neumann_gradient_equals_the_autograd_graph(act, depth, norm, bias, n_probes, logdet, x_grad,
                                                                train, backend, host_scalars, neumann,
                                                                monkeypatch):  # fmt: skip
    """kexue_fast.flows.chain_neumann (one autograd node, spectral norms folded in) and the C++ block
    (kexue_fast.flows.chain_cpp) against torch's graph of the surrogate (neumann) or of the series itself
    (neumann_grad=False): same y and log-det, same gradients of a loss on both (1e-12, float64), same power-iteration
    state. host_scalars=False runs the torch closed form's spectral-norm fold in tensors, as off the CPU."""
    from kexue_fast.flows import chain_neumann

    monkeypatch.setenv("KEXUE_FAST_BACKEND", backend)
    monkeypatch.setattr(chain_neumann, "_host_scalars", lambda x: host_scalars)
    monkeypatch.setattr(chain_neumann, "_series_closed_form", lambda x: True)  # on CPU too
    args = (act, depth, norm, bias, n_probes, logdet, x_grad, train)
    y_c, v_c, g_c, s_c = _closed_form_run(True, *args, neumann=neumann)
    y_a, v_a, g_a, s_a = _closed_form_run(False, *args, neumann=neumann)
    assert torch.allclose(y_c, y_a, atol=1e-14, rtol=0) and torch.allclose(v_c, v_a, atol=1e-13, rtol=0)
    assert len(g_c) == len(g_a) and all(t is not None and bool(t.abs().sum() > 0) for t in g_a + g_c)
    for c, a in zip(g_c, g_a):
        assert torch.allclose(c, a, atol=1e-12, rtol=1e-10), (c - a).abs().max()
    assert s_c.keys() == s_a.keys() and all(torch.equal(s_c[k], s_a[k]) for k in s_a)


@pytest.mark.parametrize("conv", [False, True])
def test_closed_form_keeps_each_forwards_spectral_state_until_backward(conv, dense_backend):
    """Two training forwards (each advancing the power iteration in place) and one backward give the gradients of
    two forward-backward pairs: each forward snapshots its u, v (dense and conv closed forms)."""
    if conv and dense_backend == "torch":
        pytest.skip("conv chains have no C++ path: the auto run covers them")
    torch.manual_seed(0)
    if conv:
        g, shape = _conv_g(LipSwish, "2d", "spectral", True, True)
    else:
        g = nn.Sequential(spectral_norm(nn.Linear(4, 16), coeff=0.9), LipSwish(),
                          spectral_norm(nn.Linear(16, 4), coeff=0.9)).double()  # fmt: skip
        shape = (4,)
    blocks = [InvertibleResBlock(g), InvertibleResBlock(copy.deepcopy(g))]
    assert blocks[0].series_path == ("conv-chain" if conv else "dense-chain")
    x1, x2 = torch.randn(5, *shape, dtype=D64), torch.randn(5, *shape, dtype=D64)
    torch.manual_seed(1)
    (y1, v1), (y2, v2) = blocks[0](x1), blocks[0](x2)
    (y1.sum() + v1.sum() + y2.pow(2).sum() + v2.sum()).backward()
    torch.manual_seed(1)
    y1, v1 = blocks[1](x1)
    (y1.sum() + v1.sum()).backward()
    y2, v2 = blocks[1](x2)
    (y2.pow(2).sum() + v2.sum()).backward()
    for a, b in zip(blocks[0].g.parameters(), blocks[1].g.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-13, rtol=0)


def _conv_g(act, kind, norm, bias, train):
    """A conv chain g: '2d' 3×3 · act · 1×1 · act · 3×3 (the ResidualFlow.conv recipe, operator-norm spectral norms
    with one layer's kernel scaled down so that its δ = max(1, σ̂/c) is 1 and the others' above 1), '1d' with
    dilation 2 and groups 2, or '3d'."""
    torch.manual_seed(21)
    if kind == "2d":
        shape, convs = (3, 5, 4), [nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.Conv2d(6, 6, 1, bias=bias),
                                   nn.Conv2d(6, 3, 3, padding=1, bias=bias)]  # fmt: skip
    elif kind == "1d":
        shape, convs = (4, 7), [nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2, bias=bias),
                                nn.Conv1d(6, 4, 3, padding=1, bias=bias)]  # fmt: skip
    else:
        shape, convs = (2, 3, 3, 2), [nn.Conv3d(2, 4, 3, padding=1, bias=bias), nn.Conv3d(4, 2, 1, bias=bias)]
    with torch.no_grad():
        convs[-1].weight.mul_(0.05)  # well under the cap
    layers, inner = [], shape
    for i, conv in enumerate(convs):
        if norm == "spectral":
            conv = spectral_norm(conv.double(), coeff=0.5, input_shape=inner, n_power_iterations=1)
        elif norm == "weight_norm":
            conv = nn.utils.parametrizations.weight_norm(conv)
        layers += [conv, act()] if i < len(convs) - 1 else [conv]
        inner = (convs[i].out_channels, *shape[1:])
    return nn.Sequential(*layers).double().train(train), shape


def _conv_closed_form_run(closed, act, kind, norm, bias, n_probes, logdet, x_grad, train, device="cpu", neumann=True):
    """(y, log-det, gradients of a loss on both, state after) of a conv-chain block by its closed form or by the
    autograd path (the memory-efficient Neumann gradient, or the series, through torch's graph of g)."""
    g, shape = _conv_g(act, kind, norm, bias, train)
    g = g.to(device)
    block = InvertibleResBlock(g, logdet=logdet, n_terms=4, n_probes=n_probes, roulette_p=0.6, neumann_grad=neumann)
    assert block.series_path == "conv-chain"
    if not closed:
        block._conv_chain = None
    x = torch.randn(5, *shape, dtype=D64).to(device).requires_grad_(x_grad)
    wy = torch.randn(5, *shape, dtype=D64, device=device)
    wl = torch.tensor([1.0, 2.0, 0.0, -1.0, 5.0], dtype=D64, device=device)
    torch.manual_seed(5)  # the same probes, then the same roulette lengths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # roulette variance notice
        y, value = block(x)
    ((y * wy).sum() + (value * wl).sum()).backward()
    grads = [p.grad for p in g.parameters()] + ([x.grad] if x_grad else [])
    return y.detach(), value.detach(), grads, g.state_dict()


@pytest.mark.parametrize("act", [LipSwish, nn.ELU, nn.Tanh, lambda: nn.LeakyReLU(0.3)])
@pytest.mark.parametrize(
    "kind, norm, bias, n_probes, logdet, x_grad, train",
    [("2d", "spectral", True, 1, "series", True, True), ("2d", "spectral", False, 2, "roulette", False, False),
     ("1d", "plain", True, 2, "series", True, False), ("1d", "spectral", True, 3, "roulette", True, True),
     ("3d", "weight_norm", True, 1, "roulette", True, True)],
)  # fmt: skip
@pytest.mark.parametrize("host_scalars, neumann", [(True, True), (False, True), (True, False), (False, False)])
def test_conv_closed_form_equals_the_autograd_path(act, kind, norm, bias, n_probes, logdet, x_grad, train,
                                                   host_scalars, neumann, monkeypatch):  # fmt: skip
    """kexue_fast.flows.conv_neumann (one autograd node, operator-norm spectral norms folded in) against the
    autograd path's memory-efficient Neumann gradient (neumann) or its graph of the series itself: same y and
    log-det, same gradients of a loss weighting each sample's log-det differently (1e-12, float64), same
    power-iteration state. host_scalars=False: the fold in tensors, as off the CPU. (Through the series, probes
    with different roulette lengths take the autograd path.)"""
    from kexue_fast.flows import conv_neumann

    monkeypatch.setattr(conv_neumann, "_host_scalars", lambda x: host_scalars)
    args = (act, kind, norm, bias, n_probes, logdet, x_grad, train)
    y_c, v_c, g_c, s_c = _conv_closed_form_run(True, *args, neumann=neumann)
    y_a, v_a, g_a, s_a = _conv_closed_form_run(False, *args, neumann=neumann)
    assert torch.allclose(y_c, y_a, atol=1e-14, rtol=0) and torch.allclose(v_c, v_a, atol=1e-13, rtol=0)
    assert len(g_c) == len(g_a) and all(t is not None and bool(t.abs().sum() > 0) for t in g_a + g_c)
    for c, a in zip(g_c, g_a):
        assert torch.allclose(c, a, atol=1e-12, rtol=1e-10), (c - a).abs().max()
    assert s_c.keys() == s_a.keys() and all(torch.equal(s_c[k], s_a[k]) for k in s_a)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kind, norm, n_probes, logdet", [("2d", "spectral", 1, "series"), ("1d", "spectral", 2, "roulette")]
)
@pytest.mark.parametrize("neumann", [True, False])
def test_conv_closed_form_on_cuda(kind, norm, n_probes, logdet, neumann):
    """The closed form on CUDA (the spectral-norm fold in tensors, no host sync) against the autograd path there."""
    args = (LipSwish, kind, norm, True, n_probes, logdet, True, True)
    y_c, v_c, g_c, s_c = _conv_closed_form_run(True, *args, device="cuda", neumann=neumann)
    y_a, v_a, g_a, s_a = _conv_closed_form_run(False, *args, device="cuda", neumann=neumann)
    assert torch.allclose(y_c, y_a, atol=1e-13, rtol=0) and torch.allclose(v_c, v_a, atol=1e-12, rtol=0)
    for c, a in zip(g_c, g_a):
        assert torch.allclose(c, a, atol=1e-11, rtol=1e-9), (c - a).abs().max()
    assert all(torch.allclose(s_c[k], s_a[k], atol=1e-14, rtol=0) for k in s_a)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_conv_closed_form_takes_any_input_layout(layout):
    """channels_last and non-contiguous inputs (a FactorOut slice) give the autograd path's values and gradients."""
    g, shape = _conv_g(nn.ELU, "2d", "spectral", True, False)
    x = torch.randn(4, *shape, dtype=D64)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.repeat(1, 2, 1, 1)[:, ::2]
    runs = []
    for closed in (True, False):
        block = InvertibleResBlock(g, logdet="series", n_terms=3, n_probes=2)
        if not closed:
            block._conv_chain = None
        g.zero_grad()
        xg = x.detach().requires_grad_()
        torch.manual_seed(2)
        y, value = block(xg)
        (y.pow(2).sum() + (value * torch.arange(4.0, dtype=D64)).sum()).backward()
        runs.append([y.detach(), value.detach(), xg.grad] + [p.grad.clone() for p in g.parameters()])
    for c, a in zip(*runs):
        assert torch.allclose(c, a, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_probes_do_not_depend_on_the_input_layout(probe):
    """Hutchinson probes are drawn in the input's logical order: for one seed, a channels_last or transposed input gives
    the contiguous input's log-det estimate (the *_like draws filled memory order), and the probe keeps x's layout."""
    from kexue_fast.flows.logdet import draw_probe

    x = torch.randn(3, 2, 4, 5, dtype=D64)
    for view in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        torch.manual_seed(5)
        want = draw_probe(x, probe)
        torch.manual_seed(5)
        got = draw_probe(view, probe)
        assert torch.equal(got, want) and got.stride() == view.stride()
    g, shape = _conv_g(LipSwish, "2d", "spectral", True, False)
    block = InvertibleResBlock(g, logdet="series", n_terms=3, n_probes=2, probe=probe)
    xs = torch.randn(3, *shape, dtype=D64)
    values = []
    for inp in (xs, xs.contiguous(memory_format=torch.channels_last)):
        torch.manual_seed(7)
        values.append(block(inp)[1])
    assert torch.allclose(values[0], values[1], atol=1e-13, rtol=0), values


def test_conv_closed_form_covers_both_sides_of_the_spectral_cap():
    """The case above folds a norm with δ = σ̂/c > 1 and one with δ = 1 (κ = 0): both branches of ∂V are tested."""
    g, _ = _conv_g(LipSwish, "2d", "spectral", True, False)
    ratios = [float(m.parametrizations.weight[0].sigma(m.parametrizations.weight.original.detach())) / 0.5
              for m in g if isinstance(m, nn.Conv2d)]  # fmt: skip
    assert max(ratios) > 1 > min(ratios), ratios


@pytest.mark.parametrize("neumann", [True, False])
@pytest.mark.parametrize("act, kind, norm", [(LipSwish, "2d", "spectral"), (nn.ELU, "1d", "weight_norm")])
def test_conv_closed_form_supports_double_backward(act, kind, norm, neumann):
    """A gradient penalty ‖∂L/∂x‖² through the closed form (its backward under create_graph=True rebuilds torch's
    graph) equals the same through the autograd path with memory_efficient=False."""
    runs = []
    for closed in (True, False):
        g, shape = _conv_g(act, kind, norm, True, False)
        block = InvertibleResBlock(g, n_terms=3, n_probes=2, neumann_grad=neumann, memory_efficient=False)
        assert block.series_path == "conv-chain"
        if not closed:
            block._conv_chain = None
        x = torch.randn(4, *shape, dtype=D64, generator=torch.Generator().manual_seed(6)).requires_grad_()
        torch.manual_seed(3)
        y, value = block(x)
        loss = y.pow(2).sum() + (value * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=D64)).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        gx.pow(2).sum().backward()
        runs.append([gx.detach()] + [p.grad for p in g.parameters()])
    assert all(t is not None and bool(t.abs().sum() > 0) for t in runs[0] + runs[1])
    for c, a in zip(*runs):
        assert torch.allclose(c, a, atol=1e-11, rtol=1e-9), (c - a).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("act", [LipSwish, nn.ELU])
@pytest.mark.parametrize("depth, norm, n_probes, logdet, train",
                         [(2, "spectral", 1, "series", True), (3, "spectral", 2, "roulette", True),
                          (2, "plain", 2, "series", False)])  # fmt: skip
@pytest.mark.parametrize("neumann", [True, False])
def test_closed_form_neumann_gradient_on_cuda(act, depth, norm, n_probes, logdet, train, neumann):
    """On CUDA (float64: the torch backend, σ̂ kept on the device) the closed form (of the Neumann gradient, or of
    the series' own) equals torch's graph of the surrogate or the series there (1e-12), and the CPU run of the same
    block up to the probes' generator."""
    args = (act, depth, norm, True, n_probes, logdet, True, train)
    y_c, v_c, g_c, s_c = _closed_form_run(True, *args, device="cuda", neumann=neumann)
    y_a, v_a, g_a, s_a = _closed_form_run(False, *args, device="cuda", neumann=neumann)
    assert y_c.is_cuda and all(t.is_cuda for t in g_c)
    assert torch.allclose(y_c, y_a, atol=1e-14, rtol=0) and torch.allclose(v_c, v_a, atol=1e-13, rtol=0)
    for c, a in zip(g_c, g_a):
        assert torch.allclose(c, a, atol=1e-12, rtol=1e-10), (c - a).abs().max()
    assert all(torch.allclose(s_c[k], s_a[k], atol=1e-14, rtol=0) for k in s_a)
    y_cpu = _closed_form_run(True, *args, neumann=neumann)[0]
    assert torch.allclose(y_c.cpu(), y_cpu, atol=1e-14, rtol=0)  # y does not depend on the probes


@pytest.mark.parametrize("neumann", [True, False])
@pytest.mark.parametrize("act, depth", [(LipSwish, 2), (nn.ELU, 3), (nn.Tanh, 2)])
def test_closed_form_block_supports_double_backward(act, depth, neumann, dense_backend, monkeypatch):
    """backward(create_graph=True) through the eager Neumann path gives the graph path's first-order gradients with
    a graph, so a gradient penalty ‖∂L/∂x‖² differentiates to the graph path's parameter gradients (1e-12)."""
    from kexue_fast.flows import chain_neumann
    from kexue_fast.flows.chain import chain_series_logdet

    monkeypatch.setattr(chain_neumann, "_series_closed_form", lambda x: True)  # on CPU too

    results = []
    for closed in (True, False):
        torch.manual_seed(11)
        dims = [4] + [7] * (depth - 1) + [4]
        layers = []
        for i in range(depth):
            layers.append(spectral_norm(nn.Linear(dims[i], dims[i + 1]), coeff=0.9, n_power_iterations=0))
            if i < depth - 1:
                layers.append(act())
        g = nn.Sequential(*layers).double()
        block = InvertibleResBlock(g, n_terms=4, n_probes=2, neumann_grad=neumann)
        x = torch.randn(6, 4, dtype=D64, requires_grad=True)
        torch.manual_seed(5)
        if closed:
            y, value = block(x)
        else:
            probes = [L.draw_probe(x, block.probe) for _ in range(2)]
            gx, value = chain_series_logdet(block._chain, x, block._plans(x), probes, neumann_grad=neumann)
            y = x + gx
        first = torch.autograd.grad((y * y).sum() + (value * torch.arange(6.0, dtype=D64)).sum(), [x, *g.parameters()],
                                    create_graph=True)  # fmt: skip
        penalty = first[0].pow(2).sum() + sum(t.pow(2).sum() for t in first[1:])
        second = torch.autograd.grad(penalty, list(g.parameters()))
        results.append([t.detach() for t in first] + list(second))
    assert all(bool(t.abs().sum() > 0) for t in results[1][-2:])
    for c, a in zip(*results):
        assert torch.allclose(c, a, atol=1e-12, rtol=1e-10), (c - a).abs().max()


def test_dense_chain_detection():
    assert InvertibleResBlock(mlp(3)).series_path == "dense-chain"
    deep = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 3))
    assert InvertibleResBlock(deep).series_path == "dense-chain"
    assert InvertibleResBlock(nn.Sequential(nn.Linear(3, 3), nn.Softplus(), nn.Linear(3, 3))).series_path == "autograd"
    assert InvertibleResBlock(nn.Conv2d(2, 2, 3, padding=1)).series_path == "autograd"
    convs = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ELU(), nn.Conv2d(4, 2, 1))
    assert InvertibleResBlock(convs).series_path == "conv-chain"
    same = nn.Sequential(nn.Conv2d(2, 4, 3, padding="same"), nn.ELU(), nn.Conv2d(4, 2, 1))
    assert InvertibleResBlock(same).series_path == "autograd"
    circular = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), nn.ELU(), nn.Conv2d(4, 2, 1))
    assert InvertibleResBlock(circular).series_path == "autograd"


def test_neumann_value_is_the_estimate_not_a_surrogate():
    value_neumann, _ = _weighted_grads(memory_efficient=False, neumann_grad=True)
    value_graph, _ = _weighted_grads(memory_efficient=False, neumann_grad=False)
    assert torch.allclose(value_neumann, value_graph, atol=1e-14, rtol=0)


def _saved_bytes(n_terms, conv=False, **kwargs):
    torch.manual_seed(0)
    g, shape = _conv_g(LipSwish, "2d", "spectral", True, True) if conv else (mlp(8, hidden=32), (8,))
    block = InvertibleResBlock(g, logdet="series", n_terms=n_terms, **kwargs)
    assert block.series_path == ("conv-chain" if conv else "dense-chain")
    x = torch.randn(64, *shape, dtype=D64, requires_grad=True)
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _y, _logdet = block(x)
    return total[0]


@pytest.mark.parametrize("conv", [False, True])
def test_memory_efficient_saved_bytes_do_not_grow_with_n_terms(conv, dense_backend):
    if conv and dense_backend == "torch":
        pytest.skip("conv chains have no C++ path: the auto run covers them")
    assert _saved_bytes(2, conv) == _saved_bytes(12, conv)
    assert _saved_bytes(12, conv, neumann_grad=False) > 2 * _saved_bytes(2, conv, neumann_grad=False)


@pytest.mark.parametrize("method", ["series", "roulette", "exact", "none"])
@pytest.mark.parametrize("path", ["dense-chain", "autograd"])
def test_every_method_runs_under_no_grad_and_agrees_with_grad_mode(method, path):
    block = InvertibleResBlock(mlp(3, coeff=0.5), logdet=method)
    if path == "autograd":
        block._chain = None
    x = torch.randn(4, 3, dtype=D64)
    torch.manual_seed(0)
    y, logdet = block(x)
    torch.manual_seed(0)
    with torch.no_grad():
        y0, logdet0 = block(x)
    assert not logdet0.requires_grad and not y0.requires_grad
    assert torch.allclose(y0, y) and torch.allclose(logdet0, logdet.detach(), atol=1e-14)


def test_logdet_has_parameter_gradients_in_every_mode():
    for method in ("series", "roulette", "exact"):
        g = mlp(2, coeff=0.5)
        block = InvertibleResBlock(g, logdet=method)
        block(torch.randn(4, 2, dtype=D64))[1].sum().backward()
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in g.parameters() if p.ndim == 2)


def _trained_block(method):
    torch.manual_seed(7)
    g = nn.Sequential(
        spectral_norm(nn.Linear(4, 32), coeff=0.975, n_power_iterations=0), LipSwish(),
        spectral_norm(nn.Linear(32, 4), coeff=0.975, n_power_iterations=0),
    ).double()  # fmt: skip
    block = InvertibleResBlock(g, inverse_method=method)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    for _ in range(30):  # push Lip(g) up: maximize the log-det, the spectral norm caps it at ~0.95
        _y, logdet = block(torch.randn(32, 4, dtype=D64))
        (-logdet.mean()).backward()
        opt.step()
        opt.zero_grad()
        update_spectral_norms(block, n_iters=5)
    update_spectral_norms(block, n_iters=500, tol=1e-12)
    return block.eval()


def test_inverse_reaches_1e6_and_anderson_needs_fewer_evaluations():
    counts = {}
    for method in ("fixed_point", "anderson"):
        block = _trained_block(method)
        x = torch.randn(16, 4, dtype=D64) * 2
        with torch.no_grad():
            y, _ = block(x)
            x_hat = block.inverse(y)
            assert float((block(x_hat)[0] - y).abs().max()) <= 1e-6
        counts[method] = block.last_inverse.g_evals
    print("g evaluations to 1e-6:", counts)
    assert counts["anderson"] < counts["fixed_point"]


def test_inverse_warns_when_not_converged():
    block = InvertibleResBlock(mlp(3), inverse_max_iter=2, inverse_atol=1e-14)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        block.inverse(torch.randn(2, 3, dtype=D64))
    assert block.last_inverse is not None and not block.last_inverse.converged


def _hash(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_eval_mode_changes_no_buffer():
    torch.manual_seed(8)
    g = nn.Sequential(spectral_norm(nn.Linear(3, 8), coeff=0.9), LipSwish(), spectral_norm(nn.Linear(8, 3), coeff=0.9))
    with pytest.warns(RuntimeWarning, match="finite variance"):
        block = InvertibleResBlock(g.double(), logdet="roulette", roulette_p=0.7)
    model = nn.ModuleList([ActNorm(3), block]).double()
    model.eval()
    before = _hash(model)
    x = torch.randn(5, 3, dtype=D64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, _ = model[0](x)
        z, _ = model[1](y)
        model[0].inverse(model[1].inverse(z))
    assert _hash(model) == before


def test_actnorm_and_squeeze():
    torch.manual_seed(9)
    x = torch.randn(64, 3, 4, 4, dtype=D64) * 3 + 1
    act = ActNorm(3).double()
    y, logdet = act(x)
    assert bool(act.initialized)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3, dtype=D64), atol=1e-10)
    # unit (population) std per channel after the init, s = −log(std + eps): a scale by std instead of 1/std, or
    # the sample std, kept every other check here
    assert torch.allclose(y.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=D64), rtol=1e-6)  # eps = 1e-6
    expected = -torch.log(x.std((0, 2, 3), unbiased=False) + act.eps)
    assert torch.allclose(act.log_scale.reshape(-1), expected, rtol=1e-12, atol=0)
    assert torch.allclose(act.inverse(y), x, atol=1e-12)
    single = x[:1]
    jac = torch.autograd.functional.jacobian(lambda z: act(z)[0], single).reshape(48, 48)
    assert abs(float(logdet[0].detach()) - float(torch.linalg.slogdet(jac).logabsdet)) < 1e-10
    sq = Squeeze()
    z, zero = sq(x)
    assert z.shape == (64, 12, 2, 2) and float(zero.abs().sum()) == 0
    assert torch.equal(sq.inverse(z), x)
    with pytest.raises(ValueError, match="even"):
        sq(torch.randn(1, 1, 3, 4))


def test_lipswish_is_1_lipschitz():
    for beta in (0.1, 1.0, 10.0):
        f = LipSwish(beta).double()
        x = torch.linspace(-20, 20, 20001, dtype=D64, requires_grad=True)
        (d,) = torch.autograd.grad(f(x).sum(), x)
        assert 0.99 < float(d.abs().max()) <= 1.0


def test_lipschitz_report_bounds_are_certified():
    torch.manual_seed(10)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, groups=1).double()
    g = nn.Sequential(conv, nn.ELU(), nn.Conv2d(4, 3, 3, padding=1).double())
    block = InvertibleResBlock(g)
    report = lipschitz_report(nn.Sequential(block))
    layer_bound = report.blocks[0].layer_bounds[0]
    from kexue_fast.spectral.conv import ConvOperator
    from kexue_fast.spectral.reference import conv_operator_matrix

    op = ConvOperator.build(conv.weight.shape, (3, 6, 6), 2, 1, 1, 1)
    exact = torch.linalg.matrix_norm(conv_operator_matrix(lambda x, w: op.apply(w, x), conv.weight.detach(),
                                                          (3, 6, 6)), ord=2)  # fmt: skip
    assert layer_bound >= float(exact)
    assert "invertible" in str(report)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: InvertibleResBlock(nn.Sequential(spectral_norm(nn.Linear(2, 2), coeff=1.0))), "coeff"),
        (lambda: InvertibleResBlock(nn.Sequential(spectral_norm(nn.Linear(2, 2)))), "coeff"),
        (lambda: InvertibleResBlock(nn.Linear(2, 2), n_terms=0), "n_terms"),
        (lambda: InvertibleResBlock(nn.Linear(2, 2), n_probes=0), "n_probes"),
        (lambda: InvertibleResBlock(nn.Linear(2, 2), logdet="magic"), "logdet"),
        (lambda: InvertibleResBlock(nn.Linear(2, 2), roulette_p=1.0), "roulette_p"),
        (lambda: InvertibleResBlock(nn.Linear(2, 2), inverse_method="newton"), "inverse_method"),
        (lambda: InvertibleResBlock(nn.Linear(2, 2), inverse_atol=0.0), "inverse_atol"),
    ],
)
def test_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs():
    block = InvertibleResBlock(mlp(2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        block(torch.tensor([[0.0, float("nan")]], dtype=D64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        block.inverse(torch.tensor([[float("inf"), 0.0]], dtype=D64))
    with pytest.raises(TypeError, match="floating"):
        block(torch.ones(2, 2, dtype=torch.int64))
    big = InvertibleResBlock(nn.Linear(300, 300, bias=False), logdet="exact")
    with pytest.raises(ValueError, match="exact"):
        big(torch.randn(1, 300))


def test_reference_inverse_matches_block_inverse():
    block = InvertibleResBlock(mlp(3), inverse_atol=1e-12)
    y = torch.randn(4, 3, dtype=D64)
    with torch.no_grad():
        assert torch.allclose(block.inverse(y), reference.fixed_point_inverse(block.g, y, 200), atol=1e-11)


def _two_gaussians():
    """(sample(n), log p(x)) of the mixture ½N((±1.5, 0), 0.6² I)."""
    means, std = torch.tensor([[1.5, 0.0], [-1.5, 0.0]]), 0.6

    def sample(n):
        return means[torch.randint(0, 2, (n,))] + std * torch.randn(n, 2)

    def true_log_prob(x):
        comp = -((x[:, None, :] - means) ** 2).sum(-1) / (2 * std**2) - math.log(2 * math.pi * std**2)
        return torch.logsumexp(comp, 1) - math.log(2)

    return sample, true_log_prob


def _fit(flow, sample, steps):
    """Maximum likelihood with Adam (lr 3e-3, batch 256), the spectral norms updated after each step; ends in eval."""
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = -flow.log_prob(sample(256)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_spectral_norms(flow)
    flow.eval()


def test_residual_flow_learns_a_2d_density_to_within_0_1_nats():
    """Two-component Gaussian mixture in 2-D, trained by maximum likelihood with exact log-determinants (d = 2) and
    evaluated against the true density's entropy (Monte Carlo, s.e. ≈ 0.003 nats)."""
    from kexue_fast.nn import ResidualFlow

    torch.manual_seed(0)
    sample, true_log_prob = _two_gaussians()
    test = sample(50000)
    entropy = float(-true_log_prob(test).mean())
    flow = ResidualFlow.dense(2, n_blocks=4, hidden=64, coeff=0.97, preset="iresnet", logdet="exact")
    _fit(flow, sample, 1000)
    with torch.no_grad():
        nll = float(-flow.log_prob(test[:20000]).mean())
        assert nll - entropy < 0.1, (nll, entropy)
        x = flow.sample(64)
        z, _ = flow(x)
        assert torch.allclose(flow.inverse(z), x, atol=1e-4)
    assert lipschitz_report(flow).all_certified


def test_residual_flow_trained_by_the_roulette_estimator_learns_the_density():
    """The Residual Flows recipe end to end: training sees only the unbiased roulette log-det with the closed-form
    Neumann gradient (LipSwish, two hidden layers per block); the NLL, with exact log-dets, comes within 0.1 nats of
    the true entropy of a two-component mixture."""
    from kexue_fast.nn import ResidualFlow

    torch.manual_seed(1)
    sample, true_log_prob = _two_gaussians()
    test = sample(20000)
    entropy = float(-true_log_prob(test).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the roulette's variance notice at coefficient 0.97
        flow = ResidualFlow.dense(2, n_blocks=4, hidden=64, n_hidden_layers=2, coeff=0.97, preset="residual_flow",
                                  logdet="roulette", roulette_p=0.5, n_exact_terms=2)  # fmt: skip
    blocks = [m for m in flow.modules() if isinstance(m, InvertibleResBlock)]
    assert all(b.series_path == "dense-chain" and b.neumann_grad for b in blocks)
    _fit(flow, sample, 800)
    for b in blocks:
        b.logdet_method = "exact"
    with torch.no_grad():
        nll = float(-flow.log_prob(test).mean())
    assert nll - entropy < 0.1, (nll, entropy)


# The Triton block runs on CUDA, or on CPU under TRITON_INTERPRET=1 (set by conftest when there is no GPU).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_explicit_triton_backend_raises_where_the_fused_block_cannot_run(monkeypatch):
    dev = TRITON_DEVICE
    # built before the backend is forced: mlp() initializes its spectral norms on the CPU, which an explicit triton
    # backend refuses on a CUDA machine (no interpreter there)
    compiled = InvertibleResBlock(mlp(2).float().to(dev))
    double = InvertibleResBlock(mlp(2).to(dev))
    deep = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(dev)
    exact = InvertibleResBlock(mlp(2).float().to(dev), logdet="exact")
    monkeypatch.setenv("KEXUE_FAST_BACKEND", "triton")
    with pytest.raises(Exception, match=r"cannot run InvertibleResBlock under torch\.compile"):  # (dynamo wraps it)
        torch.compile(compiled, fullgraph=True, backend="aot_eager")(torch.randn(3, 2, device=dev))
    with pytest.raises(NotImplementedError, match="supports float32"):
        double(torch.randn(3, 2, dtype=D64, device=dev))
    with pytest.raises(NotImplementedError, match="Linear·act·Linear"):
        InvertibleResBlock(deep)(torch.randn(3, 3, device=dev))
    with pytest.raises(NotImplementedError, match="exact"):
        exact(torch.randn(3, 2, device=dev))


@pytest.mark.parametrize("act", [LipSwish, nn.ELU, nn.Tanh])
@pytest.mark.parametrize("logdet", ["series", "roulette"])
def test_fused_triton_block_equals_torch_path(monkeypatch, act, logdet):
    """The fused forward (Triton on CUDA, interpreted on CPU) against the analytic torch path: same probes,
    float32."""
    torch.manual_seed(15)
    g = mlp(5, hidden=40, coeff=0.8, act=act).float().to(TRITON_DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        block = InvertibleResBlock(g, logdet=logdet, n_terms=4, n_probes=2)
    x = torch.randn(37, 5).to(TRITON_DEVICE).requires_grad_()
    weights = torch.linspace(-1, 2, 37, device=TRITON_DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("KEXUE_FAST_BACKEND", backend)
        for p in [*g.parameters(), x]:
            p.grad = None
        torch.manual_seed(16)
        y, value = block(x)
        ((y**2).sum(1) + value * weights).sum().backward()
        results[backend] = (y.detach(), value.detach(), [p.grad.clone() for p in g.parameters()], x.grad.clone())
    (y_t, v_t, g_t, x_t), (y_f, v_f, g_f, x_f) = results["torch"], results["triton"]
    assert torch.allclose(y_f, y_t, atol=1e-5) and torch.allclose(v_f, v_t, atol=1e-5)
    for a, b in zip([*g_f, x_f], [*g_t, x_t]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["series", "roulette"])
@pytest.mark.parametrize("neumann_grad", [True, False])
def test_block_compiles_fullgraph_forward_logdet_backward(method, neumann_grad):
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        block = InvertibleResBlock(mlp(4, coeff=0.7), logdet=method, n_terms=4, neumann_grad=neumann_grad)

    def step(x):
        y, logdet = block(x)
        return (0.5 * y.pow(2).sum(1) - logdet).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 4, dtype=D64)
    loss = compiled(x)
    loss.backward()
    grads = [p.grad for p in block.parameters() if p.ndim == 2]
    assert torch.isfinite(loss) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    if method == "series":  # same probes: the compiled step equals the eager one
        torch.manual_seed(11)
        eager = step(x)
        torch.manual_seed(11)
        assert torch.allclose(compiled(x), eager, atol=1e-12)


@pytest.mark.parametrize("method", ["series", "roulette"])
@pytest.mark.parametrize("neumann_grad", [True, False])
def test_conv_block_compiles_fullgraph_and_matches_eager(method, neumann_grad):
    """Conv-chain blocks trace (kexue_fast.flows.conv_neumann.conv_series_logdet: no autograd.grad, roulette masks
    on the device): forward, log-det and backward in one graph, equal to the eager closed form with the same
    probes; the inverse compiles too."""
    torch._dynamo.reset()
    g, shape = _conv_g(LipSwish, "2d", "spectral", True, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        block = InvertibleResBlock(g, logdet=method, n_terms=3, neumann_grad=neumann_grad)
    x = torch.randn(3, *shape, dtype=D64, generator=torch.Generator().manual_seed(8))

    def step(x):
        y, logdet = block(x)
        return (0.5 * y.pow(2).flatten(1).sum(1) - logdet).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, step):
        g.zero_grad()
        torch.manual_seed(11)
        loss = fn(x)
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in g.parameters()])
    assert all(bool(torch.isfinite(t).all()) for t in grads[0])
    if method == "series":  # same probes: the compiled step equals the eager one
        for c, e in zip(*grads):
            assert torch.allclose(c, e, atol=1e-12, rtol=1e-10)
    block.eval()
    with torch.no_grad():
        y, _ = block(x)
        x_hat = torch.compile(block.inverse, fullgraph=True, backend="aot_eager")(y)
    assert torch.allclose(x_hat, x, atol=1e-5)


def test_block_compiles_with_dynamic_batch_sizes():
    torch._dynamo.reset()
    block = InvertibleResBlock(mlp(3, coeff=0.7), n_terms=3, probe="rademacher")
    compiled = torch.compile(lambda x: block(x)[1].sum(), fullgraph=True, backend="aot_eager")
    for batch in (4, 9, 17):  # the second size makes dynamo recompile with a symbolic batch dimension
        compiled(torch.randn(batch, 3, dtype=D64)).backward()


def test_inverse_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    block = InvertibleResBlock(mlp(4, coeff=0.95)).eval()
    x = torch.randn(8, 4, dtype=D64)
    with torch.no_grad():
        y, _ = block(x)
        x_hat = torch.compile(block.inverse, fullgraph=True, backend="aot_eager")(y)
        assert torch.equal(x_hat, block.inverse(y))
        assert float((block(x_hat)[0] - y).abs().max()) <= 1e-6


def test_anderson_inverse_compiles_fullgraph_and_converges():
    torch._dynamo.reset()
    torch.manual_seed(21)
    block = InvertibleResBlock(mlp(4, coeff=0.97), inverse_method="anderson", inverse_atol=1e-10).eval()
    x = torch.randn(8, 4, dtype=D64)
    with torch.no_grad():
        y, _ = block(x)
        x_hat = torch.compile(block.inverse, fullgraph=True, backend="aot_eager")(y)
        eager = block.inverse(y)
        assert block.last_inverse.converged
        # the same iteration on the device: it stops where the eager solver stops, on the same rule
        assert torch.allclose(x_hat, eager, atol=1e-9)
        assert float((block(x_hat)[0] - y).abs().max()) <= 1e-9
    # fewer g-evaluations than plain fixed point for the same tolerance (counted by the eager solvers)
    fixed = InvertibleResBlock(block.g, inverse_method="fixed_point", inverse_atol=1e-10).eval()
    with torch.no_grad():
        fixed.inverse(y)
    assert block.last_inverse.g_evals < fixed.last_inverse.g_evals


def test_device_side_roulette_is_unbiased():
    """Each call draws one length N for its batch: the mean over the batch's 8 probes is one draw of the estimator
    (unbiased jointly over N and the probes), i.i.d. across calls."""
    eig = [0.5, -0.4, 0.3]
    torch.manual_seed(12)
    g = linear_g(eig)
    x = torch.zeros(8, 3, dtype=D64)
    values = []
    with torch.no_grad():
        for _ in range(2500):
            plan = L.roulette_plan_on_device(1, "geometric", 0.5, 32, x)
            values.append(L.series_logdet(g, x, [plan], [torch.randn_like(x)], neumann_grad=True,
                                          memory_efficient=True)[1].mean().reshape(1))  # fmt: skip
    values = torch.cat(values)
    mean, se = float(values.mean()), float(values.std() / math.sqrt(values.numel()))
    assert abs(mean - true_logdet(eig)) <= 4 * se


def test_roulette_max_terms_validated():
    with pytest.raises(ValueError, match="roulette_max_terms"):
        InvertibleResBlock(nn.Linear(2, 2), roulette_max_terms=0)


def test_conv_residual_flow_trains_and_inverts():
    from kexue_fast.nn import ResidualFlow

    torch.manual_seed(13)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        flow = ResidualFlow.conv((1, 4, 4), n_scales=2, n_blocks=1, hidden_channels=8, coeff=0.9).double()
    blocks = [m for m in flow.layers if isinstance(m, InvertibleResBlock)]
    assert all(b.series_path == "conv-chain" for b in blocks)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    for _ in range(3):
        loss = -flow.log_prob(torch.randn(6, 1, 4, 4, dtype=D64)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_spectral_norms(flow)
    assert torch.isfinite(loss)
    flow.eval()
    x = torch.randn(3, 1, 4, 4, dtype=D64)
    with torch.no_grad():
        z, _ = flow(x)
        assert torch.allclose(flow.inverse(z), x, atol=1e-5)
    report = lipschitz_report(flow)
    assert len(report.blocks) == 2 and all(b.bound is not None for b in report.blocks)


def test_float32_inverse_stops_at_the_rounding_floor():
    torch.manual_seed(14)
    g = mlp(2, coeff=0.97).float()
    block = InvertibleResBlock(g, inverse_atol=1e-6).eval()
    x = torch.randn(512, 2) * 4
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "did not converge"
        y, _ = block(x)
        x_hat = block.inverse(y)
    assert block.last_inverse.converged and block.last_inverse.iterations < 200
    assert float((x_hat - x).abs().max()) < 1e-4


def test_neumann_gradient_is_unbiased_for_a_nonlinear_branch():
    """Roulette + Neumann gradient on a LipSwish MLP: the mean over 3,000 calls of every parameter gradient is within
    4 standard errors of the exact ∇ log det from slogdet (parameters with no exact gradient get none)."""
    torch.manual_seed(0)
    g = mlp(2, hidden=16, coeff=0.8)
    x = torch.randn(3, 2, dtype=D64)

    def flat():
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in g.parameters()])

    g.zero_grad(set_to_none=True)
    InvertibleResBlock(g, logdet="exact")(x)[1].sum().backward()
    exact = flat()
    block = InvertibleResBlock(g, logdet="roulette", n_exact_terms=1, roulette_p=0.5)
    samples = []
    for _ in range(3000):
        g.zero_grad(set_to_none=True)
        block(x)[1].sum().backward()
        samples.append(flat())
    samples = torch.stack(samples)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    varies = se > 0
    assert bool(((mean - exact)[varies].abs() <= 4 * se[varies]).all())
    assert bool(((mean - exact)[~varies].abs() < 1e-12).all())


def test_factor_out_flow_is_an_exact_change_of_variables():
    from kexue_fast.nn import FactorOut, ResidualFlow

    torch.manual_seed(15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        flow = ResidualFlow.conv((1, 4, 4), n_scales=3, n_blocks=1, hidden_channels=6, coeff=0.9, logdet="exact",
                                 factor_out=True, n_power_iterations=5).double()  # fmt: skip
    # scale 1 drops 2 of 4 squeezed channels, scale 2 drops 4 of 8: the latent is 8 + 4 + 4 = 16 values
    assert [m.keep for m in flow.layers if isinstance(m, FactorOut)] == [2, 4]
    flow.eval()
    x = torch.randn(3, 1, 4, 4, dtype=D64)
    with torch.no_grad():
        z, logdet = flow(x)
        assert z.shape == (3, 16)
        assert torch.allclose(flow.inverse(z), x, atol=1e-8)
        assert flow.sample(5).shape == (5, 1, 4, 4)
    for i in range(3):  # log|det ∂z/∂x| of the whole map x -> flat z, from the autograd Jacobian
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.reshape(1, 1, 4, 4))[0].reshape(-1), x[i].reshape(-1))
        assert abs(float(torch.linalg.slogdet(jac)[1] - logdet[i])) < 1e-8
    expected = -0.5 * (z**2).sum(1) - 8 * math.log(2 * math.pi) + logdet
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-12)
    empty = x[:0]  # a batch of 0: reshape(0, -1) could not infer the -1 (forward with FactorOut, log_prob)
    assert flow(empty)[0].shape == (0, 16) and flow.log_prob(empty).shape == (0,)
    with pytest.raises(ValueError, match="flat latent"):
        flow.inverse(z.reshape(3, 1, 4, 4))
    with pytest.raises(ValueError, match="keep must be < channels"):
        FactorOut(4, 4)
    with pytest.raises(ValueError, match="FactorOut for 3 channels"):
        ResidualFlow([FactorOut(3, 1)], (2, 4, 4))


@pytest.mark.parametrize("change", ["coeff", "alpha", "slope", "conv alpha"])
def test_block_follows_attributes_changed_in_place(change):
    """The closed forms copied a spectral norm's coeff and the activations' constants (ELU alpha, LeakyReLU slope)
    when they first read g: changed in place later, the block kept computing the old g (y ≠ x + g(x), a wrong
    log-det). The block now compares them on every forward and reads g again, as a fresh block would."""
    torch.manual_seed(3)
    act = nn.LeakyReLU(0.5) if change == "slope" else nn.ELU()
    if change == "conv alpha":
        g = nn.Sequential(
            spectral_norm(nn.Conv2d(2, 4, 3, padding=1), coeff=0.9, input_shape=(2, 4, 4)),
            act,
            spectral_norm(nn.Conv2d(4, 2, 3, padding=1), coeff=0.9, input_shape=(4, 4, 4)),
        ).double()
        x = torch.randn(3, 2, 4, 4, dtype=D64)
    else:
        g = nn.Sequential(spectral_norm(nn.Linear(4, 8), coeff=0.9), act, spectral_norm(nn.Linear(8, 4), coeff=0.9))
        g = g.double()
        x = torch.randn(3, 4, dtype=D64)
    blk = InvertibleResBlock(g).eval()
    blk(x)  # the descriptions are read here
    if change == "coeff":
        g[0].parametrizations.weight[0].coeff = 0.3
        g[2].parametrizations.weight[0].coeff = 0.3
    elif change == "slope":
        g[1].negative_slope = 0.1
    else:
        g[1].alpha = 0.5
    torch.manual_seed(4)
    y, logdet = blk(x)
    torch.manual_seed(4)
    logdet_fresh = InvertibleResBlock(g).eval()(x)[1]
    assert torch.allclose(y, x + g(x), atol=1e-12, rtol=0)
    assert torch.allclose(logdet, logdet_fresh, atol=1e-12, rtol=0)


def test_block_inside_parametrize_cached_runs_g_on_the_cached_weights():
    """Inside torch.nn.utils.parametrize.cached() a plain g computes its spectral norms once; the block's fast paths
    read the raw weights and advanced the power iteration on every call: two calls in training mode differed, and y
    was not x + g(x) on the cached weights. There the block now runs g itself."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    g = nn.Sequential(spectral_norm(nn.Linear(3, 5), coeff=0.7), LipSwish(), spectral_norm(nn.Linear(5, 3), coeff=0.7))
    g = g.double()
    with torch.no_grad():
        for i in (0, 2):
            g[i].parametrizations.weight.original.mul_(4)
            g[i].parametrizations.weight[0]._u.normal_()  # far from converged: each step moves σ̂
    blk = InvertibleResBlock(g).train()
    x = torch.randn(2, 3, dtype=D64)
    with parametrize.cached():
        y1 = blk(x)[0]
        y2 = blk(x)[0]
        assert torch.equal(y1, y2) and torch.equal(y2, x + g(x))
    with torch.inference_mode(), parametrize.cached():  # the series' autograd runs on a normal copy there
        assert blk(x)[1].shape == (2,)
