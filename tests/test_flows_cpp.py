"""The C++ block (kexue_fast.flows.chain_cpp, csrc/flows/dense_chain.cpp) against the torch paths it replaces on the
CPU: torch's closed-form Neumann gradient (kexue_fast.flows.chain_neumann) and torch's graph of the series."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import kexue_fast._core
from kexue_fast.flows import logdet as L
from kexue_fast.nn import InvertibleResBlock, LipSwish, spectral_norm

D64 = torch.float64


def _chain(dim, hidden, acts, dtype, norm=True, bias=True, seed=0):
    """Linear (act Linear)* with raw weights scaled ×3 so that the spectral norms' δ = max(1, σ̂/c) exceed 1."""
    torch.manual_seed(seed)
    dims = [dim, *hidden, dim]
    layers = []
    for i in range(len(dims) - 1):
        lin = nn.Linear(dims[i], dims[i + 1], bias=bias)
        with torch.no_grad():
            lin.weight.mul_(3)
        layers.append(spectral_norm(lin, coeff=0.9, n_power_iterations=1) if norm else lin)
        if i < len(dims) - 2:
            layers.append(acts[i]())
    return nn.Sequential(*layers).to(dtype)


def _run(block, x, backend, monkeypatch, seed=5):
    """(y, log-det, gradients of a per-sample weighted loss on both w.r.t. x and every parameter, the state after) on
    one backend, on a copy of the block (the spectral norms' power iteration advances in place)."""
    monkeypatch.setenv("KEXUE_FAST_BACKEND", backend)
    block = copy.deepcopy(block)
    x = x.clone().requires_grad_(True)
    params = list(block.parameters())
    for p in params:
        p.grad = None
    torch.manual_seed(seed)  # the same probes, then the same roulette lengths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # roulette variance notice
        y, value = block(x)
    wy = torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)
    wv = torch.linspace(3, -2, value.numel(), dtype=y.dtype)
    ((y * wy).sum() + (value * wv).sum()).backward()
    state = [t.clone() for t in block.state_dict().values()]
    return [y.detach(), value.detach(), x.grad] + [p.grad for p in params] + state


