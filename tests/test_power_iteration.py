import logging

import pytest
import torch
from testing import backends, exact_norms, matrix_with_gap, rel_err

import kexue_fast
from kexue_fast import _dispatch
from kexue_fast.spectral import reference

SHAPES = [(1, 1), (7, 3), (3, 7), (63, 65), (127, 129)]
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", backends())
def test_converges_to_matrix_norm(backend, shape, dtype):
    w = matrix_with_gap(*shape, dtype=dtype)
    sigma, u, v = kexue_fast.power_iteration(w, n_iters=60, backend=backend)
    assert sigma.shape == () and u.shape == (shape[0],) and v.shape == (shape[1],)
    assert rel_err(sigma, torch.linalg.matrix_norm(w.double(), ord=2)) <= TOL[dtype]
    assert abs(float(torch.linalg.vector_norm(u.double())) - 1) < 1e-5
    assert abs(float(torch.linalg.vector_norm(v.double())) - 1) < 1e-5
    assert sigma.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_list_of_mixed_shapes_all_backends_agree(dtype):
    weights = [matrix_with_gap(m, n, dtype=dtype) for m, n in SHAPES]
    exact = exact_norms(weights)
    outputs = {}
    for backend in backends(dtype=dtype):
        gen = torch.Generator().manual_seed(7)
        sigma, us, vs = kexue_fast.power_iteration(weights, n_iters=60, backend=backend, generator=gen)
        assert sigma.shape == (len(weights),) and [u.shape[0] for u in us] == [m for m, _ in SHAPES]
        assert rel_err(sigma, exact) <= TOL[dtype]
        outputs[backend] = (sigma, us, vs)
    # From the same start the backends take the same steps: they agree to rounding after a few iterations too.
    few = {}
    for backend in backends(dtype=dtype):
        gen = torch.Generator().manual_seed(3)
        few[backend] = kexue_fast.power_iteration(weights, n_iters=3, backend=backend, generator=gen)
    ref_sigma, ref_u, ref_v = few["torch"]
    for backend, (sigma, us, vs) in few.items():
        assert rel_err(sigma, ref_sigma) <= 10 * TOL[dtype] * 1e-2, backend
        for a, b in zip(us + vs, ref_u + ref_v):
            assert rel_err(a, b) <= TOL[dtype] * 1e-1, backend


@pytest.mark.parametrize("backend", backends())
def test_batched_tensor_and_warm_start(backend):
    w = torch.stack([matrix_with_gap(9, 5, seed=s) for s in range(4)])
    v0 = torch.randn(4, 5, dtype=torch.float64)
    sigma6, u6, v6 = kexue_fast.power_iteration(w, n_iters=6, v=v0, backend=backend)
    assert sigma6.shape == (4,) and u6.shape == (4, 9) and v6.shape == (4, 5)
    _, _, v3 = kexue_fast.power_iteration(w, n_iters=3, v=v0, backend=backend)
    sigma33, u33, v33 = kexue_fast.power_iteration(w, n_iters=3, v=v3, backend=backend)
    assert rel_err(sigma33, sigma6) < 1e-12 and rel_err(v33, v6) < 1e-12 and rel_err(u33, u6) < 1e-12
    ref_sigma, ref_u, ref_v = reference.power_iteration_batched(w, v0, 6)
    assert rel_err(sigma6, ref_sigma) < 1e-12 and rel_err(u6, ref_u) < 1e-12 and rel_err(v6, ref_v) < 1e-12


def test_u_only_warm_start_starts_from_wt_u():
    w = matrix_with_gap(8, 6)
    u0 = torch.randn(8, dtype=torch.float64)
    a = kexue_fast.power_iteration(w, n_iters=2, u=u0)
    b = kexue_fast.power_iteration(w, n_iters=2, v=w.T @ u0)
    assert rel_err(a[0], b[0]) < 1e-14 and rel_err(a[2], b[2]) < 1e-14


@pytest.mark.parametrize("backend", backends())
def test_tol_stops_converged(backend):
    weights = [matrix_with_gap(20, 30, seed=1), matrix_with_gap(31, 5, seed=2)]
    sigma, _, _ = kexue_fast.power_iteration(weights, n_iters=1000, tol=1e-13, backend=backend)
    assert rel_err(sigma, exact_norms(weights)) < 1e-9


