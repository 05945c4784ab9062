import copy

import pytest
import torch
from testing import backends, rel_err
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import kexue_fast
from kexue_fast.nn import spectral_norm, spectral_norm_layers, update_spectral_norms
from kexue_fast.spectral.conv import ConvOperator
from kexue_fast.spectral.reference import conv_operator_matrix

MAKERS = {
    "linear": (lambda: nn.Linear(7, 5), (3, 7)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2), (2, 3, 6, 6)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5)),
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_coeff_none_equals_torch(kind):
    make, x_shape = MAKERS[kind]
    torch.manual_seed(0)
    theirs = torch_spectral_norm(make())
    torch.manual_seed(0)
    ours = spectral_norm(make())
    assert list(theirs.state_dict()) == list(ours.state_dict())
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(x_shape)
        yt, yo = theirs(x), ours(x)
        assert torch.equal(yt, yo)
        yt.square().sum().backward()
        yo.square().sum().backward()
        gt, go = theirs.parametrizations.weight.original.grad, ours.parametrizations.weight.original.grad
        assert torch.equal(gt, go)
        opt_t.step()
        opt_o.step()
        opt_t.zero_grad()
        opt_o.zero_grad()
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
    theirs.eval()
    ours.eval()
    x = torch.randn(x_shape)
    assert torch.equal(theirs(x), ours(x))


def test_state_dict_loads_both_ways():
    torch.manual_seed(1)
    theirs = torch_spectral_norm(nn.Linear(6, 4))
    ours = spectral_norm(nn.Linear(6, 4))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 6)
    assert torch.equal(ours.eval()(x), theirs.eval()(x))
    with torch.no_grad():
        ours.parametrizations.weight.original.mul_(2)
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(ours(x), theirs(x))


def _converge(module, n=300):
    update_spectral_norms(module, n_iters=n, tol=1e-12)


def test_coeff_leaves_small_weights_unchanged():
    torch.manual_seed(2)
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, ord=2))  # σ = 0.5 < c
    original = lin.weight.detach().clone()
    spectral_norm(lin, coeff=0.9, n_power_iterations=0)
    _converge(lin)
    assert torch.equal(lin.weight, original)
    # torch's rule would scale it *up* to σ = 1
    assert torch.allclose(torch.linalg.matrix_norm(torch_spectral_norm(nn.Linear(8, 8)).weight, ord=2),
                          torch.tensor(1.0), atol=0.2)  # fmt: skip


@pytest.mark.parametrize("coeff", [0.5, 0.97, 3.0])
def test_coeff_caps_sigma_after_convergence(coeff):
    torch.manual_seed(3)
    lin = nn.Linear(16, 12)
    with torch.no_grad():
        lin.weight.mul_(10)
    spectral_norm(lin, coeff=coeff)
    _converge(lin)
    sigma = float(torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2))
    assert coeff * (1 - 1e-4) <= sigma <= coeff * (1 + 1e-4)


@pytest.mark.parametrize("stride, padding, groups", [(1, 0, 1), (2, 1, 1), (1, 1, 2), (2, 0, 2)])
def test_conv_operator_mode(stride, padding, groups):
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, groups=groups).double()
    input_shape = (4, 7, 6)
    op = ConvOperator.build(conv.weight.shape, input_shape, stride, padding, 1, groups)
    exact = torch.linalg.matrix_norm(conv_operator_matrix(lambda x, w: op.apply(w, x), conv.weight.detach(),
                                                          input_shape), ord=2)  # fmt: skip
    spectral_norm(conv, coeff=0.5, input_shape=input_shape)
    update_spectral_norms(conv, n_iters=3000, tol=1e-15)
    p = conv.parametrizations.weight[0]
    assert p._u.shape == op.output_shape and p._v.shape == input_shape
    assert rel_err(p.sigma(conv.parametrizations.weight.original), exact) <= 1e-6
    # the layer is now 0.5-Lipschitz as an operator: check on the explicit matrix of the normalized conv
    normalized = conv_operator_matrix(lambda x, w: op.apply(w, x), conv.weight.detach(), input_shape)
    assert float(torch.linalg.matrix_norm(normalized, ord=2)) <= 0.5 * (1 + 1e-6)
    y = conv(torch.randn(2, *input_shape, dtype=torch.float64))
    assert y.shape == (2, *op.output_shape)


