"""Invertible residual blocks in the situations a user meets outside the happy path: generic branches with state or
randomness under the memory-efficient recompute, hooks and subclasses that the closed forms must not skip, divergent
inverses, inference mode, low precision, certified conv bounds, and bad arguments."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from kexue_fast.flows import lipschitz_report
from kexue_fast.flows.lipschitz import activation_bound, branch_bound
from kexue_fast.nn import ActNorm, InvertibleResBlock, LipSwish, ResidualFlow, Squeeze, spectral_norm
from kexue_fast.spectral import conv_operator_norm_bound
from kexue_fast.spectral.reference import conv_operator_matrix

D64 = torch.float64


class Scaled(nn.Module):
    """A generic branch (the autograd path): 0.9 · Sequential(...)."""

    def __init__(self, *layers):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return 0.9 * self.net(x)


def _grads(g, memory_efficient, x, steps=1, weights=None):
    g = copy.deepcopy(g)
    block = InvertibleResBlock(g, n_terms=4, memory_efficient=memory_efficient)
    assert block.series_path == "autograd"
    torch.manual_seed(1)
    outs = [block(x)[1] for _ in range(steps)]  # several forwards before one backward
    w = torch.arange(1.0, x.shape[0] + 1, dtype=x.dtype) if weights is None else weights
    sum((w * ld).sum() for ld in outs).backward()
    grads = torch.cat([p.grad.flatten() for p in g.parameters() if p.grad is not None])
    return grads, {k: v.clone() for k, v in g.state_dict().items()}


@pytest.mark.parametrize("case", ["dropout", "torch spectral_norm", "kexue spectral_norm, two forwards"])
def test_memory_efficient_recompute_replays_the_forward(case):
    """The memory-efficient backward recomputes g: it must see the forward's Dropout masks and power-iteration
    state, leave g's buffers as the forward left them, and so equal the plain Neumann path."""
    torch.manual_seed(0)
    if case == "dropout":
        g = Scaled(nn.Linear(3, 16), LipSwish(), nn.Dropout(0.3), nn.Linear(16, 3))
    elif case == "torch spectral_norm":
        g = Scaled(torch_spectral_norm(nn.Linear(3, 16)), LipSwish(), torch_spectral_norm(nn.Linear(16, 3)))
    else:
        g = Scaled(spectral_norm(nn.Linear(3, 16), coeff=0.9, n_power_iterations=1), LipSwish(),
                   spectral_norm(nn.Linear(16, 3), coeff=0.9, n_power_iterations=1))  # fmt: skip
    g = g.double().train()
    x = torch.randn(6, 3, dtype=D64)
    steps = 2 if case.endswith("two forwards") else 1
    a, state_a = _grads(g, True, x, steps)
    b, state_b = _grads(g, False, x, steps)
    assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_hooks_and_subclasses_take_the_autograd_path():
    """The closed forms read weights directly: a Sequential or layer subclass with its own forward, hook-based
    spectral norms and hooks added after the block was built must send the block through g itself."""
    torch.manual_seed(0)
    x = torch.randn(4, 4, dtype=D64)

    class Half(nn.Sequential):
        def forward(self, x):
            return 0.5 * super().forward(x)

    def layers():
        return [spectral_norm(nn.Linear(4, 8), coeff=0.9), LipSwish(), spectral_norm(nn.Linear(8, 4), coeff=0.9)]

    plain = nn.Sequential(*layers()).double().eval()
    assert InvertibleResBlock(plain).series_path == "dense-chain"
    half = Half(*layers()).double().eval()
    block = InvertibleResBlock(half)
    assert block.series_path == "autograd"
    assert torch.equal(block(x)[0], x + half(x))

    class HalfConv(nn.Conv2d):
        def forward(self, x):
            return 0.5 * super().forward(x)

    first = spectral_norm(nn.Conv2d(2, 4, 3, padding=1), coeff=0.9, input_shape=(2, 3, 3))
    last = spectral_norm(HalfConv(4, 2, 3, padding=1), coeff=0.9, input_shape=(4, 3, 3))
    conv_g = nn.Sequential(first, LipSwish(), last).double()
    xc = torch.randn(3, 2, 3, 3, dtype=D64)
    block = InvertibleResBlock(conv_g.eval())
    assert block.series_path == "autograd"
    assert torch.equal(block(xc)[0], xc + conv_g(xc))

    lin1, lin2 = nn.Linear(4, 8).double(), nn.Linear(8, 4).double()
    hooked = nn.Sequential(nn.utils.spectral_norm(lin1), nn.Tanh(), nn.utils.spectral_norm(lin2)).eval()
    block = InvertibleResBlock(hooked)
    assert block.series_path == "autograd"
    y, logdet = block(x)
    assert torch.equal(y, x + hooked(x))
    (y.sum() + logdet.sum()).backward()
    assert lin1.weight_orig.grad is not None

    seen = []
    block = InvertibleResBlock(plain)
    handle = plain[0].register_forward_hook(lambda m, i, o: seen.append(o))  # added after construction
    try:
        assert block.series_path == "autograd"
        block(x)
        assert len(seen) == 1
    finally:
        handle.remove()
    assert block.series_path == "dense-chain"


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_diverging_inverse_warns_and_reports_not_converged(dtype):
    g = nn.Linear(3, 3, bias=False).to(dtype)
    with torch.no_grad():
        g.weight.copy_(-3.0 * torch.eye(3))  # Lip(g) = 3: x ← y − g(x) = y + 3x blows up
    y = torch.randn(2, 3, dtype=dtype)
    block = InvertibleResBlock(g)
    with pytest.warns(RuntimeWarning, match="diverged"):
        block.inverse(y)
    assert not block.last_inverse.converged
    assert block.last_inverse.iterations < block.inverse_max_iter  # stopped at the first non-finite iterate
    # Anderson solves this linear map exactly (x = −y/2); when it reports convergence, x is an inverse
    block = InvertibleResBlock(g, inverse_method="anderson")
    x = block.inverse(y)
    assert block.last_inverse.converged and torch.allclose(x + g(x), y, atol=1e-5)