def _assert_close(got, want, rtol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        if a is not None:
            scale = max(float(b.abs().max()), 1e-30)
            assert float((a - b).abs().max()) <= rtol * scale, (i, float((a - b).abs().max()), scale)


def test_cpp_block_lipswish_of_large_beta(monkeypatch):
    """β > 20: softplus is the identity in float64 there, ∂β/∂raw = 1, the C++ core's own branch (every other test
    runs the default β)."""
    g = _chain(5, [12], [lambda: LipSwish(beta=25.0)], torch.float64)
    block = InvertibleResBlock(g, logdet="series", n_terms=4, n_probes=1, neumann_grad=True)
    x = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _assert_close(_run(block, x, "cpp", monkeypatch), _run(block, x, "torch", monkeypatch), 1e-12)


@pytest.mark.parametrize("acts, hidden", [([LipSwish], [17]), ([nn.ELU, nn.Tanh], [9, 16]),
                                          ([lambda: nn.LeakyReLU(0.2)], [33]), ([], [])])  # fmt: skip
@pytest.mark.parametrize("batch, dim", [(1, 1), (7, 2), (65, 17), (130, 33)])
@pytest.mark.parametrize("logdet, n_probes, neumann", [("series", 1, True), ("roulette", 3, True),
                                                       ("series", 2, False), ("roulette", 2, False)])  # fmt: skip
def test_cpp_block_equals_torch_paths(acts, hidden, batch, dim, logdet, n_probes, neumann, monkeypatch):
    """float64: y, log-det and every gradient of the C++ block equal torch's (closed form or graph) to 1e-12."""
    g = _chain(dim, hidden, acts, D64, bias=batch != 7)
    block = InvertibleResBlock(g, logdet=logdet, n_terms=4, n_probes=n_probes, neumann_grad=neumann)
    x = torch.randn(batch, dim, dtype=D64)
    got = _run(block, x, "cpp", monkeypatch)
    want = _run(block, x, "torch", monkeypatch)
    _assert_close(got, want, 1e-12)


@pytest.mark.parametrize("neumann", [True, False])
def test_cpp_block_float32_error_is_within_torch_own(neumann, monkeypatch):
    """float32 against the float64 truth: the C++ block's error at most 2× the torch path's own (same float32
    inputs), on the flows benchmark's shape."""
    g = _chain(32, [128], [LipSwish], D64)
    x = torch.randn(256, 32, dtype=D64)
    block64 = InvertibleResBlock(g, n_terms=5, neumann_grad=neumann)
    truth = _run(block64, x, "torch", monkeypatch)
    block32 = InvertibleResBlock(_chain(32, [128], [LipSwish], torch.float32), n_terms=5, neumann_grad=neumann)
    block32.load_state_dict({k: v.float() for k, v in block64.state_dict().items()})
    got = _run(block32, x.float(), "cpp", monkeypatch)
    torch_own = _run(block32, x.float(), "torch", monkeypatch)
    for c, t, ref in zip(got, torch_own, truth):
        err_c = float((c.double() - ref).norm() / ref.norm())
        err_t = float((t.double() - ref).norm() / ref.norm())
        assert err_c <= 2 * err_t + 1e-7, (err_c, err_t)


def test_auto_leaves_large_steps_on_several_threads_to_torch(monkeypatch):
    """With several torch threads `auto` takes the (single-threaded) C++ block only for small steps."""
    from kexue_fast.flows import chain_cpp

    calls = []
    forward = kexue_fast._core.dense_chain_forward
    monkeypatch.setattr(kexue_fast._core, "dense_chain_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    monkeypatch.delenv("KEXUE_FAST_BACKEND", raising=False)
    block = InvertibleResBlock(_chain(4, [16], [LipSwish], torch.float32))
    x = torch.randn(64, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(chain_cpp, "MULTITHREAD_WORK", 2 * 64 * 128)  # this step is exactly at the bound
        block(x)
        assert len(calls) == 1
        block(torch.randn(65, 4))  # one row more: torch
        assert len(calls) == 1
        torch.set_num_threads(1)  # one torch thread: always the C++ block
        block(torch.randn(65, 4))
        assert len(calls) == 2
    finally:
        torch.set_num_threads(before)


def test_cpp_block_is_what_auto_runs_on_cpu(monkeypatch):
    calls = []
    forward = kexue_fast._core.dense_chain_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(kexue_fast._core, "dense_chain_forward", counting)
    monkeypatch.delenv("KEXUE_FAST_BACKEND", raising=False)
    block = InvertibleResBlock(_chain(3, [8], [LipSwish], torch.float32))
    block(torch.randn(4, 3))
    assert len(calls) == 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: torch's path, which follows it
        block(torch.randn(4, 3))
    assert len(calls) == 1


@pytest.mark.parametrize("threads", [2, 3])
def test_cpp_block_over_threads_is_deterministic_and_agrees(threads, monkeypatch):
    """Rows split over threads (row blocks of 64): the same result on every run for a thread count, and within
    rounding of the single-thread run."""
    from kexue_fast.flows import chain_cpp

    g = _chain(5, [24], [LipSwish], D64)
    block = InvertibleResBlock(g, n_terms=6, n_probes=2)
    x = torch.randn(300, 5, dtype=D64)
    monkeypatch.setattr(chain_cpp, "THREADS", 1)
    single = _run(block, x, "cpp", monkeypatch)
    monkeypatch.setattr(chain_cpp, "THREADS", threads)
    first, second = _run(block, x, "cpp", monkeypatch), _run(block, x, "cpp", monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    _assert_close(first, single, 1e-12)


@pytest.mark.parametrize("acts, hidden", [([LipSwish], [6]), ([nn.ELU, LipSwish], [5, 4])])
def test_cpp_function_gradcheck_through_the_series(acts, hidden):
    """Through the series (neumann_grad=False) the gradient is the estimate's own: gradcheck of the C++ Function in
    float64 with the probes fixed, w.r.t. x, the raw weights (through the folded spectral norms: δ > 1), the biases
    and LipSwish's raw β; and gradgradcheck (backward(create_graph=True) takes torch's graph)."""
    from kexue_fast.flows.chain_cpp import _ChainCpp
    from kexue_fast.flows.chain_neumann import _chain_inputs

    g = _chain(3, hidden, acts, D64)
    chain = InvertibleResBlock(g, n_terms=3, neumann_grad=False)._chain
    probes = [torch.randn(4, 3, dtype=D64), torch.randn(4, 3, dtype=D64)]
    plans = [L.truncated_plan(3)] * 2
    spec, params, stacked = _chain_inputs(chain, probes)
    n = len(spec.linears)
    diff = [p.detach().clone().requires_grad_(True) if p is not None and (i < 2 * n or i >= 4 * n) else p
            for i, p in enumerate(params)]  # fmt: skip
    free = [i for i, p in enumerate(diff) if p is not None and p.requires_grad]
    x = torch.randn(4, 3, dtype=D64, requires_grad=True)

    def f(x, *ps):
        full = list(diff)
        for i, p in zip(free, ps):
            full[i] = p
        return _ChainCpp.apply(x, stacked, spec, plans, True, *full)

    inputs = (x, *[diff[i] for i in free])
    assert torch.autograd.gradcheck(f, inputs, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(f, inputs, atol=1e-7, rtol=1e-5)


def test_cpp_block_bad_inputs(monkeypatch):
    block = InvertibleResBlock(_chain(3, [8], [LipSwish], torch.float32))
    x = torch.randn(4, 3)
    x[2, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        block(x)
    x[2, 1] = math.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        block(x)
    with pytest.raises(TypeError, match="one dtype"):
        block(torch.randn(4, 3, dtype=D64))
    monkeypatch.setenv("KEXUE_FAST_BACKEND", "cpp")
    with pytest.raises(NotImplementedError, match="cpp"):
        block(torch.randn(4, 3, dtype=torch.float16))
    conv = InvertibleResBlock(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), LipSwish(), nn.Conv2d(4, 2, 3, padding=1)))
    with pytest.raises(NotImplementedError, match="not a dense chain"):
        conv(torch.randn(2, 2, 5, 5))
    with pytest.raises(NotImplementedError, match="B, D"):
        block(torch.randn(2, 4, 3))
    with pytest.raises(Exception, match=r"cannot run InvertibleResBlock under torch\.compile"):  # (dynamo wraps it)
        torch.compile(block, fullgraph=True, backend="aot_eager")(torch.randn(4, 3))
    monkeypatch.setenv("KEXUE_FAST_BACKEND", "auto")  # half precision under auto: the torch path, no warning
    import logging

    class _Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = _Records()
    logging.getLogger("kexue_fast").addHandler(records)
    try:
        y, _ = InvertibleResBlock(_chain(3, [8], [LipSwish], torch.bfloat16))(torch.randn(4, 3, dtype=torch.bfloat16))
    finally:
        logging.getLogger("kexue_fast").removeHandler(records)
    assert y.dtype == torch.bfloat16 and not records.messages


def test_cpp_block_odd_layouts_and_empty_batch(monkeypatch):
    """A transposed (non-contiguous) x and bias, an empty batch, inference mode."""
    g = _chain(4, [10], [nn.Tanh], D64)
    with torch.no_grad():
        g[0].bias = nn.Parameter(torch.randn(20, dtype=D64)[::2])  # stride 2
    block = InvertibleResBlock(g, n_terms=3)
    xt = torch.randn(4, 9, dtype=D64).T
    assert not xt.is_contiguous()
    got = _run(block, xt, "cpp", monkeypatch)
    want = _run(block, xt, "torch", monkeypatch)
    _assert_close(got, want, 1e-12)
    monkeypatch.setenv("KEXUE_FAST_BACKEND", "cpp")
    y, value = block(torch.randn(0, 4, dtype=D64))
    assert y.shape == (0, 4) and value.shape == (0,)
    x = torch.randn(5, 4, dtype=D64)
    block.eval()  # no power-iteration step between the two calls
    torch.manual_seed(1)
    with torch.inference_mode():
        y_inf, v_inf = block(x)
    torch.manual_seed(1)
    with torch.no_grad():
        y_ng, v_ng = block(x)
    assert torch.equal(y_inf, y_ng) and torch.equal(v_inf, v_ng)


@pytest.mark.parametrize("neumann", [True, False])
def test_empty_series_plans_give_zero_log_det_on_both_backends(neumann, monkeypatch):
    """A roulette plan with no terms (Poisson length 0, n_exact_terms=0) for every probe: log-det 0 and y's gradients
    only, on the C++ block (through the series the plans are padded to one zero term) and the torch closed form."""
    from kexue_fast.flows.chain_cpp import chain_logdet_cpp
    from kexue_fast.flows.chain_neumann import chain_neumann_logdet

    g = _chain(3, [7], [LipSwish], D64)
    chain = InvertibleResBlock(g, n_terms=2)._chain
    plans = [L.SeriesPlan(())] * 2
    for run in (chain_logdet_cpp, chain_neumann_logdet):
        x = torch.randn(5, 3, dtype=D64, requires_grad=True)
        probes = [torch.randn(5, 3, dtype=D64) for _ in range(2)]
        y, value = run(chain, x, plans, probes, not neumann)
        assert torch.equal(value, torch.zeros(5, dtype=D64))
        (y.sum() + value.sum()).backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_strided_spectral_norm_vectors(monkeypatch):
    """u, v buffers with strides (a state_dict loaded with assign=True) raised 'layers[0] u must be C-contiguous'
    from the core's binding; they are read through contiguous copies: the torch backend's outputs and buffers."""

    def make():
        torch.manual_seed(1)
        g = nn.Sequential(
            spectral_norm(nn.Linear(4, 8), coeff=0.9), LipSwish(), spectral_norm(nn.Linear(8, 4), coeff=0.9)
        )
        return InvertibleResBlock(g.double(), logdet="series", n_terms=3)

    state = {
        k: torch.stack([v, v], -1)[..., 0] if k.endswith(("_u", "_v")) else v for k, v in make().state_dict().items()
    }
    x = torch.randn(5, 4, dtype=D64)
    runs = []
    for backend in ("cpp", "torch"):
        monkeypatch.setenv("KEXUE_FAST_BACKEND", backend)
        block = make()
        block.load_state_dict(state, assign=True)
        assert not block.g[0].parametrizations.weight[0]._u.is_contiguous()
        torch.manual_seed(3)
        y, value = block(x)
        runs.append([y, value] + [b for k, b in block.state_dict().items() if k.endswith(("_u", "_v"))])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("neumann", [True, False])
def test_double_backward_with_non_contiguous_x_and_weight(neumann, monkeypatch):
    """backward(create_graph=True) differentiates torch's graph of what the Function saved: a transposed x and a
    weight Parameter stored transposed must be the tensors it differentiates by (equal to the torch path, 1e-12)."""
    results = {}
    for backend in ("cpp", "torch"):
        monkeypatch.setenv("KEXUE_FAST_BACKEND", backend)
        g = _chain(4, [6], [nn.ELU], D64, norm=False)
        with torch.no_grad():
            g[0].weight = nn.Parameter(g[0].weight.detach().T.contiguous().T)  # [6, 4] with strides (1, 6)
        assert not g[0].weight.is_contiguous()
        block = InvertibleResBlock(g, n_terms=3, neumann_grad=neumann)
        x = torch.randn(4, 5, dtype=D64).T.requires_grad_(True)
        torch.manual_seed(3)
        y, value = block(x)
        first = torch.autograd.grad((y * y).sum() + value.sum(), [x, *g.parameters()], create_graph=True)
        second = torch.autograd.grad(sum(t.pow(2).sum() for t in first), list(g.parameters()))
        results[backend] = [t.detach() for t in first + second]
    _assert_close(results["cpp"], results["torch"], 1e-12)


def test_float32_bias_gradients_do_not_degrade_with_the_batch(monkeypatch):
    """The C++ backward sums the weight and bias gradients of each row block in double, so their float32 error
    against the float64 truth stays within 2× torch's own as B grows."""
    g = nn.Sequential(nn.Linear(3, 300), LipSwish(), nn.Linear(300, 3)).double()
    b64 = InvertibleResBlock(g, n_terms=3)
    b32 = copy.deepcopy(b64).float()
    torch.manual_seed(1)
    x = torch.randn(8192, 3, dtype=D64) + 0.5
    truth = _run(b64, x, "torch", monkeypatch)
    got, own = _run(b32, x.float(), "cpp", monkeypatch), _run(b32, x.float(), "torch", monkeypatch)
    for i in range(3, 7):  # the parameters' gradients
        err = float((got[i].double() - truth[i]).norm() / truth[i].norm())
        err_torch = float((own[i].double() - truth[i]).norm() / truth[i].norm())
        assert err <= 2 * err_torch + 1e-7, (i, err, err_torch)