def _model(n_layers=48, dtype=torch.float32, **kwargs):
    torch.manual_seed(5)
    widths = (16, 40, 33, 64, 7)
    layers = [nn.Linear(widths[i % 5], widths[(i + 1) % 5]).to(dtype) for i in range(n_layers)]
    return nn.Sequential(*[spectral_norm(layer, **kwargs) for layer in layers])


def _per_layer_loop(model, n_iters):
    """The Residual Flows loop: each layer on its own, torch ops."""
    sigmas = []
    with torch.no_grad():
        for p, original in spectral_norm_layers(model):
            w = original.reshape(original.shape[0], -1)
            u, v = p._u.clone(), p._v.clone()
            for _ in range(n_iters):
                u = torch.nn.functional.normalize(w @ v, dim=0, eps=p.eps)
                v = torch.nn.functional.normalize(w.T @ u, dim=0, eps=p.eps)
            sigmas.append(torch.dot(u, w @ v))
    return torch.stack(sigmas)


def _sigmas(model):
    return torch.stack([p.sigma(w).detach() for p, w in spectral_norm_layers(model)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", backends())
def test_update_spectral_norms_equals_per_layer_loop(backend, dtype):
    model = _model(dtype=dtype, coeff=0.9, n_power_iterations=0)
    expected = _per_layer_loop(model, 3)
    update_spectral_norms(model, n_iters=3, backend=backend)
    assert len(spectral_norm_layers(model)) == 48
    assert rel_err(_sigmas(model), expected) <= 1e-6


def _aten_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def test_update_issues_a_few_ops_not_per_layer():
    model = _model(coeff=0.9, n_power_iterations=0)
    update_spectral_norms(model)  # builds and caches the plan
    one = _aten_ops(lambda: update_spectral_norms(model, n_iters=1))
    ten = _aten_ops(lambda: update_spectral_norms(model, n_iters=10))
    assert len(one) <= 4, one
    assert len(ten) - len(one) <= 9 * 3, ten
    # the per-layer loop it replaces: dozens of ops per layer
    assert len(_aten_ops(lambda: _per_layer_loop(model, 1))) >= 48 * 4


def test_update_notices_new_layers_and_replaced_parameters():
    model = _model(n_layers=3, n_power_iterations=0)
    update_spectral_norms(model)
    model.append(spectral_norm(nn.Linear(5, 9), n_power_iterations=0))
    with torch.no_grad():
        model[0].parametrizations.weight.original = nn.Parameter(torch.randn(40, 16) * 5)
    expected = _per_layer_loop(model, 2)
    update_spectral_norms(model, n_iters=2)
    assert rel_err(_sigmas(model), expected) <= 1e-6


def test_operator_mode_conv3d_converts_to_channels_last_3d():
    """model.to(memory_format=...) converts every 4-D/5-D tensor: a Conv3d operator's 4-D u [C', D, H, W] made
    channels_last_3d raise "required rank 5" inside torch. u, v now convert as flat vectors (dtype and device as any
    buffer) and stay contiguous; the layer's outputs are unchanged."""
    memory_format = torch.channels_last_3d
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Conv3d(2, 3, 3, padding=1), coeff=0.9, input_shape=(2, 4, 4, 4))).eval()
    x = torch.randn(2, 2, 4, 4, 4)
    want = model(x)
    norm = model[0].parametrizations.weight[0]
    u = norm._u
    model.to(memory_format=memory_format)
    assert norm._u is u and norm._v.is_contiguous()  # no conversion needed: the same buffer
    torch.testing.assert_close(model(x.contiguous(memory_format=memory_format)), want, rtol=1e-6, atol=1e-6)
    model.double()
    assert norm._u.dtype == torch.float64 and norm._u.shape == (3, 4, 4, 4) and norm._u.is_contiguous()
    torch.testing.assert_close(norm._u, u.double())