def test_anderson_with_one_iteration_checks_its_only_step():
    torch.manual_seed(0)
    g = Scaled(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    block = InvertibleResBlock(g, inverse_method="anderson", inverse_max_iter=1)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        block.inverse(torch.randn(2, 3, dtype=D64))
    assert (block.last_inverse.iterations, block.last_inverse.g_evals) == (1, 1)


@pytest.mark.parametrize("logdet", ["exact", "series"])
def test_inference_mode_equals_no_grad(logdet):
    torch.manual_seed(0)
    g = Scaled(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()  # generic g: autograd products
    block = InvertibleResBlock(g, logdet=logdet)
    x = torch.randn(4, 3, dtype=D64)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = block(x)
    torch.manual_seed(5)
    with torch.inference_mode():
        got = block(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_logdet_in_half_precision(dtype):
    torch.manual_seed(0)
    g = nn.Sequential(spectral_norm(nn.Linear(3, 8), coeff=0.9), LipSwish(), spectral_norm(nn.Linear(8, 3), coeff=0.9))
    block = InvertibleResBlock(g.eval(), logdet="exact")
    x = torch.randn(4, 3)
    reference = block(x)[1]
    block_half = InvertibleResBlock(copy.deepcopy(g).to(dtype).eval(), logdet="exact")
    got = block_half(x.to(dtype))[1]
    assert got.dtype == dtype
    assert (got.float() - reference).abs().max() <= 0.05


def test_actnorm_first_batch_with_nan_does_not_poison_the_init():
    norm = ActNorm(3).train()
    x = torch.randn(8, 3)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        norm(x)
    assert not bool(norm.initialized) and torch.equal(norm.bias.detach(), torch.zeros(3))
    clean = torch.randn(8, 3)
    y, _ = norm(clean)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        ActNorm(3).train()(torch.randn(0, 3))


def test_sample_through_squeeze_without_factor_out():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        flow = ResidualFlow.conv((1, 4, 4), n_scales=2, n_blocks=1, hidden_channels=4).double().eval()
    assert flow.sample(3).shape == (3, 1, 4, 4)
    assert flow.sample(0).shape == (0, 1, 4, 4)
    x = torch.randn(2, 1, 4, 4, dtype=D64)
    with torch.no_grad():
        assert torch.allclose(flow.inverse(flow(x)[0]), x, atol=1e-6)


def test_lipschitz_violations_that_the_layers_show_are_refused():
    conv = spectral_norm(nn.Conv2d(2, 2, 3, padding=1), coeff=0.9)  # matrix mode: the reshaped kernel
    with pytest.raises(ValueError, match="matrix mode"):
        InvertibleResBlock(nn.Sequential(conv, LipSwish(), spectral_norm(nn.Conv2d(2, 2, 1), coeff=0.9)))
    one_by_one = nn.Sequential(spectral_norm(nn.Conv2d(2, 2, 1), coeff=0.9))  # 1×1: the matrix norm is the operator's
    InvertibleResBlock(one_by_one)
    steep = nn.Sequential(spectral_norm(nn.Linear(2, 4), coeff=0.9), nn.LeakyReLU(2.0),
                          spectral_norm(nn.Linear(4, 2), coeff=0.9))  # fmt: skip
    with pytest.raises(ValueError, match=r"negative_slope=2\.0"):
        InvertibleResBlock(steep)


@pytest.mark.parametrize("form", ["parametrization", "hook"])
def test_torchs_own_spectral_norm_in_g_is_warned(form):
    """torch's spectral_norm scales a layer to σ = 1 (from an estimate that can fall short of σ): Lip(g) < 1 is not
    enforced, which the layer check used to pass silently; a block of kexue_fast's spectral norms stays quiet."""
    wrap = torch_spectral_norm if form == "parametrization" else torch.nn.utils.spectral_norm
    g = nn.Sequential(wrap(nn.Linear(3, 8)), LipSwish(), spectral_norm(nn.Linear(8, 3), coeff=0.9))
    with pytest.warns(RuntimeWarning, match=r"layer 0.* torch's spectral_norm"):
        InvertibleResBlock(g)
    quiet = nn.Sequential(spectral_norm(nn.Linear(3, 8), coeff=0.9), LipSwish(),
                          spectral_norm(nn.Linear(8, 3), coeff=0.9))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        InvertibleResBlock(quiet)


def test_dropout_bound_and_reports_change_no_buffer():
    assert activation_bound(nn.Dropout(0.5).train()) == 2.0
    assert activation_bound(nn.Dropout(0.5).eval()) == 1.0
    torch.manual_seed(0)
    g = nn.Sequential(torch_spectral_norm(nn.Linear(3, 8)), nn.Tanh(), torch_spectral_norm(nn.Linear(8, 3))).train()
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(0.5)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    branch_bound(g)
    lipschitz_report(nn.Sequential(InvertibleResBlock(g)))
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())


def test_conv_flows_are_certified():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        flow = ResidualFlow.conv((3, 8, 8), n_scales=2, n_blocks=1, hidden_channels=8, coeff=0.9, preset="iresnet",
                                 n_power_iterations=20)  # fmt: skip
    report = lipschitz_report(flow)
    assert report.all_certified, str(report)


def _operator_norm(conv, input_shape):
    matrix = conv_operator_matrix(lambda x, w: conv._conv_forward(x, w, None), conv.weight.detach(), input_shape)
    return float(torch.linalg.matrix_norm(matrix, 2))


@pytest.mark.parametrize(
    "conv, input_shape",
    [
        (nn.Conv1d(3, 4, 3, padding=1), (3, 9)),
        (nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8)),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), (4, 6, 6)),
        (nn.Conv2d(2, 6, 5, stride=2), (2, 7, 7)),
        (nn.Conv2d(4, 4, 1), (4, 5, 5)),
        (nn.Conv2d(3, 5, (3, 1), padding=(1, 0)), (3, 6, 4)),
        (nn.Conv3d(2, 3, 3, padding=1), (2, 4, 4, 4)),
    ],
)
def test_conv_operator_norm_bound_is_certified_and_tight(conv, input_shape):
    torch.manual_seed(0)
    conv.reset_parameters()  # the parametrized modules were built at collection: seeded weights here
    conv = conv.double()
    true = _operator_norm(conv, input_shape)
    with_shape = float(conv_operator_norm_bound(conv.weight, input_shape, dilation=conv.dilation, groups=conv.groups))
    any_size = float(conv_operator_norm_bound(conv.weight, dilation=conv.dilation, groups=conv.groups))
    assert true <= with_shape <= any_size * (1 + 1e-12)
    if conv.stride[0] == 1 and conv.dilation[0] == 1 and len(input_shape) < 4:
        assert with_shape <= 1.1 * true  # stride and small 3-d grids aside, within a few percent
    bigger = tuple([input_shape[0], *(4 * n for n in input_shape[1:])]) if len(input_shape) == 2 else None
    if bigger is not None:  # the size-free bound covers every input size
        assert _operator_norm(conv, bigger) <= any_size


