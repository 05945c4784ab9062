"""The SOM Triton kernels (kernels/som.py) against float64 torch, at odd shapes and layouts; interpreted on CPU
(TRITON_INTERPRET=1, set by conftest.py without CUDA). A kernel's float32 error must stay within 2× torch's own
float32 error against the float64 reference."""

import pytest
import torch

from kexue_fast.nn.self_orthogonality import SelfOrthogonality
from kexue_fast.ortho import reference, som_regularizer

pytest.importorskip("triton")
from kexue_fast.kernels import som as kernels

D64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (tensor shape, channel_dim): [b, k] outputs, NCHW convolutions (S > 1), channels-last sequences
LAYOUTS = [((1, 1), 1), ((7, 1), 1), ((63, 7), 1), ((65, 17), 1), ((33, 65), 1), ((2, 3, 5, 7), 1), ((3, 5, 16), -1)]


def _rows(y, dim):
    return y.movedim(dim, -1).reshape(-1, y.shape[dim])


def _inputs(seed, dtype=D64, scale=0.15):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, dtype=D64, generator=g) * scale).to(dtype).to(DEV) for s, _ in LAYOUTS]


def _layout(y, dim):
    dim %= y.ndim
    s = y.shape
    return (int(torch.tensor(s[:dim]).prod()), s[dim], int(torch.tensor(s[dim + 1 :]).prod()))