@pytest.mark.parametrize("backend", backends())
def test_update_reads_channels_last_conv_weights_in_place(backend):
    """A channels_last conv weight ([out, kh, kw, in] in memory) is read in place as W with its columns permuted
    (the same σ), v in that order in a scratch vector: update_spectral_norms re-gathered every such weight on every
    call (7x slower in the layout audit's CPU timing). u, v equal the contiguous model's, with the layers' own power
    iterations in between; ConvTranspose (dim=1) and Linear layers beside them as before."""
    from kexue_fast.nn.spectral_norm import _PLANS

    def model():
        torch.manual_seed(0)
        return nn.Sequential(spectral_norm(nn.Conv2d(5, 6, 3), coeff=0.9), spectral_norm(nn.ConvTranspose2d(6, 4, 2)),
                             spectral_norm(nn.Conv2d(4, 3, (2, 3))), nn.Flatten(),
                             spectral_norm(nn.Linear(3 * 7 * 6, 2))).double()  # fmt: skip

    plain, converted = model(), model().to(memory_format=torch.channels_last)
    assert not converted[0].parametrizations.weight.original.is_contiguous()
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    for _ in range(3):
        update_spectral_norms(plain, n_iters=2, backend=backend)
        update_spectral_norms(converted, n_iters=2, backend=backend)
        plain(x), converted(x.contiguous(memory_format=torch.channels_last))  # their own iteration (training mode)
    for (a, _), (b, _) in zip(spectral_norm_layers(plain), spectral_norm_layers(converted)):
        for key in ("_u", "_v"):
            assert b._buffers[key].is_contiguous()
            torch.testing.assert_close(b._buffers[key], a._buffers[key], rtol=1e-13, atol=1e-14)
    (group,) = _PLANS[converted][1]
    for (p, w), weight in zip(group.members, group.weights):  # the convolutions' and the Linear's: views
        assert (weight.data_ptr() == w.data_ptr()) == (p.dim == 0)  # (ConvTranspose's dim=1 matrix: a copy)


def test_update_mixed_dtypes_conv_transpose_and_conv_operator_layers():
    model = nn.Sequential(
        spectral_norm(nn.Linear(5, 6), n_power_iterations=0),
        spectral_norm(nn.Linear(6, 6).double(), n_power_iterations=0),
        spectral_norm(nn.ConvTranspose2d(3, 2, 3), n_power_iterations=0),
        spectral_norm(nn.Conv1d(2, 3, 3), input_shape=(2, 8), n_power_iterations=0),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update_spectral_norms(model, n_iters=200, tol=1e-10)
    for p, original in spectral_norm_layers(model):
        if p.conv is None:
            exact = torch.linalg.matrix_norm(p._reshape_weight_to_matrix(original.detach()).double(), ord=2)
            assert rel_err(p.sigma(original.detach()), exact) < 1e-4
    assert not torch.equal(
        before["2.parametrizations.weight.0._u"], model.state_dict()["2.parametrizations.weight.0._u"]
    )


def test_zero_iterations_in_forward_leaves_buffers():
    model = _model(n_layers=2, n_power_iterations=0)
    u = model[0].parametrizations.weight[0]._u.clone()
    model(torch.randn(3, 16))
    assert torch.equal(model[0].parametrizations.weight[0]._u, u)


def test_torch_compile_fullgraph():
    model = nn.Sequential(spectral_norm(nn.Linear(8, 16), coeff=0.9), nn.ReLU(),
                          spectral_norm(nn.Linear(16, 4)))  # fmt: skip
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 8)
    assert torch.allclose(compiled(x), eager(x), atol=1e-6)
    compiled(x).sum().backward()
    assert model[0].parametrizations.weight.original.grad is not None


def test_compiled_graph_does_not_query_autocast_availability(monkeypatch):
    """torch 2.11's dynamo cannot trace torch.amp.is_autocast_available (torch._C._is_autocast_available): the σ̂
    region's check broke every fullgraph compile through a spectral norm there (H200 machine, torch 2.11: 15 of the
    18 GPU-run failures at b9dc632). Here the query raises when traced, as it did there."""
    available = torch.amp.is_autocast_available

    def eager_only(device_type):
        if torch.compiler.is_compiling():
            raise RuntimeError("is_autocast_available traced under torch.compile")
        return available(device_type)

    monkeypatch.setattr(torch.amp, "is_autocast_available", eager_only)
    torch._dynamo.reset()
    model = nn.Sequential(spectral_norm(nn.Linear(8, 16), coeff=0.9), nn.ReLU(), spectral_norm(nn.Linear(16, 4)))
    eager = copy.deepcopy(model)
    x = torch.randn(5, 8)
    assert torch.allclose(torch.compile(model, fullgraph=True, backend="aot_eager")(x), eager(x), atol=1e-6)