def test_conv_operator_norm_bound_rejects_bad_input():
    with pytest.raises(ValueError, match="conv kernel"):
        conv_operator_norm_bound(torch.randn(3, 3))
    with pytest.raises(ValueError, match="input_shape"):
        conv_operator_norm_bound(torch.randn(2, 2, 3, 3), (2, 5))
    for shape in (5, "25", (2, 5, True), (2, 5.0, 5)):  # an int raised len()'s TypeError; True passed as a size 1
        with pytest.raises(ValueError, match="input_shape"):
            conv_operator_norm_bound(torch.randn(2, 2, 3, 3), shape)
    with pytest.raises(ValueError, match="groups"):
        conv_operator_norm_bound(torch.randn(3, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match=r"NaN|finite"):
        conv_operator_norm_bound(torch.full((2, 2, 3, 3), float("nan")))


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="beta"):
        LipSwish(beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        LipSwish(beta=float("nan"))
    assert math.isclose(float(LipSwish(beta=800.0).beta.detach()), 800.0)
    with pytest.raises(ValueError, match="n_blocks"):
        ResidualFlow.dense(3, n_blocks=0)
    with pytest.raises(ValueError, match="n_blocks"):
        ResidualFlow.dense(3, n_blocks=-1)
    with pytest.raises(ValueError, match="input_shape"):
        ResidualFlow.conv((5, 5))
    with pytest.raises(ValueError, match="multiples of 2"):
        ResidualFlow.conv((1, 5, 5), n_scales=2)
    with pytest.raises(ValueError, match="inverse_atol"):
        InvertibleResBlock(nn.Linear(2, 2), inverse_atol=float("inf"))
    flow = ResidualFlow.dense(3, n_blocks=1, hidden=4)
    with pytest.raises(ValueError, match="n must be"):
        flow.sample(-1)
    with pytest.raises(ValueError, match="batch dimension"):
        flow.layers[1].inverse(torch.randn(3))


def test_inference_mode_for_dense_chains_on_non_flat_inputs():
    torch.manual_seed(0)
    g = nn.Sequential(spectral_norm(nn.Linear(4, 8), coeff=0.9), LipSwish(), spectral_norm(nn.Linear(8, 4), coeff=0.9))
    block = InvertibleResBlock(g.double().eval())
    x = torch.randn(5, 3, 4, dtype=D64)  # [B, T, D]: the dense closed form needs [B, D], so autograd runs
    with torch.inference_mode():
        assert block(x)[1].shape == (5,)


def test_replay_skips_removed_buffers_and_is_serialized():
    from kexue_fast import _state

    bn = nn.BatchNorm1d(3)
    state = _state.capture(bn, torch.device("cpu"))
    del bn.num_batches_tracked
    with _state.replaying(state):  # a buffer removed since the capture is left alone
        assert "num_batches_tracked" not in bn._buffers
    assert _state._REPLAY_LOCK.acquire(blocking=False)  # released after the block
    _state._REPLAY_LOCK.release()


def test_conv_bound_grid_is_the_cheaper_one():
    from kexue_fast.spectral.bound import symbol_grid

    assert symbol_grid([0, 0], [64, 64]) == ([1, 1], 1.0)  # 1×1 kernels: a constant symbol, one point
    assert symbol_grid([2, 0], None)[0] == [64, 1]
    weight = torch.randn(8, 8, 1, 1, dtype=D64)
    one_point = float(conv_operator_norm_bound(weight, (8, 64, 64)))
    assert one_point == pytest.approx(float(torch.linalg.matrix_norm(weight[:, :, 0, 0], 2)), rel=1e-12)


def test_compiled_probes_are_distinct():
    """torch's min-cut partitioner (backend="aot_eager") merges repeated identical random draws in a graph that
    needs gradients: n_probes > 1 under torch.compile draws all probes at once."""
    from kexue_fast.flows import logdet as L

    x = torch.randn(5, 4, dtype=D64)
    w = torch.randn(4, 4, dtype=D64, requires_grad=True)
    for kind in ("gaussian", "rademacher"):

        def f(x, w, kind=kind):
            a, b = L.draw_probes(x, kind, 2).unbind(0)
            return ((a @ w) * a).sum(1) + ((b @ w) * b).sum(1), a, b

        _, a, b = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
        assert not torch.equal(a, b)
        if kind == "rademacher":
            assert set(a.flatten().tolist()) <= {-1.0, 1.0}


def test_device_roulette_weights_fit_the_dtype():
    from kexue_fast.flows import logdet as L

    plan = L.roulette_plan_on_device(2, "geometric", 0.95, 32, torch.zeros(1, dtype=torch.float32))
    weights = torch.tensor(plan.inv_prob, dtype=torch.float32)  # 1/P(N ≥ 32) ≈ 2e40 would overflow float32
    assert bool(torch.isfinite(weights).all())


# ------------------------------------------------------------------------------------- fixes from an audit
def _dense_g(d=3, h=8, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    g = nn.Sequential(spectral_norm(nn.Linear(d, h), coeff=0.9, n_power_iterations=5), LipSwish(),
                      spectral_norm(nn.Linear(h, d), coeff=0.9, n_power_iterations=5)).to(dtype)  # fmt: skip
    with torch.no_grad():
        for _ in range(20):
            g(torch.zeros(1, d, dtype=dtype))
    return g.eval()


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("logdet", ["series", "roulette"])
def test_closed_form_paths_run_under_autocast_with_backward(kind, logdet):
    """The closed-form Functions saved bfloat16 tensors beside float32 weights (a dtype error in backward, dense) or
    met them in the conv operator's σ̂ (forward): under autocast the block now takes torch's graph of the series."""
    torch.manual_seed(0)
    if kind == "dense":
        flow, x = ResidualFlow.dense(4, n_blocks=2, hidden=16, logdet=logdet), torch.randn(8, 4)
    else:
        flow, x = (
            ResidualFlow.conv((2, 4, 4), n_scales=1, n_blocks=1, hidden_channels=4, logdet=logdet),
            torch.randn(3, 2, 4, 4),
        )
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("ignore")  # the roulette's variance warning
        loss = -flow.log_prob(x).mean()
        loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in flow.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_block_reads_g_again_after_its_modules_change(backend, monkeypatch):
    """The chain descriptions were read once at construction: after blk.g[1] = nn.Tanh() or blk.g = new_g the closed
    forms kept computing the old g (y ≠ x + g(x), gradients to stale parameters), and removing a parametrization
    made the block crash."""
    from torch.nn.utils import parametrize

    monkeypatch.setenv("KEXUE_FAST_BACKEND", backend)
    blk = InvertibleResBlock(_dense_g())
    x = torch.randn(5, 3, dtype=torch.float64)
    blk(x)
    blk.g[1] = nn.Tanh()
    y, _ = blk(x)
    torch.testing.assert_close(y, x + blk.g(x), rtol=0, atol=1e-14)
    blk.g = _dense_g(seed=1)
    y, _ = blk(x)
    torch.testing.assert_close(y, x + blk.g(x), rtol=0, atol=1e-14)

    class Half(nn.Module):
        def forward(self, w):
            return w / 2

    parametrize.register_parametrization(blk.g[0], "weight", Half())  # a second one: no class change
    y, _ = blk(x)
    torch.testing.assert_close(y, x + blk.g(x), rtol=0, atol=1e-14)
    parametrize.remove_parametrizations(blk.g[0], "weight")
    with torch.no_grad():
        blk.g[0].weight.mul_(0.5 / torch.linalg.matrix_norm(blk.g[0].weight, 2))
    y, _ = blk(x)
    torch.testing.assert_close(y, x + blk.g(x), rtol=0, atol=1e-14)


def test_inverse_carries_the_implicit_gradient():
    """inverse() ran under no_grad: x = f⁻¹(y) had no gradient to y or to g's parameters, silently. Now ∂L/∂y =
    (I + J)⁻ᵀ ∂L/∂x and ∂L/∂θ = −(∂g/∂θ)ᵀ a, checked against autograd through a fixed point unrolled to convergence."""
    blk = InvertibleResBlock(_dense_g(), inverse_atol=1e-13)
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, dtype=torch.float64)
    x = blk.inverse(y)
    torch.testing.assert_close(x + blk.g(x), y, rtol=0, atol=1e-11)
    params = [p for p in blk.g.parameters()]
    got = torch.autograd.grad((x * weight).sum(), [y, *params])
    unrolled = y
    for _ in range(200):
        unrolled = y - blk.g(unrolled)
    want = torch.autograd.grad((unrolled * weight).sum(), [y, *params])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        assert not blk.inverse(y).requires_grad


def test_inverse_refuses_double_backward():
    """The implicit gradient is solved without a graph of its own: with create_graph=True the Hessian-vector product
    through inverse() was silently wrong (first order right); now that backward raises."""
    blk = InvertibleResBlock(_dense_g(), inverse_atol=1e-13).eval()
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x = blk.inverse(y)
    with pytest.raises(RuntimeError, match=r"double backward.*inverse"):
        torch.autograd.grad((x**3).sum(), y, create_graph=True)
    (first,) = torch.autograd.grad((blk.inverse(y) ** 3).sum(), y)  # first order as before
    assert torch.isfinite(first).all()


def test_inverse_gradient_passes_gradcheck_with_undefined_gradients():
    """The implicit gradient's hook got None for an undefined incoming gradient and solved with it (autograd.grad
    raised); now it leaves it undefined. gradcheck (float64, in eval mode: the spectral norms fixed) with its
    undefined-gradient check."""
    blk = InvertibleResBlock(_dense_g(), logdet="exact", inverse_atol=1e-13).eval()
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blk.inverse, (y,), check_undefined_grad=True)