@pytest.mark.parametrize("backend", backends())
def test_in_place_weight_updates_are_seen(backend):
    """The triton launcher caches pointer tables by data pointer: values changed in place must still be read."""
    w = matrix_with_gap(12, 10, seed=4)
    first, _, _ = kexue_fast.power_iteration(w, n_iters=40, backend=backend)
    with torch.no_grad():
        w.mul_(3.0)
    second, _, _ = kexue_fast.power_iteration(w, n_iters=40, backend=backend)
    assert rel_err(second, 3.0 * first) < 1e-10


def test_sigma_gradient_is_u_vT():
    w = matrix_with_gap(10, 7).requires_grad_()
    sigma, u, v = kexue_fast.power_iteration(w, n_iters=80)
    sigma.backward()
    assert rel_err(w.grad, torch.outer(u, v)) < 1e-12
    w2 = w.detach().clone().requires_grad_()
    torch.linalg.matrix_norm(w2, ord=2).backward()
    assert rel_err(w.grad, w2.grad) < 1e-6


def test_list_gradients_flow_to_every_weight():
    weights = [matrix_with_gap(m, n, seed=i).requires_grad_() for i, (m, n) in enumerate([(4, 3), (6, 6)])]
    sigma, us, vs = kexue_fast.power_iteration(weights, n_iters=50)
    (sigma * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum().backward()
    assert rel_err(weights[0].grad, torch.outer(us[0], vs[0])) < 1e-12
    assert rel_err(weights[1].grad, 2 * torch.outer(us[1], vs[1])) < 1e-12


def test_float16_runs_on_torch_backend():
    w = matrix_with_gap(16, 8, dtype=torch.float32).half()
    sigma, _, _ = kexue_fast.power_iteration(w, n_iters=30)
    assert sigma.dtype == torch.float16
    assert rel_err(sigma, torch.linalg.matrix_norm(w.double(), ord=2)) < 5e-3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_iters": 0}, ValueError, "n_iters"),
        ({"n_iters": -3}, ValueError, "n_iters"),
        ({"n_iters": 1.5}, TypeError, "n_iters"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"v": torch.ones(4, dtype=torch.float64)}, ValueError, "v"),
        ({"u": torch.ones(2, dtype=torch.float64)}, ValueError, "u"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        kexue_fast.power_iteration(torch.randn(5, 3, dtype=torch.float64), **kwargs)


def test_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        kexue_fast.power_iteration(torch.randn(5))
    with pytest.raises(ValueError, match="weights"):
        kexue_fast.power_iteration(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="weights"):
        kexue_fast.power_iteration([])
    with pytest.raises(ValueError, match=r"weights\[1\] must be a 2-D"):
        kexue_fast.power_iteration([torch.randn(3, 3), torch.randn(3)])
    with pytest.raises(TypeError, match="weights"):
        kexue_fast.power_iteration(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="weights"):
        kexue_fast.power_iteration("not a tensor")
    with pytest.raises(ValueError, match=r"weights\[1\] is torch.float32"):
        kexue_fast.power_iteration([torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3)])
    with pytest.raises(NotImplementedError, match=r"torch.func.*batch \[B, m, n\]"):  # no data-pointer crash
        torch.func.vmap(lambda w: kexue_fast.power_iteration(w)[0], randomness="same")(torch.randn(2, 3, 3))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weight_raises(backend, bad):
    weights = [torch.randn(4, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)]
    weights[1][2, 1] = bad
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN or Inf"):
        kexue_fast.power_iteration(weights, backend=backend)


@pytest.mark.parametrize("backend", backends())
def test_float32_overflow_raises_instead_of_a_wrong_sigma(backend):
    # ‖W v‖² above float32's largest value: the C++ core's σ̂ came out Inf ("contains NaN or Inf" of a finite
    # weight), the torch path's u = Wv/Inf = 0 and σ̂ = 0, silently
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(4, 4, generator=g), torch.randn(6, 3, generator=g) * 1e20]
    with pytest.raises(ValueError, match=r"weights\[1\] has norm .* overflows torch.float32"):
        kexue_fast.power_iteration(weights, backend=backend)
    weights[1] /= 1e3  # ‖W‖ ~ 1e17: squares ~ 1e34 still fit
    sigma, _, _ = kexue_fast.power_iteration(weights, n_iters=30, backend=backend)
    assert rel_err(sigma[1], torch.linalg.matrix_norm(weights[1].double(), 2).float()) < 1e-4
    sigma, _, _ = kexue_fast.power_iteration(torch.zeros(3, 5), backend=backend)  # σ̂ = 0 of a zero weight: no error
    assert float(sigma) == 0