def test_torch_compile_fullgraph_inductor():
    model = nn.Sequential(spectral_norm(nn.Linear(8, 16), coeff=0.9), nn.Tanh(), spectral_norm(nn.Linear(16, 4)))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 8)
    assert torch.allclose(compiled(x), eager(x), atol=1e-5)


@pytest.mark.parametrize(
    "module, kwargs, error, match",
    [
        (nn.Linear(3, 3), {"coeff": 0.0}, ValueError, "coeff"),
        (nn.Linear(3, 3), {"coeff": -1.0}, ValueError, "coeff"),
        (nn.Linear(3, 3), {"n_power_iterations": -1}, ValueError, "n_power_iterations"),
        (nn.Linear(3, 3), {"eps": 0.0}, ValueError, "eps"),
        (nn.Linear(3, 3), {"dim": 2}, ValueError, "dim"),
        (nn.Linear(3, 3), {"name": "nope"}, ValueError, "nope"),
        (nn.Linear(3, 3), {"input_shape": (3,)}, ValueError, "input_shape"),
        (nn.Conv2d(3, 4, 3), {"input_shape": (2, 8, 8)}, ValueError, "input_shape"),
        (nn.Conv2d(3, 4, 3), {"input_shape": (3, 2, 8)}, ValueError, "input_shape"),
        (nn.Conv2d(3, 4, 3), {"input_shape": (3, 8)}, ValueError, "input_shape"),
        (nn.Conv2d(3, 4, 3, padding_mode="circular", padding=1), {"input_shape": (3, 8, 8)}, ValueError, "zeros"),
    ],
)
def test_bad_arguments(module, kwargs, error, match):
    with pytest.raises(error, match=match):
        spectral_norm(module, **kwargs)