def test_inverse_freezes_torchs_own_spectral_norm():
    """In training mode every g evaluation advanced torch's spectral_norm power iteration, so the map moved under
    the fixed point (the inverse then missed x by ~1e-2)."""
    torch.manual_seed(0)
    g = nn.Sequential(torch_spectral_norm(nn.Linear(3, 8)), LipSwish(), torch_spectral_norm(nn.Linear(8, 3))).double()
    with torch.no_grad():
        for layer in (g[0], g[2]):
            layer.parametrizations.weight.original.mul_(0.5)
    blk = InvertibleResBlock(g, logdet="exact", inverse_atol=1e-12).train()
    u = g[0].parametrizations.weight[0]._u.clone()
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        y = x + g(x)
        u = g[0].parametrizations.weight[0]._u.clone()
        back = blk.inverse(y)
    assert torch.equal(u, g[0].parametrizations.weight[0]._u)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_anderson_inverse_in_half_precision(dtype):
    """torch.linalg.solve has no half LU on the CPU: the Anderson weights are solved in float32."""
    blk = InvertibleResBlock(_dense_g(dtype=dtype), inverse_method="anderson", inverse_atol=1e-3)
    x = torch.randn(4, 3, dtype=dtype)
    with torch.no_grad():
        back = blk.inverse(x + blk.g(x))
    assert torch.isfinite(back).all() and float((back - x).abs().max()) < 0.1