@pytest.mark.parametrize("backend", backends())
def test_nan_start_vectors_raise(backend):
    # the torch path's σ̂ was 0 (u kept at zeros, v NaN), silently
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"^v contains NaN or Inf"):
        kexue_fast.power_iteration(w, v=torch.tensor([1.0, float("nan"), 0.0]), backend=backend)
    with pytest.raises(ValueError, match=r"^u\[1\] contains NaN or Inf"):
        kexue_fast.power_iteration([w, w], u=[torch.ones(4), torch.full((4,), float("inf"))], backend=backend)


def test_explicit_backend_never_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match=r"triton.*CUDA"):
        kexue_fast.power_iteration(torch.randn(3, 3), backend="triton")
    with pytest.raises(NotImplementedError, match=r"cpp.*float16"):
        kexue_fast.power_iteration(torch.randn(3, 3).half(), backend="cpp")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert _dispatch.choose("power_iteration", torch.device("cpu"), torch.float32) == "torch"
    assert _dispatch.choose("power_iteration", torch.device("cpu"), torch.float32, "cpp") == "cpp"
    monkeypatch.setenv(_dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        kexue_fast.power_iteration(torch.randn(3, 3))


def test_auto_logs_once_when_fast_path_missing(monkeypatch, caplog):
    monkeypatch.setattr(_dispatch, "core_status", lambda: (False, "kexue_fast._core is not built (test)"))
    _dispatch._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="kexue_fast"):
        for _ in range(3):
            kexue_fast.power_iteration(torch.randn(4, 4))
    messages = [r.getMessage() for r in caplog.records if "slow torch path" in r.getMessage()]
    assert len(messages) == 1 and "_core is not built" in messages[0]
    _dispatch._LOGGED.clear()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("backend", backends(dtype=torch.float32))
def test_float32_error_at_most_twice_torchs(backend, seed):
    """flash-attention's rule: a kernel's error against the float64 truth is at most 2x torch's own in that dtype."""
    torch.manual_seed(seed)
    shapes = [(1, 1), (7, 3), (63, 65), (127, 129), (300, 200)]
    weights = [torch.randn(m, n) for m, n in shapes]
    v0 = [torch.randn(n) for _, n in shapes]
    truth = kexue_fast.power_iteration([w.double() for w in weights], n_iters=4, v=[v.double() for v in v0],
                                       backend="torch")  # fmt: skip
    ours = kexue_fast.power_iteration(weights, n_iters=4, v=v0, backend=backend)
    theirs = kexue_fast.power_iteration(weights, n_iters=4, v=v0, backend="torch")
    floor = 2 * torch.finfo(torch.float32).eps
    assert rel_err(ours[0], truth[0]) <= 2 * rel_err(theirs[0], truth[0]) + floor
    for i in range(len(shapes)):
        for k in (1, 2):
            assert rel_err(ours[k][i], truth[k][i]) <= 2 * rel_err(theirs[k][i], truth[k][i]) + floor