@pytest.mark.parametrize("chunks, prefetch", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_kernel_matches_torch(dtype, chunks, prefetch, monkeypatch):
    monkeypatch.setattr(kernels, "GRAM_PREFETCH", prefetch)  # the diagonal launches' register prefetch
    ys = _inputs(chunks, dtype)
    dims = [d for _, d in LAYOUTS]
    contiguous = [y.movedim(d % y.ndim, 1).contiguous() if d == -1 else y for y, d in zip(ys, dims)]
    layouts = [_layout(y, 1) for y in contiguous]
    grams, kp = kernels.gram_matrices(contiguous, layouts, 10.0, chunks=chunks)
    assert grams.dtype == D64 and grams.shape[0] == len(ys) and kp >= 65
    for i, (y, d) in enumerate(zip(ys, dims)):
        k = y.shape[d]
        z64 = torch.tanh(10.0 * _rows(y.double(), d))
        truth = z64.T @ z64
        z = torch.tanh(10.0 * _rows(y, d))
        err_torch = float(((z.T @ z).double() - truth).abs().max())
        err = float((grams[i, :k, :k] - truth).abs().max())
        # floor: a few float32 ulps (a 1×1 Gram is one product; torch's libm tanh may be luckier there)
        floor = (1e-6 if dtype == torch.float32 else 1e-14) * float(truth.abs().max())
        assert err <= 2 * err_torch + floor, (i, err, err_torch)
        assert torch.all(grams[i, k:] == 0) and torch.all(grams[i, :, k:] == 0)


@pytest.mark.parametrize("dtype, ulps", [(torch.float64, 2), (torch.float32, 4)])
def test_kernel_tanh_is_accurate_elementwise(dtype, ulps, monkeypatch):
    """With y = [100, x_1..x_63] as one row, G[0, j] = tanh(100)·tanh(x_j) = tanh(x_j): the kernel's tanh, read out
    (through exact float32 products: tf32x3's hi/lo split would add ~2 ulps of its own)."""
    monkeypatch.setattr(kernels, "GRAM_DOTS", "ieee")
    small = torch.logspace(-12, 0.5, 400, dtype=D64)
    edges = torch.tensor([0.0, 0.29999, 0.3, 0.30001], dtype=D64)
    x = torch.cat([torch.linspace(-20, 20, 2001, dtype=D64), small, -small, edges])
    x = torch.cat([x, torch.zeros(-x.numel() % 63, dtype=D64)]).reshape(-1, 63)
    rows = torch.cat([torch.full((x.shape[0], 1), 100.0, dtype=D64), x], 1).to(dtype)
    ys = [r[None].to(DEV).contiguous() for r in rows]
    grams, _ = kernels.gram_matrices(ys, [(1, 64, 1)] * len(ys), 1.0)
    got = grams[:, 0, 1:64].cpu()
    want = torch.tanh(rows[:, 1:].double())
    ulp = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
    assert torch.all((got - want).abs() <= ulps * ulp), float(((got - want).abs() / ulp).max())


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("gamma", [10.0, 0.7])  # 0.7 is not a float32: γ must reach float64 kernels unrounded
def test_regularizer_value_and_gradient_float64(gamma):
    ys = [y.requires_grad_() for y in _inputs(5)]
    dims = [d for _, d in LAYOUTS]
    ours = som_regularizer(ys, gamma=gamma, channel_dim=dims, reduction="none", backend="triton")
    grads = torch.autograd.grad(ours.sum(), ys)
    for i, (y, d) in enumerate(zip(ys, dims)):
        ref = reference.som_direct(_rows(y, d), gamma, 100.0, 1.0)
        if y.shape[d] == 1:
            assert ours[i] == 0 and torch.all(grads[i] == 0)
            continue
        assert abs(float(ours[i].detach() - ref.detach())) <= 1e-12 * float(ref.detach()), i
        (g_ref,) = torch.autograd.grad(ref, y)
        assert _rel(grads[i], g_ref) <= 1e-11, i


def test_fused_penalty_and_backward_matrix_equal_the_closed_form():
    """kernels.penalty (R and A = Ḡ + Ḡᵀ per unit upstream gradient, one program per layer) against the torch
    closed form on the kernel's own Grams: layers of 1 and 2 tiles per side, a dead unit, eps clamping; and
    gram_backward's scale: A_ℓ = scale_ℓ · a_ℓ."""
    from kexue_fast.ortho.som import gram_penalty

    ys = _inputs(8)
    dims = [d for _, d in LAYOUTS]
    flat = [y.movedim(d % y.ndim, 1).contiguous() if d == -1 else y for y, d in zip(ys, dims)]
    flat[3].view(-1, 17)[:, 4] = 0  # a dead unit: its column norm is clamped to eps
    layouts = [_layout(y, 1) for y in flat]
    r, a = kernels.penalty(flat, layouts, 0.7, 100.0, 1.0, 1e-6)
    grams, kp = kernels.gram_matrices(flat, layouts, 0.7)
    assert a.shape == (len(flat), kp, kp) and kp >= 65
    grams.requires_grad_()
    ref = gram_penalty(grams, [c for _, c, _ in layouts], 100.0, 1.0, 1e-6)
    w = torch.arange(1.0, len(flat) + 1, dtype=D64, device=DEV)
    (g,) = torch.autograd.grad((ref * w).sum(), grams)
    assert _rel(r, ref) <= 1e-13
    assert _rel(a * w[:, None, None], g + g.mT) <= 1e-12
    assert torch.equal(a, a.mT)
    for i, (_, c, _) in enumerate(layouts):
        assert torch.all(a[i, c:] == 0) and torch.all(a[i, :, c:] == 0)
    plain = kernels.gram_backward(flat, layouts, 0.7, a * w[:, None, None])
    scaled = kernels.gram_backward(flat, layouts, 0.7, a, w)
    assert _rel(scaled, plain) <= 1e-14


def test_regularizer_float32_as_accurate_as_torch():
    """torch's own float32 error: the definition (reference.som_direct: torch.tanh, Θ materialized) in float32."""
    ys64 = _inputs(6)
    dims = [d for _, d in LAYOUTS]
    got = {}
    for name, dtype in (("truth", D64), ("torch", torch.float32), ("triton", torch.float32)):
        ys = [y.to(dtype).requires_grad_() for y in ys64]
        if name == "triton":
            v = som_regularizer(ys, channel_dim=dims, reduction="none", backend="triton")
        else:
            v = torch.stack([reference.som_direct(_rows(y, d)) for y, d in zip(ys, dims)])
        gs = torch.autograd.grad(v.sum(), ys)
        got[name] = (v.detach().double(), [g.double() for g in gs])
    truth_v, truth_g = got["truth"]
    err = {n: (truth_v - got[n][0]).abs() for n in ("torch", "triton")}
    assert torch.all(err["triton"] <= 2 * err["torch"] + 1e-6 * truth_v.abs()), err
    for i in range(len(ys64)):
        e_torch = float((got["torch"][1][i] - truth_g[i]).abs().max())
        e_triton = float((got["triton"][1][i] - truth_g[i]).abs().max())
        assert e_triton <= 2 * e_torch + 1e-6 * float(truth_g[i].abs().max()), (i, e_triton, e_torch)


def test_gradcheck_triton_path():
    g = torch.Generator().manual_seed(7)
    a = (torch.randn(5, 3, 2, dtype=D64, generator=g) * 0.3).to(DEV).requires_grad_()
    b = (torch.randn(9, 4, dtype=D64, generator=g) * 0.3).to(DEV).requires_grad_()
    torch.autograd.gradcheck(lambda a, b: som_regularizer([a, b], gamma=2.0, backend="triton"), (a, b))


def test_grouped_call_equals_separate_calls_and_is_deterministic():
    ys = _inputs(8)
    dims = [d for _, d in LAYOUTS]
    together = som_regularizer(ys, channel_dim=dims, reduction="none", backend="triton")
    alone = torch.stack([som_regularizer(y, channel_dim=d, backend="triton") for y, d in zip(ys, dims)])
    assert _rel(together, alone) <= 1e-13
    assert torch.equal(together, som_regularizer(ys, channel_dim=dims, reduction="none", backend="triton"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "setting", [{"GRAM_PREFETCH": False}, {"GRAD_PERSIST": 0}, {"GRAD_PERSIST": 1}, {"GRAD_PERSIST": 3}]
)
def test_launch_variants_give_the_same_bits(dtype, setting, monkeypatch):
    """With and without the Gram's register prefetch and the persistent backward grid (each program looping over row
    blocks, the next load in flight), every block is computed alike: the same R and ∂R/∂Y, bit for bit."""
    ys = [y.requires_grad_() for y in _inputs(11, dtype)]
    dims = [d for _, d in LAYOUTS]

    def run():
        r = som_regularizer(ys, channel_dim=dims, reduction="none", backend="triton")
        return r, torch.autograd.grad((r * torch.arange(1.0, 1.0 + len(ys), device=DEV)).sum(), ys)

    r0, g0 = run()
    for name, value in setting.items():
        monkeypatch.setattr(kernels, name, value)
    r1, g1 = run()
    assert torch.equal(r0, r1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_direct_launches_equal_the_jit(monkeypatch):
    """kernels/_launch.py relaunches the compiled kernels without Triton's JIT: the same R and ∂R/∂Y, bit for bit, on
    the direct launches (second call) as through the JIT."""
    from kexue_fast.kernels import _launch

    g = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(8, 32, 32, 32), (8, 64, 16, 16), (300, 40)]
    ys = [(torch.randn(s, device="cuda", generator=g) * 0.2).requires_grad_() for s in shapes]

    def run():
        r = som_regularizer(ys, reduction="none", backend="triton")
        return r, torch.autograd.grad((r * torch.tensor([1.0, 2.0, 3.0], device="cuda")).sum(), ys)

    monkeypatch.setattr(_launch, "_RUNNERS", type(_launch._RUNNERS)())
    monkeypatch.setattr(_launch, "ENABLED", False)
    r0, g0 = run()
    assert not _launch._RUNNERS
    monkeypatch.setattr(_launch, "ENABLED", True)
    run()
    if not _launch._supported():
        pytest.skip("direct launches need Triton 3.3 or later (and KEXUE_FAST_DIRECT_LAUNCH unset)")
    assert _launch._RUNNERS  # kept by the first call, used by the second
    r1, g1 = run()
    assert torch.equal(r0, r1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


def test_expanded_scale_is_read_in_place():
    """The gradient of R.sum() reaches the backward as a stride-0 expansion of one value: read in place (no copy),
    it gives what the materialized scale does; any other stride is made contiguous first."""
    ys = [y.float() for y in _inputs(4)[3:6]]
    layouts = [_layout(y, 1) for y in ys]
    a = kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12)[1]
    expanded = torch.full((), 0.75, dtype=D64, device=DEV).expand(len(ys))
    strided = torch.tensor([0.75, 9.0, 0.5, 9.0, 2.0], dtype=D64, device=DEV)[::2]
    materialized = torch.tensor([0.75, 0.75, 0.75], dtype=D64, device=DEV)
    assert expanded.stride(0) == 0
    base = kernels.gram_backward(ys, layouts, 10.0, a, materialized)
    assert torch.equal(kernels.gram_backward(ys, layouts, 10.0, a, expanded), base)
    ours = kernels.gram_backward(ys, layouts, 10.0, a, strided)
    assert torch.equal(ours, kernels.gram_backward(ys, layouts, 10.0, a, strided.contiguous()))
    assert not torch.equal(ours, base)


def test_non_contiguous_and_wide_layers():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(40, 24, dtype=D64, generator=g).to(DEV)
    y = base.T[:, ::2].requires_grad_()  # [24, 20], non-contiguous
    wide = torch.randn(3, 50, dtype=D64, generator=g).to(DEV).requires_grad_()  # b < k: the ẐẐᵀ route
    ours = som_regularizer([y, wide], backend="triton", reduction="none")
    ref = torch.stack([reference.som_direct(y), reference.som_direct(wide)])
    assert _rel(ours, ref) <= 1e-12
    ga = torch.autograd.grad(ours.sum(), [y, wide])
    gb = torch.autograd.grad(ref.sum(), [y, wide])
    assert all(_rel(a, b) <= 1e-11 for a, b in zip(ga, gb))


def test_channels_last_layers_are_read_in_place():
    """A channels_last map goes to the kernels as its rows [N·H·W, C] (kexue_fast.ortho.som._in_memory_order: no
    contiguous copy), grouped with a [b, k] layer of its width, and ∂R/∂Y comes back channels_last."""
    g = torch.Generator().manual_seed(10)
    y = torch.randn(3, 6, 5, 4, dtype=D64, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    rows = torch.randn(40, 6, dtype=D64, generator=g).to(DEV)
    y, rows = y.requires_grad_(), rows.requires_grad_()
    ours = som_regularizer([y, rows], backend="triton", reduction="none")
    ref = torch.stack([reference.som_direct(_rows(y, 1)), reference.som_direct(rows)])
    assert _rel(ours, ref) <= 1e-12
    ga = torch.autograd.grad(ours.sum(), [y, rows])
    gb = torch.autograd.grad(ref.sum(), [y, rows])
    assert all(_rel(a, b) <= 1e-11 for a, b in zip(ga, gb))
    assert ga[0].stride() == y.stride()


def test_module_on_triton_matches_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3), torch.nn.Tanh(), torch.nn.Conv2d(6, 5, 3)).double().to(DEV)
    x = torch.randn(2, 2, 8, 8, dtype=D64, device=DEV)
    values = {}
    for backend in ("torch", "triton"):
        som = SelfOrthogonality(model, gamma=1.0, backend=backend)
        model.zero_grad()
        model(x)
        loss = som.loss()
        loss.backward()
        values[backend] = (loss.detach(), model[0].weight.grad.clone())
        som.remove()
    assert _rel(values["triton"][0], values["torch"][0]) <= 1e-12
    assert _rel(values["triton"][1], values["torch"][1]) <= 1e-10


def test_eager_function_equals_the_custom_ops_route():
    """Eager mode runs _TritonPenalty (no custom-op dispatch); torch.compile the custom ops: the same launches, so the
    same values and gradients, compared here by calling both directly (patching torch.compiler.is_compiling would
    confuse a later torch.compile in the process)."""
    from kexue_fast.ortho import som

    ys64 = _inputs(12)
    dims = [d for _, d in LAYOUTS]
    contiguous = [y.movedim(d % y.ndim, 1).contiguous() if d == -1 else y for y, d in zip(ys64, dims)]
    layouts = tuple(_layout(y, 1) for y in contiguous)
    weights = torch.arange(1.0, len(ys64) + 1.0, dtype=D64, device=DEV)
    got = []
    for route in ("function", "custom ops"):
        ys = [y.clone().requires_grad_() for y in contiguous]
        if route == "function":
            v = som._TritonPenalty.apply(10.0, 100.0, 1.0, 1e-12, layouts, *ys)
        else:
            v = som._triton_penalty(ys, [n for lay in layouts for n in lay], 10.0, 100.0, 1.0, 1e-12)[0]
        got.append((v.detach(), torch.autograd.grad((v * weights).sum(), ys)))
    torch.testing.assert_close(got[0][0], got[1][0], rtol=0, atol=0)
    for a, b in zip(got[0][1], got[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ys = [y.clone().requires_grad_() for y in contiguous]
    with pytest.raises(RuntimeError, match="double backward"):
        v = som._TritonPenalty.apply(10.0, 100.0, 1.0, 1e-12, layouts, *ys).sum()
        torch.autograd.grad(torch.autograd.grad(v, ys[0], create_graph=True)[0].sum(), ys[0])


def test_float32_route_has_no_cast_after_the_kernels():
    """The finish kernel writes R in the output dtype and the backward kernel reads ∂L/∂R in any float dtype: a
    float32 step has no cast of R forward nor of its gradient backward (each a launch, costly on a host-bound GPU
    machine). The values equal the float64 R rounded, and the gradients those from a float64 upstream gradient."""
    ys = [y.movedim(d % y.ndim, 1).contiguous() for y, (_, d) in zip(_inputs(13, torch.float32), LAYOUTS)]
    layouts = [_layout(y, 1) for y in ys]
    r64, a = kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12)
    r32, a32 = kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12, out_dtype=torch.float32)
    assert r32.dtype == torch.float32 and torch.equal(r32, r64.float()) and torch.equal(a32, a)
    w = torch.linspace(0.5, 2.0, len(ys), device=DEV)
    torch.testing.assert_close(kernels.gram_backward(ys, layouts, 10.0, a, w),
                               kernels.gram_backward(ys, layouts, 10.0, a, w.double()), rtol=0, atol=0)  # fmt: skip
    leaves = [y.clone().requires_grad_() for y, (n, c, s) in zip(ys, layouts) if n * s >= c]  # all on the kernels
    total = som_regularizer(leaves, backend="triton")
    assert total.dtype == torch.float32
    (node, _), = total.grad_fn.next_functions  # fmt: skip
    assert type(node).__name__ == "_TritonPenaltyBackward"  # no ToCopyBackward0 between the sum and the kernels
    with pytest.raises(ValueError, match="out_dtype"):
        kernels.penalty(ys, layouts, 10.0, 100.0, 1.0, 1e-12, out_dtype=torch.float16)


def test_auto_sends_only_layers_up_to_the_channel_limit_to_the_kernels(monkeypatch):
    """auto on the Triton backend (CUDA) leaves layers wider than TRITON_AUTO_MAX_CHANNELS to the torch path;
    backend="triton" runs them all. Same values either way."""
    from kexue_fast.ortho import som

    seen = []
    fused = som._TritonPenalty.apply
    monkeypatch.setattr(som._TritonPenalty, "apply", lambda *a: seen.append([y.shape[1] for y in a[5:]]) or fused(*a))
    monkeypatch.setattr(som._dispatch, "choose", lambda *a, **k: "triton")
    monkeypatch.delenv("KEXUE_FAST_BACKEND", raising=False)
    g = torch.Generator().manual_seed(5)
    limit = som.TRITON_AUTO_MAX_CHANNELS
    shapes = [(70, 9), (limit + 3, limit + 1), (limit + 2, limit), (40, 16)]
    ys = [(torch.randn(s, dtype=D64, generator=g) * 0.2).to(DEV) for s in shapes]
    auto = som_regularizer(ys, reduction="none")
    assert seen == [[9, limit, 16]]
    explicit = som_regularizer(ys, reduction="none", backend="triton")
    assert seen[1] == [9, limit + 1, limit, 16]
    torch.testing.assert_close(auto, explicit, rtol=1e-10, atol=0)


def test_cached_tables_follow_the_launch_groups_of_each_dtype(monkeypatch):
    """Tables are cached by shapes and data addresses; the same addresses in another dtype may group the layers into
    other launches (their block sizes differ), so the groups are part of the key."""
    monkeypatch.setattr(kernels, "_rows_per_block", lambda dtype, device, s, rows: 16 if dtype == D64 or s < 32 else 32)
    monkeypatch.setattr(kernels, "_TABLE_CACHE", type(kernels._TABLE_CACHE)())  # no launch plan from another test
    g = torch.Generator().manual_seed(9)
    shapes = [(2, 3, 4, 4), (2, 5, 8, 8)]  # S = 16 and 64: one launch in float64, two in float32
    bufs = [torch.empty(torch.Size(s).numel() * 8, dtype=torch.uint8, device=DEV) for s in shapes]
    layouts = [_layout(torch.empty(s), 1) for s in shapes]
    for dtype in (D64, torch.float32):
        ys = [b[: torch.Size(s).numel() * dtype.itemsize].view(dtype).view(s) for b, s in zip(bufs, shapes)]
        for y in ys:
            y.copy_(torch.randn(y.shape, dtype=D64, generator=g) * 0.2)
        grams, _ = kernels.gram_matrices(ys, layouts, 10.0)
        for i, (y, (_, c, _)) in enumerate(zip(ys, layouts)):
            z = torch.tanh(10.0 * _rows(y.double(), 1))
            torch.testing.assert_close(grams[i, :c, :c], z.T @ z, rtol=1e-5, atol=1e-5)


def test_launchers_reject_bad_inputs():
    y = torch.randn(8, 4, device=DEV)
    with pytest.raises(ValueError, match="layout"):
        kernels.gram_matrices([y], [], 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.gram_matrices([y, y.double()], [(8, 4, 1), (8, 4, 1)], 1.0)
    with pytest.raises(ValueError, match="elements"):
        kernels.gram_matrices([y], [(8, 5, 1)], 1.0)
    with pytest.raises(TypeError, match="support"):
        kernels.gram_matrices([y.long()], [(8, 4, 1)], 1.0)
    assert kernels.gram_backward([y], [(8, 4, 1)], 1.0, torch.zeros(1, 16, 16, device=DEV)).shape == (32,)
    with pytest.raises(ValueError, match="KP"):
        kernels.gram_backward([y], [(8, 4, 1)], 1.0, torch.zeros(1, 8, 8, device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_large_cnn_layers_match_float64(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4), (64, 1000)]
    ys = [(torch.randn(s, device="cuda", generator=g) * 0.2).to(dtype).requires_grad_() for s in shapes]
    ours = som_regularizer(ys, reduction="none", backend="triton")
    # the (64, 1000) layer's true gradient of R reaches ~6·10⁴, float16's limit: a 2⁻⁶ upstream gradient (exact in
    # every dtype) keeps the comparison about the kernel's accuracy, not about float16's range
    grads = torch.autograd.grad(ours.sum() * 2**-6, ys)
    ys64 = [y.detach().double().requires_grad_() for y in ys]
    truth = som_regularizer(ys64, reduction="none", backend="torch")
    g64 = torch.autograd.grad(truth.sum() * 2**-6, ys64)
    tol = 1e-4 if dtype == torch.float32 else 1e-3
    assert _rel(ours, truth) <= tol
    for a, b in zip(grads, g64):
        assert _rel(a, b) <= (tol if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dots", ["ieee", "tf32x3"])
def test_gpu_float32_gram_error_within_twice_torch(dots, monkeypatch):
    """CNN-sized float32 layers (b up to 2·10⁵ rows): the kernel's Gram error against float64, with each choice of
    GRAM_DOTS, stays within 2× that of torch's own float32 path (IEEE, allow_tf32 off)."""
    monkeypatch.setattr(kernels, "GRAM_DOTS", dots)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(200, 32, 32, 32), (256, 64, 16, 16), (4096, 48)]
    ys = [torch.randn(s, device="cuda", generator=g) * 0.2 for s in shapes]
    layouts = [_layout(y, 1) for y in ys]
    grams, _ = kernels.gram_matrices(ys, layouts, 10.0)
    for i, y in enumerate(ys):
        z = torch.tanh(10.0 * _rows(y.double(), 1))
        truth = z.T @ z
        z32 = torch.tanh(10.0 * _rows(y, 1))  # torch's float32 path: its tanh, then its product
        err_torch = float(((z32.T @ z32).double() - truth).abs().max())
        k = y.shape[1]
        err = float((grams[i, :k, :k] - truth).abs().max())
        assert err <= 2 * err_torch + 1e-8 * float(truth.abs().max()), (i, dots, err, err_torch)


@pytest.mark.gpu
def test_gpu_training_step_with_som_captures_in_a_cuda_graph():
    """A whole training step with SelfOrthogonality on the Triton kernels captures in one CUDA graph (relaxed mode: the
    pointer tables of the capture's own addresses are built during it, from pinned memory the table cache keeps) and
    each replay is the step run eagerly: the same regularizer and the same parameters after it (benchmarks/ortho.py's
    graphed, what its CUDA-graph rows time)."""
    import copy

    from kexue_fast.benchmarks.ortho import graphed

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3),
                              torch.nn.Flatten(), torch.nn.LazyLinear(5)).cuda()  # fmt: skip
    x = torch.randn(8, 3, 12, 12, device="cuda")
    target = torch.randint(0, 5, (8,), device="cuda")
    net(x)  # the lazy layer's shape
    runs = {}
    for mode in ("eager", "graph"):
        model = copy.deepcopy(net)
        som = SelfOrthogonality(model, backend="triton")
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        reg = torch.zeros((), device="cuda")

        def step(model=model, som=som, opt=opt, reg=reg):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), target)
            r = som.loss()
            reg.copy_(r.detach())
            (loss + 1e-3 * r).backward()
            opt.step()

        if mode == "eager":
            for _ in range(5):
                step()
        else:
            replay = graphed(step)  # three warm-up steps on a side stream, then the capture (which runs nothing)
            replay()
            replay()
        torch.cuda.synchronize()
        runs[mode] = (reg.clone(), [p.detach().clone() for p in model.parameters()])
        som.remove()
    assert runs["eager"][0] > 0
    assert _rel(runs["graph"][0], runs["eager"][0]) <= 1e-5
    for a, b in zip(runs["graph"][1], runs["eager"][1]):
        assert _rel(a, b) <= 1e-5


@pytest.mark.gpu
def test_gpu_grouped_step_has_no_host_sync():
    ys = [torch.randn(s, device="cuda", requires_grad=True) for s in [(32, 32, 16, 16), (32, 64, 8, 8), (8, 100)]]
    som_regularizer(ys, backend="triton").backward()  # builds and caches the tables and masks
    torch.cuda.set_sync_debug_mode("error")
    try:
        som_regularizer(ys, backend="triton").backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.slow
def test_torch_compile_fullgraph_triton_path():
    g = torch.Generator().manual_seed(11)
    shapes = [(4, 5, 3), (20, 9)]
    ys = [(torch.randn(s, dtype=torch.float32, generator=g) * 0.3).to(DEV).requires_grad_() for s in shapes]
    compiled = torch.compile(lambda a, b: som_regularizer([a, b], backend="triton"), fullgraph=True)
    value = compiled(*ys)
    grads = torch.autograd.grad(value, ys)
    eager = som_regularizer(ys, backend="triton")
    eager_grads = torch.autograd.grad(eager, ys)
    assert _rel(value, eager) <= 1e-6
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(grads, eager_grads))