@pytest.mark.parametrize("logdet", ["series", "roulette", "exact", "none"])
def test_empty_batch(logdet):
    blk = InvertibleResBlock(_dense_g(), logdet=logdet)
    for x in (torch.randn(0, 3, dtype=torch.float64), torch.randn(0, 5, 3, dtype=torch.float64)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y, logdet_value = blk(x)
        assert y.shape == x.shape and logdet_value.shape == (0,)


def test_torch_func_forward_mode_and_generic_g():
    """The Neumann gradient's value/surrogate node has a jvp (torch.func.jacfwd and hessian failed on 'must implement
    the jvp function'): the value's tangent is the surrogate's. A generic g's series log-det (autograd.grad inside)
    raises a clear NotImplementedError under torch.func (torch's requires_grad_ message before); logdet='exact'
    runs there."""
    from torch.func import functional_call, grad, jvp

    from kexue_fast.flows.logdet import value_with_gradient_of

    v, s, ts = torch.randn(3, 4, dtype=torch.float64).unbind(0)
    primal, tangent = jvp(value_with_gradient_of, (v, s), (torch.zeros_like(v), ts))
    assert torch.equal(primal, v) and torch.equal(tangent, ts)

    class G(nn.Module):  # a branch that is no plain chain
        def __init__(self):
            super().__init__()
            self.lin = spectral_norm(nn.Linear(3, 3), coeff=0.7)

        def forward(self, a):
            return torch.tanh(self.lin(a))

    x = torch.randn(2, 3)
    for logdet, ok in (("series", False), ("exact", True)):
        blk = InvertibleResBlock(G(), logdet=logdet, n_terms=3).eval()
        params = {k: p.detach() for k, p in blk.named_parameters()}
        run = grad(lambda p: functional_call(blk, p, (x,))[1].sum())  # noqa: B023
        if ok:
            assert set(run(params)) == set(params)
        else:
            with pytest.raises(NotImplementedError, match=r"torch\.func transforms"):
                run(params)


def test_torch_func_grad_through_the_dense_chain(monkeypatch):
    """The closed-form Functions have no setup_context: under torch.func the block takes torch's graph instead."""
    from torch.func import functional_call, grad

    monkeypatch.setenv("KEXUE_FAST_BACKEND", "torch")
    blk = InvertibleResBlock(_dense_g())
    params = {k: v.detach() for k, v in blk.named_parameters()}
    x = torch.randn(5, 3, dtype=torch.float64)

    def loss(p):
        torch.manual_seed(3)  # the same probes in both calls
        y, logdet = functional_call(blk, p, (x,))
        return (0.5 * y.pow(2).sum(1) - logdet).mean()

    got = grad(loss)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    want = torch.autograd.grad(loss(leaves), list(leaves.values()))
    for (k, a), b in zip(got.items(), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize("kind, hooked, kw, create_graph, backend", [
    ("dense", True, dict(neumann_grad=True, memory_efficient=True), False, "torch"),  # _NeumannLogdet
    ("dense", False, dict(neumann_grad=True), True, "torch"),  # the closed form's graph backward
    ("dense", False, dict(neumann_grad=True), True, "cpp"),
    ("dense", False, dict(neumann_grad=False), True, "cpp"),
    ("conv", False, dict(neumann_grad=True), True, "torch"),
])  # fmt: skip
def test_functional_call_gradients_follow_the_swapped_parameters(kind, hooked, kw, create_graph, backend, monkeypatch):
    """torch.func.functional_call with plain autograd (MAML's pattern): the memory-efficient Neumann backward
    recomputed g on the module's own parameters (every swapped parameter's gradient None), and the closed forms'
    create_graph backward read LipSwish's β from the module (its raw β's gradient None, the others off). Gradients
    and a Hessian-vector product equal a block holding the swapped values itself."""
    from torch.func import functional_call

    monkeypatch.setenv("KEXUE_FAST_BACKEND", backend)

    def block():
        torch.manual_seed(0)
        if kind == "dense":
            g = nn.Sequential(spectral_norm(nn.Linear(3, 4), coeff=0.7), LipSwish(),
                              spectral_norm(nn.Linear(4, 3), coeff=0.7))  # fmt: skip
        else:
            g = nn.Sequential(spectral_norm(nn.Conv2d(2, 3, 3, padding=1), coeff=0.7, input_shape=(2, 3, 3)),
                              LipSwish(), spectral_norm(nn.Conv2d(3, 2, 3, padding=1), coeff=0.7,
                                                        input_shape=(3, 3, 3)))  # fmt: skip
        if hooked:
            g.register_forward_hook(lambda m, i, o: None)
        return InvertibleResBlock(g.double(), logdet="series", n_terms=3, **kw).eval()

    x = torch.randn((2, 3) if kind == "dense" else (1, 2, 3, 3), dtype=torch.float64)
    swapped_block, own_block = block(), block()
    gen = torch.Generator().manual_seed(1)
    swapped = {n: (p.detach() + 0.05 * torch.randn(p.shape, dtype=p.dtype, generator=gen)).requires_grad_()
               for n, p in swapped_block.named_parameters()}  # fmt: skip
    with torch.no_grad():
        for n, p in own_block.named_parameters():
            p.copy_(swapped[n])
    results = []
    for run, params in ((lambda: functional_call(swapped_block, swapped, (x,)), list(swapped.values())),
                        (lambda: own_block(x), list(own_block.parameters()))):  # fmt: skip
        torch.manual_seed(123)
        _, logdet = run()
        grads = torch.autograd.grad(logdet.sum(), params, create_graph=create_graph, allow_unused=True)
        if create_graph:
            hvp = torch.autograd.grad(sum((g * g).sum() for g in grads if g is not None), params, allow_unused=True)
            grads = (*grads, *hvp)
        results.append([None if g is None else g.detach() for g in grads])
    assert sum(g is None for g in results[1]) <= 2 * (1 + create_graph)  # the last bias: no part in the log-det
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_poisson_tail_for_small_p():
    """λ**i / i! overflowed Python floats for p = 0.005 (λ = 200) past i = 170."""
    from kexue_fast.flows.logdet import tail_survival

    assert tail_survival("poisson", 0.005, 172) == pytest.approx(0.98001760173870, rel=1e-10)
    assert tail_survival("poisson", 0.5, 3) == pytest.approx(1 - math.exp(-2) * (1 + 2 + 2), rel=1e-12)
    tail = sum(math.exp(-2 + i * math.log(2) - math.lgamma(i + 1)) for i in range(60, 120))  # no 1 − cdf: 0 there
    assert tail_survival("poisson", 0.5, 60) == pytest.approx(tail, rel=1e-9)


def test_numpy_float_coefficients():
    import numpy as np

    ResidualFlow.dense(3, n_blocks=1, coeff=np.float32(0.9))
    with pytest.raises(ValueError, match="coeff"):
        ResidualFlow.dense(3, n_blocks=1, coeff=True)


def test_coeff_layers_start_within_their_bound():
    """torch's 15 warm-up iterations leave σ̂ short of ‖W‖₂: a 64 × 64 Linear with coeff 0.97 started at
    ‖W‖₂ = 1.022 (an i-ResNet block with Lip(g) ≥ 1 at init, unseen without lipschitz_report). coeff layers now
    warm up until σ̂ settles. coeff=None keeps torch's 15 (identical buffers)."""
    worst = 0.0
    for seed in range(12):
        torch.manual_seed(seed)
        layer = spectral_norm(nn.Linear(64, 64).double(), coeff=0.97, n_power_iterations=0)
        worst = max(worst, float(torch.linalg.matrix_norm(layer.weight.detach(), 2)))
    assert worst <= 0.97 * (1 + 1e-3)
    torch.manual_seed(0)
    ours = spectral_norm(nn.Linear(16, 12))
    torch.manual_seed(0)
    theirs = torch_spectral_norm(nn.Linear(16, 12))
    assert torch.equal(ours.parametrizations.weight[0]._u, theirs.parametrizations.weight[0]._u)


def test_blocks_name_wrong_widths_and_actnorm_needs_two_values():
    """A dense block on [B, 5] for g of width 4 raised "x has the wrong shape" (C++) or "mat1 and mat2 shapes cannot
    be multiplied"; a conv block torch's channel error. ActNorm's first batch of 1 set s = −log(eps) = 13.8 for every
    channel (log-probabilities of −8e12 after); a constant channel now keeps s = 0. Under vmap the CPU NaN check read
    a value on the host and failed every call."""
    g = nn.Sequential(spectral_norm(nn.Linear(4, 8), coeff=0.9), LipSwish(), spectral_norm(nn.Linear(8, 4), coeff=0.9))
    block = InvertibleResBlock(g)
    for bad in (torch.randn(3, 5), torch.randn(3, 2, 5)):
        with pytest.raises(ValueError, match=r"x must be \[\.\.\., 4\] \(g's first Linear takes 4 features\)"):
            block(bad)
    with pytest.raises(ValueError, match=r"y must be \[\.\.\., 4\]"):
        block.inverse(torch.randn(3, 5))
    conv = ResidualFlow.conv((1, 4, 4), n_scales=1, n_blocks=1, hidden_channels=2).layers[1]
    with pytest.raises(ValueError, match=r"x must be \[B, 1, \.\.\.\] \(g's first convolution takes 1 channels\)"):
        conv(torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="at least two values per channel"):
        ActNorm(4)(torch.randn(1, 4))
    norm = ActNorm(3)
    x = torch.randn(8, 3)
    x[:, 1] = 2.5
    y, _ = norm(x)
    assert float(norm.log_scale[1]) == 0.0 and torch.allclose(y[:, 1], torch.zeros(8))
    dense = InvertibleResBlock(g.double(), logdet="series")
    out = torch.vmap(lambda xi: dense(xi[None])[1], randomness="different")(torch.randn(5, 4, dtype=torch.float64))
    assert out.shape == (5, 1)


def test_torch_func_grad_through_training_spectral_norms_and_exact_logdet():
    """torch.func.grad of a training forward through coeff spectral norms (matrix and conv operator mode, and the
    blocks built of them) raised "mutate a captured Tensor" (their u, v were written by copy_; now by torch.where(out=),
    as torch's own spectral norm writes them by F.normalize(out=)); logdet="exact" raised inside any torch.func
    transform (requires_grad_ and autograd.grad there; now vmap(jacrev(g))). Gradients equal eager autograd's."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    for module, inp in (
        (spectral_norm(nn.Linear(4, 6), coeff=0.9), x),
        (spectral_norm(nn.Conv2d(2, 3, 3, padding=1), input_shape=(2, 5, 5), coeff=0.9), torch.randn(2, 2, 5, 5)),
    ):
        module = module.double()
        inp = inp.double()
        u = module.parametrizations.weight[0]._u.clone()
        params = {k: v.detach() for k, v in module.named_parameters()}
        grad(lambda p: functional_call(module, p, (inp,)).sum())(params)  # noqa: B023
        assert not torch.equal(module.parametrizations.weight[0]._u, u)  # training mode: the iteration advanced
    for method in ("series", "exact"):
        torch.manual_seed(1)
        g = nn.Sequential(spectral_norm(nn.Linear(4, 16), coeff=0.9), LipSwish(),
                          spectral_norm(nn.Linear(16, 4), coeff=0.9)).double()  # fmt: skip
        block = InvertibleResBlock(g, logdet=method, n_terms=3).eval()
        params = {k: v.detach() for k, v in block.named_parameters()}

        def loss(p, block=block):
            y, logdet = functional_call(block, p, (x,))
            return y.sum() + logdet.sum()

        functional = grad(loss)(params)
        if method == "exact":
            y, logdet = block(x)
            (y.sum() + logdet.sum()).backward()
            for name, p in block.named_parameters():
                torch.testing.assert_close(functional[name], p.grad, rtol=1e-12, atol=1e-14)


def test_spectral_norm_class_actnorm_and_flow_arguments_are_checked():
    """The exported SpectralNorm took coeff=-1 (no bound at all: an InvertibleResBlock of it inverted to NaN),
    n_power_iterations=-1, eps=0 and an out-of-range dim (a permute error); ActNorm took eps=-1 (NaN log-scales at
    init) and num_features=0; ResidualFlow took layers that return no log-det (a Linear's [2, 2] output unpacked as
    (y, logdet)), a Squeeze on 1-D or odd-sized inputs and an ActNorm of the wrong width, failing in forward if at
    all. Reprs name the hyperparameters."""
    from kexue_fast.nn.spectral_norm import SpectralNorm

    w = torch.randn(4, 3)
    for kwargs, error, match in (({"coeff": -1.0}, ValueError, "coeff"), ({"n_power_iterations": -1}, ValueError,
                                 "n_power_iterations"), ({"eps": 0.0}, ValueError, "eps"), ({"dim": 7}, ValueError,
                                 "dim"), ({"coeff": "0.9"}, TypeError, "coeff")):  # fmt: skip
        with pytest.raises(error, match=match):
            SpectralNorm(w, **kwargs)
    for args, match in (((3, -1.0), "eps"), ((3, 0.0), "eps"), ((0,), "num_features"), ((2.5,), "num_features")):
        with pytest.raises(ValueError, match=match):
            ActNorm(*args)
    with pytest.raises(ValueError, match="input_shape"):
        ResidualFlow([ActNorm(3)], (-1,))
    with pytest.raises(ValueError, match="Squeeze"):
        ResidualFlow([Squeeze()], (4,))
    with pytest.raises(ValueError, match="Squeeze"):
        ResidualFlow([Squeeze()], (1, 5, 5))
    with pytest.raises(ValueError, match="ActNorm of 3 channels"):
        ResidualFlow([ActNorm(3)], (4,))
    with pytest.raises(TypeError, match="inverse"):
        ResidualFlow([nn.Linear(2, 2)], (2,))

    class NoLogdet(nn.Module):
        def forward(self, x):
            return x

        def inverse(self, y):
            return y

    with pytest.raises(TypeError, match=r"must return \(y, logdet"):
        ResidualFlow([NoLogdet()], (2,))(torch.randn(2, 2))
    assert repr(ActNorm(64, eps=1e-3)) == "ActNorm(64, eps=0.001)"
    assert repr(LipSwish(beta=4.0)) == "LipSwish(beta=4)"
    assert "input_shape=(3,)" in repr(ResidualFlow([ActNorm(3)], (3,)))


def test_initialized_actnorm_compiles_fullgraph_in_training():
    """A training forward read the `initialized` buffer on the host each call: a host sync on CUDA, and a
    data-dependent branch torch.compile(fullgraph=True) refused, so the default ResidualFlow did not compile so.
    The flag now lives on the host too, kept in step by load_state_dict."""
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    norm = ActNorm(4)
    norm(x)
    y, _ = torch.compile(norm, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(y, norm(x)[0])
    fresh = ActNorm(4)
    fresh.load_state_dict(norm.state_dict())  # initialized: the next training batch must not re-initialize it
    fresh(torch.randn(8, 4) * 5 + 3)
    torch.testing.assert_close(fresh.bias, norm.bias)
    blank = ActNorm(4)
    norm.load_state_dict(blank.state_dict())  # uninitialized again: the next training batch initializes it
    norm(x * 2)
    assert not torch.allclose(norm.log_scale, blank.log_scale)