def test_registered_op_passes_opcheck():
    from kexue_fast.spectral.power_iteration import _power_iteration_op

    weights = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True), torch.randn(2, 4, dtype=torch.float64)]
    v0 = [torch.randn(3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    torch.library.opcheck(_power_iteration_op, (weights, v0, 3, None, 1e-12, "torch"))


def test_eager_function_equals_the_registered_op():
    """Eager calls with a gradient run _PowerIteration, torch.compile the custom op: the same σ̂, u, v and gradients
    (double backward included: ∂σ̂/∂W = u vᵀ is linear in the upstream gradient on both)."""
    import sys

    module = sys.modules["kexue_fast.spectral.power_iteration"]
    shapes = [(5, 3), (2, 4), (6, 6)]
    base = [matrix_with_gap(m, n, seed=i) for i, (m, n) in enumerate(shapes)]
    v0 = [torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i, (_, n) in
          enumerate(shapes)]  # fmt: skip
    got = []
    for route in ("function", "op"):
        ws = [w.clone().requires_grad_() for w in base]
        if route == "function":
            sigma, u, v = module._PowerIteration.apply(7, None, 1e-12, "torch", len(ws), *ws, *v0)
        else:
            sigma, u, v = module._power_iteration_op(ws, v0, 7, None, 1e-12, "torch")
        assert u.requires_grad == v.requires_grad == sigma.requires_grad  # the same node on both routes
        weight = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
        grads = torch.autograd.grad((sigma * weight).sum(), ws, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), weight)[0]
        got.append((sigma.detach(), u, v, [g.detach() for g in grads], second))
    for a, b in zip(got[0][:3], got[1][:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(got[0][3], got[1][3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[0][4], got[1][4], rtol=1e-15, atol=0)


def test_eager_gradient_calls_take_the_function(monkeypatch):
    import sys

    module = sys.modules["kexue_fast.spectral.power_iteration"]
    calls = []
    monkeypatch.setattr(module, "_power_iteration_op", lambda *a: calls.append(1))  # would fail if reached
    w = matrix_with_gap(6, 4).requires_grad_()
    sigma, u, v = kexue_fast.power_iteration(w, n_iters=30)
    sigma.backward()
    assert not calls and rel_err(w.grad, torch.outer(u, v)) < 1e-12


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_power_iteration_compiles_fullgraph(backend):
    weights = [matrix_with_gap(9, 4, seed=1).requires_grad_(), matrix_with_gap(3, 6, seed=2)]
    v0 = [torch.randn(4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)]

    def fn(ws, vs):
        sigma, _, v = kexue_fast.power_iteration(ws, n_iters=40, v=vs, backend=backend)
        return sigma.sum() + v[1].sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(weights, v0)
    assert torch.allclose(out, fn(weights, v0))
    out.backward()
    assert weights[0].grad is not None


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_weights_keep_unit_vectors(backend, dtype):
    """σ² below eps: the Triton steps once normalized Wᵀt (norm ~σ²) by max(‖·‖, eps) and shrank v every step."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(20, 17, generator=g, dtype=torch.float64) * 1e-8).to(dtype)
    start = torch.randn(17, generator=g, dtype=torch.float64).to(dtype)
    sigma, (u,), (v,) = kexue_fast.power_iteration([w], n_iters=5, v=[start.clone()], backend=backend)
    ref_sigma, _, _ = kexue_fast.power_iteration([w], n_iters=5, v=[start.clone()], backend="torch")
    assert float(torch.linalg.vector_norm(u)) == pytest.approx(1.0, rel=1e-5)
    assert float(torch.linalg.vector_norm(v)) == pytest.approx(1.0, rel=1e-5)
    assert float(sigma[0]) == pytest.approx(float(ref_sigma[0]), rel=1e-4)


@pytest.mark.parametrize("backend", backends())
def test_zero_weight_keeps_v_on_every_backend(backend):
    """Where Wv = 0 every backend keeps v (unit): Triton zeroed it, so a zero-initialized coeff layer updated there
    kept σ̂ = 0 for good and the coeff bound never applied once the weight moved (‖W_eff‖ 29.7 against coeff 0.5).
    A zero start vector raises instead of giving σ̂ = 0."""
    from kexue_fast.nn import spectral_norm, update_spectral_norms

    for n_iters in (1, 3):
        sigma, u, v = kexue_fast.power_iteration(torch.zeros(3, 4, dtype=torch.float64),
                                                 v=torch.ones(4, dtype=torch.float64), n_iters=n_iters,
                                                 backend=backend)  # fmt: skip
        assert float(sigma) == 0.0 and float(u.norm()) == 0.0 and abs(float(v.norm()) - 1) <= 1e-15
    layer = torch.nn.Linear(4, 4).double()
    torch.nn.init.zeros_(layer.weight)
    spectral_norm(layer, coeff=0.5, n_power_iterations=0)
    update_spectral_norms(layer, backend=backend)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.randn(4, 4, dtype=torch.float64) * 10)
    update_spectral_norms(layer, n_iters=50, backend=backend)
    assert abs(float(torch.linalg.matrix_norm(layer.weight, 2)) - 0.5) <= 1e-6
    with pytest.raises(ValueError, match="v must be a non-zero start vector"):
        kexue_fast.power_iteration(torch.randn(3, 4), v=torch.zeros(4), backend=backend)