def test_nan_weight_raises():
    lin = nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        spectral_norm(lin)
    model = _model(n_layers=2, n_power_iterations=0)
    with torch.no_grad():
        model[1].parametrizations.weight.original[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        update_spectral_norms(model)
    with pytest.raises(ValueError, match="n_iters"):
        update_spectral_norms(model, n_iters=0)


def test_public_names():
    assert kexue_fast.nn.spectral_norm is spectral_norm
    assert callable(kexue_fast.power_iteration) and callable(kexue_fast.spectral_norm_bound)


class _Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def test_update_follows_what_the_spectral_norm_receives():
    """Another parametrization before the spectral norm, a parametrized buffer, a layer shared twice."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    layer = nn.Linear(6, 6, bias=False).double()
    parametrize.register_parametrization(layer, "weight", _Symmetric())
    spectral_norm(layer, n_power_iterations=0)
    update_spectral_norms(layer, n_iters=200, tol=1e-14)
    assert float(torch.linalg.matrix_norm(layer.weight.detach(), 2)) == pytest.approx(1.0, abs=1e-10)

    holder = nn.Module()
    holder.register_buffer("weight", torch.randn(5, 4, dtype=torch.float64))
    spectral_norm(holder, n_power_iterations=0)
    u = holder.parametrizations.weight[0]._u.clone()
    update_spectral_norms(holder)
    assert not torch.equal(u, holder.parametrizations.weight[0]._u)

    shared = spectral_norm(nn.Linear(4, 4).double(), n_power_iterations=0)
    twice = nn.Sequential(shared, nn.Tanh(), shared)
    assert len(spectral_norm_layers(twice)) == 1
    reference = copy.deepcopy(shared)
    update_spectral_norms(twice)
    update_spectral_norms(reference)
    assert torch.equal(shared.parametrizations.weight[0]._u, reference.parametrizations.weight[0]._u)


def test_meta_and_complex_weights_as_torch():
    with torch.device("meta"):
        ours, theirs = spectral_norm(nn.Linear(3, 3)), torch_spectral_norm(nn.Linear(3, 3))
    assert ours.weight.shape == theirs.weight.shape == (3, 3)
    torch.manual_seed(0)
    weight = torch.randn(4, 3, dtype=torch.complex128)
    a, b = nn.Linear(3, 4, bias=False), nn.Linear(3, 4, bias=False)
    for m in (a, b):
        m.weight = nn.Parameter(weight.clone())
    torch.manual_seed(1)
    spectral_norm(a, n_power_iterations=30)
    torch.manual_seed(1)
    torch_spectral_norm(b, n_power_iterations=30)
    assert torch.allclose(a.weight, b.weight, atol=1e-12)
    update_spectral_norms(a)  # complex layers: their own iteration
    assert float(torch.linalg.matrix_norm(a.weight.detach(), 2)) == pytest.approx(1.0, abs=1e-6)


def test_bound_of_huge_weights_and_conv_argument_errors():
    w = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e200
    bound = float(kexue_fast.spectral_norm_bound(w))
    true = float(torch.linalg.matrix_norm(w / 1e200, 2)) * 1e200
    assert true <= bound <= true * 1.01
    weight = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="dtype and device"):
        kexue_fast.conv_operator_norm(weight, (3, 6, 6), v=torch.randn(3, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="groups=3 must divide"):
        kexue_fast.conv_operator_norm(torch.randn(4, 1, 3, 3), (3, 6, 6), groups=3)
    with pytest.raises(ValueError, match="expects 3"):
        kexue_fast.conv_operator_norm_bound(weight, (5, 6, 6))
    with pytest.raises(TypeError, match="model"):
        update_spectral_norms(torch.randn(3))


@pytest.mark.parametrize("mode", ["matrix", "operator"])
def test_coeff_layer_recovers_from_a_zero_initialized_weight(mode):
    """A zero-initialized layer (Residual Flows' habit) once zeroed u and v for good: σ̂ = 0 from then on, so with a
    coeff the layer passed through unscaled whatever its weight became. u, v are now kept where W v = 0 (the layer's
    iteration with a coeff, the C++ and torch batched updates, the conv operator iteration)."""
    torch.manual_seed(0)
    if mode == "matrix":
        layer, shape = nn.Linear(8, 8), (2, 8)
        spectral_norm(layer, coeff=0.9)
        exact = lambda w: torch.linalg.matrix_norm(w, 2)  # noqa: E731
    else:
        layer, shape = nn.Conv2d(2, 2, 3, padding=1), (2, 2, 5, 5)
        spectral_norm(layer, coeff=0.9, input_shape=(2, 5, 5))
        op = ConvOperator.build(layer.weight.shape, (2, 5, 5), 1, 1, 1, 1)
        exact = lambda w: torch.linalg.matrix_norm(  # noqa: E731
            conv_operator_matrix(lambda x, ww: op.apply(ww, x), w, (2, 5, 5)), 2
        )
    with torch.no_grad():
        layer.parametrizations.weight.original.zero_()
        layer(torch.randn(*shape))  # the iteration runs on the zero weight (and the 15 warm-up ones ran at init)
        layer.parametrizations.weight.original.copy_(torch.randn_like(layer.weight) * 5)
    for backend in ("cpp", "torch"):
        update_spectral_norms(layer, n_iters=200, backend=backend)
        for _ in range(3):
            layer(torch.randn(*shape))
        assert float(exact(layer.weight.detach())) <= 0.9 * 1.01, backend  # unscaled, it was several times that


def test_zero_matrix_keeps_the_start_vector():
    """power_iteration on a zero matrix: σ = 0, u = 0, v the (normalized) start vector on both backends."""
    v0 = torch.randn(5, dtype=torch.float64)
    for backend in ("cpp", "torch"):
        sigma, us, vs = kexue_fast.power_iteration([torch.zeros(4, 5, dtype=torch.float64)], v=[v0.clone()],
                                                   n_iters=5, backend=backend)  # fmt: skip
        assert float(sigma[0]) == 0 and torch.equal(us[0], torch.zeros(4, dtype=torch.float64))
        assert torch.allclose(vs[0], v0 / v0.norm(), rtol=1e-15, atol=0), backend


def test_positional_arguments_as_torch_and_a_changed_eps():
    """spectral_norm(module, name, n_power_iterations, eps, dim) positionally, as torch's; a layer's eps changed
    after a first update_spectral_norms is taken by the next (the cached groups once kept the old eps)."""
    torch.manual_seed(1)
    layer = spectral_norm(nn.Linear(4, 3), "weight", 2, 1e-10, 0)
    p = layer.parametrizations.weight[0]
    assert (p.n_power_iterations, p.eps, p.dim) == (2, 1e-10, 0)
    model = nn.Sequential(spectral_norm(nn.Linear(3, 3), n_power_iterations=0))
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(1e-4)
    update_spectral_norms(model)
    p = model[0].parametrizations.weight[0]
    assert float(p._u.norm()) == pytest.approx(1.0, rel=1e-6)
    p.eps = 1.0  # ‖W v‖ ~ 1e-4 < eps: u = W v / eps, far from unit
    update_spectral_norms(model)
    assert float(p._u.norm()) < 1e-2


def test_update_reports_nan_weights_in_operator_and_complex_layers():
    # unit_or_keep keeps u, v where ‖Wv‖ is NaN, so these layers hid a NaN weight that matrix-mode groups report
    conv = spectral_norm(nn.Conv2d(3, 4, 3, padding=1), n_power_iterations=0, coeff=0.9, input_shape=(3, 8, 8))
    lin = spectral_norm(nn.Linear(4, 4, dtype=torch.complex64), n_power_iterations=0, coeff=0.9)
    for module in (conv, lin):
        update_spectral_norms(module)
        with torch.no_grad():
            module.parametrizations.weight.original.view(-1)[0] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf"):
            update_spectral_norms(module)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_update_reports_float32_overflow(backend):
    # σ̂ = 0 on the torch path (u = Wv/‖Wv‖ with ‖Wv‖ = Inf) let a coeff layer through unscaled
    model = _model(n_layers=2, n_power_iterations=0, coeff=0.9)
    with torch.no_grad():
        model[1].parametrizations.weight.original.mul_(1e20)
    before = [b.clone() for b in model[1].buffers()]
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        update_spectral_norms(model, backend=backend)
    if backend == "cpp":  # it wrote NaN u, v; the torch path zeroes u (Wv/Inf) and keeps v
        assert all(torch.equal(b, a) for b, a in zip(before, model[1].buffers()))
    update_spectral_norms(model.double(), backend=backend)
    w = model[1].parametrizations.weight.original
    assert rel_err(model[1].parametrizations.weight[0].sigma(w), torch.linalg.matrix_norm(w, 2)) < 1e-6


_LAYERS = {
    "linear": lambda: nn.Linear(5, 7),
    "conv": lambda: nn.Conv2d(3, 4, 3),
    "conv_transpose": lambda: nn.ConvTranspose2d(3, 4, 3),
    "embedding": lambda: nn.Embedding(10, 6),
}


@pytest.mark.parametrize("make", list(_LAYERS.values()), ids=list(_LAYERS))
def test_loads_checkpoints_of_torchs_deprecated_spectral_norm(make):
    """torch.nn.utils.spectral_norm's keys (weight_orig, weight_u, weight_v) load into ours, nested too, with the
    old layer's outputs in eval (its training steps update v before u, the parametrization u before v: torch's two
    APIs differ there); operator-mode layers (other u, v) refuse them."""
    torch.manual_seed(0)
    old = nn.Sequential(nn.Identity(), torch.nn.utils.spectral_norm(make()))
    inputs = {nn.Linear: torch.randn(4, 5), nn.Embedding: torch.randint(0, 10, (4,))}
    x = inputs.get(type(old[1]), torch.randn(2, 3, 8, 8))
    for _ in range(3):
        old(x)
    checkpoint = copy.deepcopy(old.state_dict())
    assert {"1.weight_orig", "1.weight_u", "1.weight_v"} <= set(checkpoint)
    new = nn.Sequential(nn.Identity(), spectral_norm(make()))
    new.load_state_dict(checkpoint)
    assert torch.equal(new.eval()(x), old.eval()(x))
    assert torch.equal(new[1].parametrizations.weight[0]._u, old[1].weight_u)
    assert torch.equal(new[1].parametrizations.weight[0]._v, old[1].weight_v)
    new.load_state_dict(new.state_dict())  # its own keys load as before
    if isinstance(old[1], nn.Conv2d):
        operator = nn.Sequential(nn.Identity(), spectral_norm(make(), input_shape=(3, 8, 8)))
        with pytest.raises(RuntimeError, match="weight_orig"):
            operator.load_state_dict(checkpoint)


def test_update_takes_strided_u_v_buffers():
    # load_state_dict(assign=True) with strided tensors makes _u/_v non-contiguous; the batched call writes in place
    model = _model(n_layers=2, n_power_iterations=0)
    reference = copy.deepcopy(model)
    state = {k: torch.stack([t, torch.zeros_like(t)], -1)[..., 0] if k.endswith(("_u", "_v")) else t
             for k, t in model.state_dict().items()}  # fmt: skip
    assert not all(t.is_contiguous() for t in state.values())
    model.load_state_dict(state, assign=True)
    update_spectral_norms(model, n_iters=3)
    update_spectral_norms(reference, n_iters=3)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_update_between_a_compiled_forward_and_its_backward_raises_as_torch_does():
    """The C++ update wrote u, v through NumPy views, unseen by autograd: a compiled forward's graph, which saved the
    buffers themselves, then used the new values in backward silently (gradients ~600 off); the torch backend's
    in-place copy raised autograd's in-place error. Now both raise."""
    torch.manual_seed(0)
    for backend in ("cpp", "torch"):
        m = spectral_norm(nn.Linear(6, 6), n_power_iterations=0)
        with torch.no_grad():
            m.parametrizations.weight.original.copy_(torch.randn(6, 6))
        loss = torch.compile(m, backend="aot_eager", fullgraph=True)(torch.randn(4, 6)).pow(2).sum()
        update_spectral_norms(m, n_iters=5, backend=backend)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_update_of_a_spectral_norm_after_other_parametrizations():
    """A torch spectral_norm registered first was advanced by the update (evaluated in training mode); a spectral
    norm after a parametrization with several originals was skipped; a NaN weight there went unreported."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    first = torch_spectral_norm(nn.Linear(5, 4))
    spectral_norm(first, n_power_iterations=0)
    u = first.parametrizations.weight[0]._u.clone()
    update_spectral_norms(first)
    assert torch.equal(u, first.parametrizations.weight[0]._u) and first.parametrizations.weight[0].training

    class Split(nn.Module):
        def forward(self, a, b):
            return a + b

        def right_inverse(self, w):
            return w / 2, w / 2

    split = nn.Linear(5, 4)
    parametrize.register_parametrization(split, "weight", Split())
    spectral_norm(split, n_power_iterations=0, coeff=0.1)
    with torch.no_grad():
        split.parametrizations.weight.original0.mul_(5)
    update_spectral_norms(split, n_iters=50)
    w = split.parametrizations.weight.original0 + split.parametrizations.weight.original1
    layer = split.parametrizations.weight[1]
    assert torch.allclose(torch.vdot(layer._u, w.detach() @ layer._v), torch.linalg.matrix_norm(w.detach(), 2))
    with torch.no_grad():
        split.parametrizations.weight.original0[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        update_spectral_norms(split)


def test_dim_and_input_shape_together_are_refused():
    with pytest.raises(ValueError, match="pass one of them"):
        spectral_norm(nn.Conv2d(2, 3, 3), dim=1, input_shape=(2, 5, 5))


def test_frozen_power_iteration_across_threads_clears_when_all_blocks_end():
    """Two threads' frozen blocks ending out of order: a save-and-restore flag was cleared while the second thread was
    still inside (its u moved during its inverse) and then restored to frozen for good (no training forward of any
    layer advanced its power iteration afterwards)."""
    import threading

    from kexue_fast.nn.spectral_norm import frozen_power_iteration, power_iteration_frozen, power_iteration_is_frozen

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with frozen_power_iteration():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with frozen_power_iteration():
            b_in.set()
            a_out.wait(10)
            seen["inside after the other ended"] = power_iteration_is_frozen()
            with power_iteration_frozen(False):  # this thread's replay of an unfrozen pass: the other's freeze wins
                seen["unfrozen here while frozen there"] = power_iteration_is_frozen()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"inside after the other ended": True, "unfrozen here while frozen there": False}
    assert not power_iteration_is_frozen()
    layer = spectral_norm(nn.Linear(3, 4))
    version = layer.parametrizations.weight[0]._u._version
    layer(torch.randn(2, 3))
    assert layer.parametrizations.weight[0]._u._version > version  # training forwards write u again
