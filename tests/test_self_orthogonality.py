"""The Self-Orthogonality regularizer (torch path) and its siblings against the direct formulas; the hooks module;
bad inputs. The Triton kernel's tests are in test_kernels_som.py."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kexue_fast.nn.self_orthogonality import SelfOrthogonality
from kexue_fast.ortho import (
    OutputRecorder,
    biggan_orthogonal_regularizer,
    orthogonality_penalty,
    reference,
    som_regularizer,
)

D64 = torch.float64
SHAPES = [(1, 1), (1, 7), (7, 1), (7, 63), (63, 7), (65, 63), (63, 65), (64, 64)]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _rows(y, dim):
    return y.movedim(dim, -1).reshape(-1, y.shape[dim])


@pytest.mark.parametrize("b, k", SHAPES)
@pytest.mark.parametrize("gamma", [0.3, 10.0])
def test_cheap_identities_equal_the_direct_formula(b, k, gamma):
    g = torch.Generator().manual_seed(b * 1000 + k)
    y = torch.randn(b, k, dtype=D64, generator=g).requires_grad_()
    direct = reference.som_direct(y, gamma, 100.0, 1.0)
    cheap = reference.som_cheap(y, gamma, 100.0, 1.0)
    # k = 1: no off-diagonal entries, R = 0
    scale = direct.detach().abs() + 1e-300 if k > 1 else torch.ones((), dtype=D64)
    assert float((cheap - direct).detach().abs() / scale) <= 1e-12
    if k == 1:
        assert direct == 0
        return
    (gd,) = torch.autograd.grad(direct, y)
    (gc,) = torch.autograd.grad(cheap, y)
    assert _rel(gc, gd) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("b, k", SHAPES)
def test_torch_path_matches_reference_in_value_and_gradient(b, k, backend):
    g = torch.Generator().manual_seed(b + 7 * k)
    y = torch.randn(b, k, dtype=D64, generator=g).requires_grad_()
    ours = som_regularizer(y, gamma=2.0, lambda1=3.0, lambda2=0.5, backend=backend)
    ref = reference.som_direct(y, 2.0, 3.0, 0.5)
    assert abs(float((ours - ref).detach())) <= 1e-12 * max(abs(float(ref.detach())), 1e-300) or (k == 1 and ours == 0)
    if k > 1:
        assert _rel(torch.autograd.grad(ours, y)[0], torch.autograd.grad(ref, y)[0]) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_layouts_grouping_and_reduction(backend):
    g = torch.Generator().manual_seed(1)
    conv = torch.randn(3, 5, 4, 2, dtype=D64, generator=g)  # NCHW: b = 3·4·2, k = 5
    seq = torch.randn(2, 9, 6, dtype=D64, generator=g)  # [B, T, k], channels last
    wide = torch.randn(3, 40, dtype=D64, generator=g)  # b < k: the ẐẐᵀ route
    per = som_regularizer([conv, seq, wide], channel_dim=[1, -1, 1], reduction="none", backend=backend)
    refs = [reference.som_direct(_rows(conv, 1)), reference.som_direct(_rows(seq, -1)), reference.som_direct(wide)]
    assert per.shape == (3,) and per.dtype == D64
    for got, ref in zip(per, refs):
        assert abs(float(got - ref)) <= 1e-12 * float(ref)
    total = som_regularizer([conv, seq, wide], channel_dim=[1, 2, 1], backend=backend)
    assert abs(float(total - sum(refs))) <= 1e-12 * float(sum(refs))
    assert som_regularizer(conv, gamma=1.5, backend=backend).ndim == 0


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_other_memory_orders_are_read_in_place(backend):
    """Dense inputs in another axis order (channels_last and channels_last_3d maps, a transposed matrix) give the
    contiguous input's R and ∂R/∂Y, read in place (no copy of Y: R reads its rows in any order) and with ∂R/∂Y in Y's
    own memory order; inputs with gaps (a slice) or overlaps (an expanded tensor) are copied, with the same results."""
    from torch.profiler import profile

    g = torch.Generator().manual_seed(3)
    base4 = torch.randn(3, 6, 5, 4, dtype=D64, generator=g)
    base5 = torch.randn(2, 5, 3, 4, 3, dtype=D64, generator=g)
    base2 = torch.randn(7, 30, dtype=D64, generator=g)
    cases = [  # (input, dense: read in place)
        (base4.contiguous(memory_format=torch.channels_last), True),
        (base5.contiguous(memory_format=torch.channels_last_3d), True),
        (base2.T.contiguous().T, True),  # [7, 30] with strides (1, 7)
        (base4.transpose(2, 3).contiguous().transpose(2, 3), True),
        (torch.cat([base4, base4], 3)[..., ::2], False),
        (base2[:1].expand(30, 30), False),
    ]
    for y, dense in cases:
        y = y.detach().requires_grad_()
        want_y = y.detach().contiguous().requires_grad_()
        with profile(record_shapes=True) as prof:
            got = som_regularizer(y, backend=backend)
        copies = [
            e.name
            for e in prof.events()
            if e.name in ("aten::clone", "aten::contiguous", "aten::copy_") and list(y.shape) in e.input_shapes
        ]
        assert copies == [] if dense else backend == "torch" or copies, (y.shape, y.stride(), copies)
        want = som_regularizer(want_y, backend=backend)
        assert abs(float(got.detach() - want.detach())) <= 1e-13 * float(want.detach())
        (dy,), (want_dy,) = torch.autograd.grad(got, y), torch.autograd.grad(want, want_y)
        assert torch.allclose(dy, want_dy, rtol=1e-11, atol=1e-13 * float(want_dy.abs().max()))
        if dense:
            assert dy.stride() == y.stride(), (dy.stride(), y.stride())


@pytest.mark.parametrize("kw", [{}, {"taps": False}, {"backend": "torch"}])
def test_torch_func_transforms_take_the_graph_route(kw):
    """Under torch.func transforms (grad with functional_call, vmap, hessian) R is computed by torch ops alone: the
    module's loss() failed inside torch.func.grad (its taps ran a calibration backward there; the autograd.Functions
    have no setup_context), and som_regularizer under vmap or a Hessian. Values and derivatives equal the eager
    route's and the definition's."""
    from torch.func import functional_call, grad, hessian, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, padding=1)).double()
    x = torch.randn(2, 2, 4, 4, dtype=D64)
    som = SelfOrthogonality(model, gamma=0.5, **kw)
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = grad(lambda p: functional_call(model, p, (x,)).pow(2).mean() + som.loss())(params)
    model.zero_grad()
    (model(x).pow(2).mean() + som.loss()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-10, atol=1e-12)
    som.remove()
    ys = torch.randn(3, 6, 4, dtype=D64)  # three [6, 4] outputs (b ≥ k), and [2, 5] ones (b < k)
    for batch in (ys, torch.randn(3, 2, 5, dtype=D64)):
        mapped = vmap(lambda y: som_regularizer(y, gamma=0.5))(batch)
        want = torch.stack([reference.som_direct(y, gamma=0.5) for y in batch])
        torch.testing.assert_close(mapped, want, rtol=1e-12, atol=0)
    y32 = ys[1].float().requires_grad_()  # layers of two dtypes: R in float64, as on the other routes
    got = grad(lambda t: som_regularizer([t, ys[2]], gamma=0.5))(y32.detach())
    (want,) = torch.autograd.grad(som_regularizer([y32, ys[2]], gamma=0.5), y32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    y = ys[0]
    h = hessian(lambda t: som_regularizer(t, gamma=0.5))(y)
    torch.testing.assert_close(h, hessian(lambda t: reference.som_direct(t, gamma=0.5))(y), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_torch_path(backend):
    g = torch.Generator().manual_seed(2)
    y1 = torch.randn(6, 3, 2, dtype=D64, generator=g).requires_grad_()
    y2 = torch.randn(2, 5, dtype=D64, generator=g).requires_grad_()
    y3 = torch.randn(9, 4, dtype=D64, generator=g).requires_grad_()  # b ≥ k: the Gram route on both backends
    torch.autograd.gradcheck(lambda a, b, c: som_regularizer([a, b, c], gamma=0.7, backend=backend), (y1, y2, y3))


def test_gram_penalty_closed_form_gradient_equals_autograd():
    """The penalty from padded Grams (one node, closed-form backward) against autograd through its definition:
    layers of 4, 6 and 1 channels padded to 6, one channel dead (G_ii < eps², clamped), one exactly at eps², and
    one Gram not exactly symmetric (as a float32 product's)."""
    from kexue_fast.ortho.som import gram_penalty

    g = torch.Generator().manual_seed(31)
    ks, kp, eps = (4, 6, 1), 6, 1e-2
    grams = torch.zeros(3, kp, kp, dtype=D64)
    for i, k in enumerate(ks):
        z = torch.randn(9, k, dtype=D64, generator=g)
        if k == 6:
            z[:, 2] *= 1e-6  # dead: its Θ row is scaled by 1/eps, its diagonal gets no gradient
        grams[i, :k, :k] = z.T @ z
    grams[0, 1, 1] = eps * eps  # on the clamp's edge: torch's clamp_min passes the gradient there
    grams[1, :6, :6] += 1e-3 * torch.randn(6, 6, dtype=D64, generator=g)  # float32 products' Grams are not symmetric
    grams.requires_grad_()

    def by_definition(gr):
        idx = torch.arange(kp)
        valid = idx[None, :] < torch.tensor(ks)[:, None]
        pairs = valid[:, :, None] & valid[:, None, :] & (idx[:, None] != idx[None, :])
        inv = torch.where(valid, gr.diagonal(dim1=-2, dim2=-1).clamp_min(eps * eps).rsqrt(), 0.0)
        theta = torch.where(pairs, gr * inv[:, :, None] * inv[:, None, :], 0.0)
        return 100.0 * theta.sum((1, 2)) ** 2 + 1.0 * (theta * theta).sum((1, 2))

    w = torch.randn(3, dtype=D64, generator=g)
    got = gram_penalty(grams, ks, 100.0, 1.0, eps)
    want = by_definition(grams)
    assert torch.allclose(got, want, rtol=1e-14, atol=0)
    (g_got,) = torch.autograd.grad((got * w).sum(), grams)
    (g_want,) = torch.autograd.grad((want * w).sum(), grams)
    assert torch.allclose(g_got, g_want, rtol=1e-12, atol=1e-12 * float(g_want.abs().max()))
    assert torch.all(g_got[1, 2, 2] == 0) and torch.all(g_got[2] == 0)
    sym = grams.detach().clone()
    sym[0, 1, 1] = 2.0  # off the kink: finite differences across it disagree with either one-sided derivative
    fn = lambda a: gram_penalty((a + a.mT) / 2, ks, 100.0, 1.0, eps)  # noqa: E731
    torch.autograd.gradcheck(fn, (sym.requires_grad_(),))


@pytest.mark.parametrize("n, c, s", [(1, 1, 1), (9, 7, 1), (2, 17, 130), (4, 64, 9), (300, 33, 1), (2, 6, 1000),
                                     (1, 5, 2053), (2, 16, 9001), (2, 16, 8192), (3, 12, 48), (3, 9, 60),
                                     (200, 130, 1), (129, 100, 1), (150, 144, 1),
                                     (40, 64, 9), (30, 20, 3), (6, 10, 100),
                                     (2, 150, 1500), (1, 260, 1100)])  # fmt: skip
def test_cpp_gram_equals_torch_in_float64_and_float32(n, c, s):
    """The C++ core against the torch path: float64 to 1e-12 in value and gradient; float32 within 2× the torch path's
    own error against the float64 truth. Shapes: odd channel counts, tiles of 128 positions; s = 1 row layouts
    ((200, 130, 1), (129, 100, 1), (150, 144, 1): rows padded to an odd number of cache lines, the forward's last
    column block of 1, 2 or 3 vectors masked or whole, a last block of 1 row, 22 rows); fewer than 64 positions
    ((3, 12, 48), (3, 9, 60), (40, 64, 9), (30, 20, 3)): several samples side by side in the C++ backward, one product
    of channel-major copies for the torch path's per-sample Grams where s ≤ c/4; (2, 16, 9001): samples larger than
    the backward's Z scratch, so spans of positions, and rows at unaligned addresses; (2, 16, 8192): spans and 1 MiB of
    ∂R/∂Y in whole cache lines, written by non-temporal stores; (2, 150, 1500) (float64), (1, 260, 1100) (float32):
    the forward's chunks shortened to 1 MiB of rows. The AVX-512 backward's last block of 3 vectors of
    positions ends whole (144 in float32), in one whole vector (4096), in a masked first (100), second (360) or third
    one (130, 180, 2053)."""
    g = torch.Generator().manual_seed(n * 1000 + c * 10 + s)
    y64 = (torch.randn(n, c, s, dtype=D64, generator=g) * 0.15).requires_grad_()
    results = {}
    for backend in ("torch", "cpp"):
        for dtype in (D64, torch.float32):
            y = y64.detach().to(dtype).requires_grad_()
            r = som_regularizer(y, gamma=3.0, lambda1=2.0, lambda2=0.5, backend=backend)
            results[backend, dtype] = (r.detach().double(), torch.autograd.grad(r, y)[0].double())
    (rt, gt), (rc, gc) = results["torch", D64], results["cpp", D64]
    assert abs(float(rc - rt)) <= 1e-12 * max(abs(float(rt)), 1e-300)
    assert _rel(gc, gt) <= 1e-12 or float(gt.abs().max()) == 0
    for i, truth in enumerate((rt, gt)):
        own = _rel(results["torch", torch.float32][i], truth)
        ours = _rel(results["cpp", torch.float32][i], truth)
        assert ours <= 2 * own + 1e-6, (i, ours, own)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("n, c, s", [(4, 16, 4096), (3, 5, 9001), (40000, 7, 1), (3000, 8, 9)])
def test_cpp_core_threads_give_the_one_thread_results(n, c, s, dtype):
    """The C++ calls on two threads (samples split between them, each taking at least 64K elements: these shapes are
    large enough for two; the route runs som.cpp_threads()) against one: the backward per sample is the
    same arithmetic (bitwise equal, with (4, 16, 4096)'s non-temporal stores fenced per thread), the Gram's partial
    sums are added in another order (R to float rounding)."""
    from kexue_fast import _core

    g = torch.Generator().manual_seed(n + c + s)
    y = (torch.randn(n * c * s, generator=g, dtype=D64) * 0.2).to(dtype)
    results = []
    for threads in (1, 2):
        a = torch.empty((c, c), dtype=D64)
        r = _core.som_penalty(y.numpy(), n, c, s, 3.0, 2.0, 0.5, 1e-12, a.numpy(), threads)
        dy = torch.full((n * c * s,), float("nan"), dtype=dtype)
        _core.som_gram_backward(y.numpy(), n, c, s, 3.0, a.numpy(), dy.numpy(), threads, 0.7)
        results.append((r, a, dy))
    (r1, a1, dy1), (r2, a2, dy2) = results
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert abs(r2 - r1) <= tol * abs(r1)
    torch.testing.assert_close(a2, a1, rtol=tol, atol=tol * float(a1.abs().max()))
    torch.testing.assert_close(dy2, dy1, rtol=tol, atol=tol * float(dy1.abs().max()))
    dy_same_a = torch.full_like(dy1, float("nan"))
    _core.som_gram_backward(y.numpy(), n, c, s, 3.0, a1.numpy(), dy_same_a.numpy(), 2, 0.7)
    assert torch.equal(dy_same_a, dy1)  # same A: two threads write exactly what one does, every element


def test_cpp_z_stride_pads_rows_of_whole_kibibytes():
    """som_z_stride: Z's rows one 64-byte line longer where s elements fill a multiple of 1 KiB, else s."""
    from kexue_fast import _core

    assert [_core.som_z_stride(s, 4) for s in (1, 49, 255, 256, 1024, 4096)] == [1, 49, 255, 272, 1040, 4112]
    assert [_core.som_z_stride(s, 8) for s in (1, 64, 128, 333)] == [1, 64, 136, 333]
    for bad in ((0, 4), (16, 2)):
        with pytest.raises(ValueError, match="itemsize"):
            _core.som_z_stride(*bad)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("n, c, s", [(4, 16, 4096), (3, 5, 333), (500, 7, 1), (5, 24, 256), (6, 9, 128), (50, 24, 9)])
def test_cpp_core_keeps_z_for_the_backward(n, c, s, dtype):
    """som_penalty(..., z=buffer) stores Z = tanh(γy) as it computes the Gram, as [n, c, som_z_stride(s)] (rows padded
    where som_z_stride says; the padding is not written) (float32: ±1 exactly where float's tanh rounds to 1, within a
    few ulp of torch.tanh elsewhere); som_gram_backward(from_z=True) from it gives the backward that recomputes Z
    (float64 bitwise, on one and two threads); R is unchanged. Bad z: TypeError (dtype), ValueError (size,
    overlapping y)."""
    from kexue_fast import _core

    g = torch.Generator().manual_seed(n + c + s)
    y = (torch.randn(n * c * s, generator=g, dtype=D64) * 0.5).to(dtype)
    ld = _core.som_z_stride(s, y.element_size())
    for threads in (1, 2):
        a, a_kept = torch.empty((c, c), dtype=D64), torch.empty((c, c), dtype=D64)
        z_rows = torch.full((n, c, ld), float("nan"), dtype=dtype)
        z = z_rows.view(-1)
        r = _core.som_penalty(y.numpy(), n, c, s, 10.0, 2.0, 0.5, 1e-12, a.numpy(), threads)
        r_kept = _core.som_penalty(y.numpy(), n, c, s, 10.0, 2.0, 0.5, 1e-12, a_kept.numpy(), threads, z.numpy())
        assert abs(r_kept - r) <= (1e-5 if dtype == torch.float32 else 0.0) * abs(r)
        assert z_rows[:, :, s:].isnan().all()  # the padding untouched
        z_values = z_rows[:, :, :s].reshape(-1)
        want = torch.tanh(10.0 * y.double())
        if dtype == torch.float32:
            ones = (10.0 * y).abs() >= 9.0110  # float tanh is ±1 from 9.010914 on
            assert ones.any() and torch.equal(z_values[ones], torch.sign(y[ones]))
            torch.testing.assert_close(z_values.double(), want, rtol=8 * 2.0**-24, atol=0)
        else:
            torch.testing.assert_close(z_values, want, rtol=1e-15, atol=0)
        dy, dy_kept = torch.zeros_like(y), torch.zeros_like(y)
        _core.som_gram_backward(y.numpy(), n, c, s, 10.0, a_kept.numpy(), dy.numpy(), threads, 0.7, True)
        _core.som_gram_backward(z.numpy(), n, c, s, 10.0, a_kept.numpy(), dy_kept.numpy(), threads, 0.7, True, True)
        if dtype == D64:
            assert torch.equal(dy_kept, dy)
        else:
            torch.testing.assert_close(dy_kept, dy, rtol=1e-6, atol=1e-6 * float(dy.abs().max()))
    with pytest.raises(TypeError, match="z must be"):
        _core.som_penalty(y.numpy(), n, c, s, 10.0, 2.0, 0.5, 1e-12, None, 1, z.to(torch.float16).numpy())
    with pytest.raises(ValueError, match="z has the wrong shape"):
        _core.som_penalty(y.numpy(), n, c, s, 10.0, 2.0, 0.5, 1e-12, None, 1, z[1:].numpy())
    with pytest.raises(ValueError, match="y has the wrong shape"):  # from_z reads Z's layout
        _core.som_gram_backward(z[1:].numpy(), n, c, s, 10.0, a_kept.numpy(), dy_kept.numpy(), 1, 0.7, True, True)
    shared = torch.zeros(n * c * ld, dtype=dtype)  # y and z in one buffer
    with pytest.raises(ValueError, match="overlap"):
        _core.som_penalty(shared[: n * c * s].numpy(), n, c, s, 10.0, 2.0, 0.5, 1e-12, None, 1, shared.numpy())


def test_cpp_penalties_run_every_call_after_checking_them_all():
    """som_penalties(calls, out): each tuple of calls as som_penalty's arguments (float32 and float64 layers, with and
    without A and a kept Z), R of each into out (float32 or float64): the same R, A and Z as one som_penalty call
    each. A bad call anywhere (argument count, y not an array, a wrong shape in the last call) or a bad out raises
    before any call runs: nothing written."""
    from kexue_fast import _core

    g = torch.Generator().manual_seed(5)
    shapes = [((3, 8, 256), torch.float32, True), ((5, 6, 49), D64, False), ((200, 9, 1), torch.float32, True)]
    calls, want = [], []
    for (n, c, s), dtype, keep in shapes:
        y = (torch.randn(n * c * s, generator=g, dtype=D64) * 0.4).to(dtype)
        a, a_want = torch.full((c, c), float("nan"), dtype=D64), torch.empty((c, c), dtype=D64)
        ld = _core.som_z_stride(s, y.element_size())
        z = torch.full((n * c * ld,), float("nan"), dtype=dtype) if keep else None
        z_want = torch.full_like(z, float("nan")) if keep else None
        r = _core.som_penalty(y.numpy(), n, c, s, 10.0, 2.0, 0.5, 1e-12, a_want.numpy(), 1,
                              None if z_want is None else z_want.numpy())  # fmt: skip
        calls.append((y.numpy(), n, c, s, 10.0, 2.0, 0.5, 1e-12, a.numpy(), 1, None if z is None else z.numpy()))
        want.append((r, a, a_want, z, z_want))
    for out_dtype in (np.float64, np.float32):
        for _, _, _, z, _ in want:
            if z is not None:
                z.fill_(float("nan"))
        out = np.full(len(calls), np.nan, dtype=out_dtype)
        _core.som_penalties(calls, out)
        for got, (r, a, a_want, z, z_want) in zip(out, want):
            assert got == np.array(r, dtype=out_dtype)
            assert torch.equal(a, a_want)
            if z is not None:
                assert torch.equal(z.isnan(), z_want.isnan()) and torch.equal(z.nan_to_num(), z_want.nan_to_num())
    z0 = calls[0][10]
    z0.fill(np.nan)
    out = np.full(len(calls), np.nan)
    bad_last = [*calls[:-1], (*calls[-1][:3], calls[-1][3] + 1, *calls[-1][4:])]  # s one too many for its y
    for bad, error, match in ((bad_last, ValueError, "y has the wrong shape"),
                              ([*calls, calls[0][:10]], TypeError, "11 arguments"),
                              ([*calls, list(calls[0])], TypeError, "11 arguments"),
                              ([*calls, (list(calls[0][0]), *calls[0][1:])], TypeError, "y must be")):  # fmt: skip
        with pytest.raises(error, match=match):
            _core.som_penalties(bad, out)
        assert np.isnan(out).all() and np.isnan(z0).all()  # the first call did not run
    for bad_out, error, match in ((np.zeros(len(calls), np.int64), TypeError, "out must be a float32 or float64"),
                                  ([0.0] * len(calls), TypeError, "out must be a float32 or float64"),
                                  (np.zeros(len(calls) + 1), ValueError, "out has the wrong shape")):  # fmt: skip
        with pytest.raises(error, match=match):
            _core.som_penalties(calls, bad_out)
        assert np.isnan(z0).all()
    _core.som_penalties([], np.zeros(0))  # nothing to run


def test_cpp_address_calls_equal_the_array_calls():
    """som_penalties_at and som_gram_backward_at (the training step's calls, on tensors' data_ptr()): the same R, A, Z
    and ∂R/∂Y, bit for bit, as som_penalties and som_gram_backward on the same memory (float32 and float64 layers,
    with and without A and a kept Z; R into a float32 or float64 out, or their float64 sum with total; the backward
    written, added and from Z). Null or misaligned addresses, a wrong tuple and bad sizes raise before anything runs."""
    from kexue_fast import _core

    g = torch.Generator().manual_seed(8)
    layers = [((3, 8, 256), torch.float32, True), ((5, 6, 49), D64, False), ((200, 9, 1), torch.float32, True)]
    ys, calls, arrays = [], [], []
    for (n, c, s), dtype, keep in layers:
        y = (torch.randn(n * c * s, generator=g, dtype=D64) * 0.4).to(dtype)
        ld = _core.som_z_stride(s, y.element_size())
        a, a_want = torch.full((c, c), float("nan"), dtype=D64), torch.full((c, c), float("nan"), dtype=D64)
        z = torch.zeros(n * c * ld, dtype=dtype) if keep else None
        z_want = torch.zeros(n * c * ld, dtype=dtype) if keep else None
        ys.append((y, a, a_want, z, z_want))
        calls.append((y.data_ptr(), dtype is D64, n, c, s, 10.0, 2.0, 0.5, 1e-12, a.data_ptr(), 1,
                      0 if z is None else z.data_ptr()))  # fmt: skip
        arrays.append((y.numpy(), n, c, s, 10.0, 2.0, 0.5, 1e-12, a_want.numpy(), 1,
                       None if z_want is None else z_want.numpy()))  # fmt: skip
    want = np.zeros(len(calls))
    _core.som_penalties(arrays, want)
    for dtype in (torch.float32, D64):
        out = torch.full((len(calls),), float("nan"), dtype=dtype)
        _core.som_penalties_at(calls, out.data_ptr(), dtype is D64)
        assert torch.equal(out, torch.from_numpy(want).to(dtype))
        total = torch.full((), float("nan"), dtype=dtype)
        _core.som_penalties_at(calls, total.data_ptr(), dtype is D64, True)
        assert total.item() == torch.tensor(sum(want.tolist()), dtype=D64).to(dtype).item()
    for _, a, a_want, z, z_want in ys:
        assert torch.equal(a, a_want) and (z is None or torch.equal(z, z_want))
    no_a = [(*call[:9], 0, *call[10:]) for call in calls]  # R alone: no A written
    a0 = ys[0][1].clone()
    ys[0][1].fill_(float("nan"))
    _core.som_penalties_at(no_a, out.data_ptr(), True)
    assert torch.equal(out, torch.from_numpy(want)) and ys[0][1].isnan().all()
    ys[0][1].copy_(a0)
    for ((n, c, s), dtype, keep), (y, a, _, z, _) in zip(layers, ys):
        source = z if keep else y
        for add in (False, True):
            dy = torch.randn(n * c * s, generator=g, dtype=D64).to(dtype)
            dy_want = dy.clone()
            _core.som_gram_backward(source.numpy(), n, c, s, 10.0, a.numpy(), dy_want.numpy(), 1, 0.7, add, keep)
            _core.som_gram_backward_at(source.data_ptr(), dtype is D64, n, c, s, 10.0, a.data_ptr(), dy.data_ptr(), 1,
                                       0.7, add, keep)  # fmt: skip
            assert torch.equal(dy, dy_want)
    y, a = ys[0][0], ys[0][1]
    out = torch.full((len(calls),), float("nan"))
    for bad, error, match in (([(0, *calls[0][1:])], ValueError, "y must be a non-null address"),
                              ([(calls[0][0] + 2, *calls[0][1:])], ValueError, "y is not aligned"),
                              ([(*calls[0][:9], calls[0][9] + 4, *calls[0][10:])], ValueError, "a is not aligned"),
                              ([*calls, calls[0][:11]], TypeError, "12 arguments"),
                              ([(*calls[0][:3], 0, *calls[0][4:])], ValueError, "must be >= 1"),
                              ([(*calls[0][:6], -1.0, *calls[0][7:])], ValueError, "lambda1")):  # fmt: skip
        with pytest.raises(error, match=match):
            _core.som_penalties_at([*calls, *bad], out.data_ptr(), False)
        assert out.isnan().all()  # checked first: no call ran
    with pytest.raises(ValueError, match="out must be a non-null address"):
        _core.som_penalties_at(calls, 0, False)
    with pytest.raises(ValueError, match="out is not aligned"):
        _core.som_penalties_at(calls, out.data_ptr() + 2, False)
    dy = torch.zeros(3 * 8 * 256)
    for args, match in (((0, a.data_ptr(), dy.data_ptr()), "y must be"),
                        ((y.data_ptr(), 0, dy.data_ptr()), "a must be"),
                        ((y.data_ptr(), a.data_ptr(), 0), "dy must be"),
                        ((y.data_ptr(), a.data_ptr(), dy.data_ptr() + 1), "dy is not aligned")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            _core.som_gram_backward_at(args[0], False, 3, 8, 256, 10.0, args[1], args[2], 1, 1.0, False, False)
    with pytest.raises(ValueError, match="gamma"):
        _core.som_gram_backward_at(y.data_ptr(), False, 3, 8, 256, 0.0, a.data_ptr(), dy.data_ptr(), 1, 1.0, False,
                                   False)  # fmt: skip
    assert not dy.any()


@pytest.mark.parametrize("scale", [1e-6, 1e-9, 1e-12])
def test_cpp_gram_keeps_relative_accuracy_for_tiny_inputs(scale):
    """Θ normalizes Z's columns, so tanh(γy) needs relative accuracy where γy is tiny (the C++ tanh goes through an
    accurate expm1, not (1 − e)/(1 + e)): float64 R and ∂R/∂Y equal the torch path's to 1e-12, also with one
    near-dead channel among normal ones."""
    g = torch.Generator().manual_seed(9)
    for y in (
        torch.randn(40, 6, 3, dtype=D64, generator=g) * scale,
        torch.randn(40, 6, 3, dtype=D64, generator=g) * torch.tensor([1, 1, scale, 1, 1, 1])[:, None],
    ):
        got, want = [], []
        for backend, out in (("cpp", got), ("torch", want)):
            yy = y.clone().requires_grad_()
            r = som_regularizer(yy, backend=backend)
            out += [r.detach(), torch.autograd.grad(r, yy)[0]]
        assert _rel(got[0], want[0]) <= 1e-12 and _rel(got[1], want[1]) <= 1e-12


@pytest.mark.parametrize("scale", [1e-6, 1e-9, 1e-12])
def test_cpp_float32_tanh_keeps_relative_accuracy_for_tiny_inputs(scale):
    """The float32 C++ tanh (csrc/ortho/scaled_tanh.cpp: a rational with a refined reciprocal under AVX2, the expm1
    form elsewhere) keeps relative accuracy near 0: R and ∂R/∂Y of tiny inputs within 1e-5 of the float64 truth."""
    g = torch.Generator().manual_seed(11)
    y = torch.randn(40, 6, 37, dtype=D64, generator=g) * scale  # 37 positions: the vector loop and its masked tail
    assert _float32_error(y, "cpp") <= 1e-5


def _float32_error(y: torch.Tensor, backend: str) -> float:
    """The larger relative error of R and ∂R/∂Y computed from y in float32 on `backend`, against float64 (torch)."""
    y64 = y.clone().requires_grad_()
    truth = som_regularizer(y64, backend="torch")
    grad_truth = torch.autograd.grad(truth, y64)[0]
    y32 = y.float().requires_grad_()
    got = som_regularizer(y32, backend=backend)
    grad = torch.autograd.grad(got, y32)[0]
    return max(_rel(got.double(), truth), _rel(grad.double(), grad_truth))


@pytest.mark.parametrize("shape", [(40, 6, 37), (3, 50)])  # the Gram route and the b < k route
@pytest.mark.parametrize("scale", [1e-9, 1e-12])
def test_torch_float32_redoes_tiny_columns_with_the_exact_tanh(shape, scale, monkeypatch):
    """The torch path's CPU float32 tanh is 2σ(2γy) − 1 (absolute error ~2 ulp(1), and 0 for |γy| < ~3e-8): columns
    of Z with rms below som.SIGMOID_MIN_RMS are redone with torch.tanh, so tiny layers (and one tiny channel among
    normal ones) keep R and ∂R/∂Y within 1e-5 of the float64 truth, or within 2× the direct float32 formula's error
    where float32 itself does worse (all tiny at 1e-12: channel 2's column norm is below eps, and its gradient,
    scaled by 1/eps, sums terms that cancel, so the error depends on the summation order: 1.5e-5 against the fixed
    1e-5 bar on a lent H200 machine's CPU, torch 2.11, benchmarks/results/gpu-tests-cuda.md); normal columns never
    take the slow tanh."""
    from kexue_fast.ortho import som as som_module

    exact_calls = []
    tanh = som_module._tanh
    monkeypatch.setattr(som_module, "_tanh", lambda y, g, exact=False: exact_calls.append(exact) or tanh(y, g, exact))
    g = torch.Generator().manual_seed(5)
    y = torch.randn(*shape, dtype=D64, generator=g)
    y = y.sign() * (0.2 + y.abs())  # |γy| ≥ 2, |z| > 0.96: every column far above SIGMOID_MIN_RMS, 3-row ones too
    for case in ("normal", "one tiny channel", "all tiny"):
        if case == "one tiny channel":
            y[:, 2] *= scale
        elif case == "all tiny":
            y *= scale
        bar = max(1e-5, 2 * max(_float32_errors(y, "direct")))
        exact_calls.clear()
        assert _float32_error(y, "torch") <= bar, case
        assert any(exact_calls) == (case != "normal"), case


def _float32_errors(y: torch.Tensor, backend: str):
    """(R error, ∂R/∂Y error) of float32 on `backend` ("direct": the definition, reference.som_direct, in float32),
    relative to the float64 truth."""
    y64 = y.clone().requires_grad_()
    truth = som_regularizer(y64, backend="torch")
    grad_truth = torch.autograd.grad(truth, y64)[0]
    y32 = y.float().requires_grad_()
    got = reference.som_direct(_rows(y32, 1)) if backend == "direct" else som_regularizer(y32, backend=backend)
    grad = torch.autograd.grad(got, y32)[0]
    return _rel(got.detach().double(), truth.detach()), _rel(grad.double(), grad_truth)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("scale", [3e-4, 3e-3, 3e-2, 0.3])
def test_float32_error_across_activation_scales(backend, scale):
    """R and ∂R/∂Y in float32 within 2× the direct float32 formula's error (floor 1e-6) whatever the activations'
    scale: on the torch path, columns of Z below som.SIGMOID_MIN_RMS are redone with the exact tanh (with 2.4e-3, the
    threshold before, this fails at the small scales: the sigmoid form's absolute error, relative to small columns,
    survives the column normalization and R's sums)."""
    for shape in ((64, 8), (6, 5, 4, 4)):
        for seed in range(8):
            y = torch.randn(*shape, dtype=D64, generator=torch.Generator().manual_seed(seed)) * scale
            direct = _float32_errors(y, "direct")
            for got, bar in zip(_float32_errors(y, backend), direct):
                assert got <= 2 * max(bar, 1e-6), (shape, seed, got, bar)


@pytest.mark.parametrize("gamma", [100.0, 1e6])
def test_cpp_float32_gradient_of_saturated_units_is_zero(gamma):
    """Where |γy| ≥ 9.0109 float32's tanh is ±1 exactly, so 1 − Z² and ∂R/∂Y are 0 there, as on the torch path; the
    C++ tanh once held its clamped value 1 − 1.8e-7 beyond 7.905 and gave every saturated unit a gradient."""
    y = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0))
    y = y.sign() * (0.1 + y.abs())  # |γy| ≥ 10
    grads = []
    for backend in ("torch", "cpp"):
        yy = y.clone().requires_grad_()
        r = som_regularizer(yy, gamma=gamma, backend=backend)
        grads.append(torch.autograd.grad(r, yy)[0])
    assert torch.equal(grads[0], torch.zeros_like(y)) and torch.equal(grads[1], grads[0])
    # one unit left unsaturated: its gradient alone, the same on both backends
    y[1, 2, 3, 4] = 0.5 / gamma
    grads = []
    for backend in ("torch", "cpp"):
        yy = y.clone().requires_grad_()
        grads.append(torch.autograd.grad(som_regularizer(yy, gamma=gamma, backend=backend), yy)[0])
    assert torch.count_nonzero(grads[1]) == 1 and _rel(grads[1], grads[0]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_cpp_tanh_of_infinities_is_one_and_nan_stays_nan(dtype):
    """tanh(±inf) = ±1 as on the torch path (the C++ expm1 reduction alone gave NaN there); a NaN in Y gives NaN, and
    NaN gradients under a zero weight too, as on the torch path (0·NaN; the C++ route once returned zeros there)."""
    y = torch.randn(8, 4, 5, dtype=dtype, generator=torch.Generator().manual_seed(3))
    y[0, 1, 2], y[1, 2, 3] = float("inf"), -float("inf")
    want = som_regularizer(y, backend="torch")
    assert torch.isfinite(want) and _rel(som_regularizer(y, backend="cpp").double(), want.double()) <= 1e-5
    y[2, 0, 0] = float("nan")
    assert torch.isnan(som_regularizer(y, backend="cpp"))
    nans = []
    for backend in ("torch", "cpp"):
        yy = y.clone().requires_grad_()
        nans.append(torch.isnan(torch.autograd.grad(0.0 * som_regularizer(yy, backend=backend), yy)[0]))
    assert nans[0].any() and torch.equal(nans[0], nans[1])


def test_cpp_in_place_changes_of_y_before_backward(monkeypatch):
    """The C++ backend saves the forward's Z (KEEP_Z), as the torch path does: Y modified in place between the
    regularizer and backward changes nothing (the gradient is the torch path's, of the Y the forward saw). With
    KEEP_Z = False it saves Y and recomputes Z: then that is autograd's usual in-place error (documented), never a
    wrong gradient."""
    from kexue_fast.ortho import som as som_module

    y0 = torch.randn(16, 4, 3, 3, dtype=torch.float64)
    grads = {}
    for backend, keep in (("torch", True), ("cpp", True), ("cpp", False)):
        monkeypatch.setattr(som_module, "KEEP_Z", keep)
        h = y0.clone().requires_grad_()
        hh = h * 1.0
        r = som_regularizer(hh, backend=backend)
        torch.relu_(hh)
        if keep:
            (r + hh.sum()).backward()
            grads[backend] = h.grad
        else:
            with pytest.raises(RuntimeError, match="inplace"):
                (r + hh.sum()).backward()
    torch.testing.assert_close(grads["cpp"], grads["torch"], rtol=1e-10, atol=1e-12)


def test_cpp_is_what_auto_runs_on_cpu_and_compile_takes_torch(monkeypatch):
    import kexue_fast._core
    from kexue_fast.ortho import som as som_module

    calls = []
    penalties = kexue_fast._core.som_penalties_at  # the C++ route's one call per forward (every layer)
    monkeypatch.setattr(kexue_fast._core, "som_penalties_at", lambda *a, **k: calls.append(1) or penalties(*a, **k))
    monkeypatch.delenv("KEXUE_FAST_BACKEND", raising=False)
    y = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        eager = som_regularizer(y)
        assert len(calls) == 1
        compiled = torch.compile(lambda y: som_regularizer(y), fullgraph=True, backend="aot_eager")(y)
        # two float32 routes of a sum that cancels: each carries float32 rounding amplified by it (unseeded data and
        # 1e-5 between them failed once in CI)
        assert len(calls) == 1 and torch.allclose(compiled, eager, rtol=1e-4)
        torch.set_num_threads(som_module.CPP_MAX_TORCH_THREADS)
        som_regularizer(y)
        assert len(calls) == 2
        torch.set_num_threads(som_module.CPP_MAX_TORCH_THREADS + 1)  # more: auto leaves the Gram to torch
        som_regularizer(y)
        assert len(calls) == 2
        som_regularizer(y, backend="cpp")
        assert len(calls) == 3
        som_regularizer(y.to(torch.bfloat16), backend="cpp")  # half precision: computed in float32
        assert len(calls) == 4
        with pytest.raises(Exception, match=r"cannot run som_regularizer under torch\.compile"):  # (dynamo wraps it)
            torch.compile(lambda y: som_regularizer(y, backend="cpp"), fullgraph=True, backend="aot_eager")(y)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [2, 3])
def test_cpp_gram_over_threads_is_deterministic_and_agrees(threads, monkeypatch):
    from kexue_fast.ortho import som

    g = torch.Generator().manual_seed(12)
    ys = [torch.randn(7, 9, 40, dtype=D64, generator=g), torch.randn(500, 6, dtype=D64, generator=g)]
    results = {}
    for n in (1, threads, threads):
        monkeypatch.setattr(som, "CPP_THREADS", n)
        leaves = [y.clone().requires_grad_() for y in ys]
        r = som_regularizer(leaves, backend="cpp")
        results.setdefault(n, []).append([r.detach(), *torch.autograd.grad(r, leaves)])
    first, second = results[threads]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(_rel(a, b) <= 1e-12 for a, b in zip(first, results[1][0]))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-4), (torch.float16, 1e-4)])
def test_low_precision_inputs_are_computed_in_float32(dtype, tol):
    g = torch.Generator().manual_seed(3)
    y = (torch.randn(300, 16, generator=g) * 0.2).to(dtype)
    got = som_regularizer(y, backend="torch")
    assert got.dtype == torch.float32
    assert _rel(got, reference.som_direct(y.double())) <= tol


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_dead_unit_matches_reference(backend):
    g = torch.Generator().manual_seed(4)
    y = torch.randn(20, 6, dtype=D64, generator=g)
    y[:, 2] = 0  # a column with tanh(γy) = 0: ẑ = 0, no contribution
    ours = som_regularizer(y, backend=backend)
    assert torch.isfinite(ours) and abs(float(ours - reference.som_direct(y))) <= 1e-12 * float(ours)


def test_cpp_penalty_matches_torch_with_clamped_columns():
    """The C++ penalty and its closed-form A (csrc/ortho/som_gram.cpp som_penalty) against the torch path's
    (_GramPenalty) where columns are clamped (‖tanh(γy_j)‖ < eps: one zero, one tiny but nonzero, scaled by 1/eps) or
    unclamped: R and ∂R/∂Y equal to 1e-12 in float64."""
    g = torch.Generator().manual_seed(8)
    y = torch.randn(20, 6, 3, dtype=D64, generator=g)
    y[:, 2] = 0
    y[:, 4] *= 1e-15  # G_44 ~ 6e-27 < eps² = 1e-24
    results = []
    for backend in ("torch", "cpp"):
        yy = y.clone().requires_grad_()
        r = som_regularizer(yy, backend=backend)
        results.append((r.detach(), torch.autograd.grad(r * 0.7, yy)[0]))
    (rt, gt), (rc, gc) = results
    assert _rel(rc, rt) <= 1e-12 and _rel(gc, gt) <= 1e-12


def test_cpp_route_zero_weight_and_no_grad():
    """A zero upstream weight gives a zero gradient (the C++ pass skipped, not an unused input); without inputs that
    need a gradient the C++ route skips A and still returns R."""
    g = torch.Generator().manual_seed(12)
    y = torch.randn(8, 3, 5, dtype=D64, generator=g).requires_grad_()
    want = som_regularizer(y.detach(), backend="torch")
    r = som_regularizer(y, backend="cpp")
    assert torch.equal(torch.autograd.grad(r * 0.0, y)[0], torch.zeros_like(y))
    assert _rel(som_regularizer(y.detach(), backend="cpp"), want) <= 1e-12
    with torch.no_grad():
        assert _rel(som_regularizer(y, backend="cpp"), want) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cpu_inputs_under_another_default_device(backend):
    """CPU layer outputs while torch's default device is another (here meta): the CPU paths make their own buffers on
    the CPU (the cached constant of the sigmoid form, kept ∂R/∂Y buffers, the C++ route's A and R)."""
    from kexue_fast.ortho import som as som_module

    g = torch.Generator().manual_seed(13)
    y = torch.randn(8, 3, 5, generator=g).requires_grad_()
    want = som_regularizer(y.detach().double(), backend="torch")
    som_module._one.cache_clear()  # made under the meta default device below, as a first call would
    with torch.device("meta"):
        r = som_regularizer(y, backend=backend)
        grad = torch.autograd.grad(r, y)[0]
    assert r.device.type == grad.device.type == "cpu" and _rel(r.double(), want) <= 1e-5


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(12 * 3 * 3, 10),
    ).double()  # fmt: skip


def test_module_records_hooked_outputs_and_clears_them():
    model = _cnn()
    x = torch.randn(4, 3, 8, 8, dtype=D64)
    som = SelfOrthogonality(model, ["0", model[2], "5"], gamma=3.0, lambda1=10.0, lambda2=2.0)
    assert som.layer_names == ["0", "2", "5"]
    model(x)
    with torch.no_grad():
        model(x)  # not recorded: no gradients
    model.eval()
    model(x)  # not recorded: eval mode
    model.train()
    assert len(som.recorder.records) == 3
    a = model[0](x)
    b = model[2](torch.relu(a))
    c = model[5](torch.relu(b).flatten(1))  # the same outputs again, recorded as three more
    refs = [reference.som_direct(_rows(t, d), 3.0, 10.0, 2.0) for t, d in ((a, 1), (b, 1), (c, -1))]
    per = som.loss(reduction="none")
    assert per.shape == (6,)
    for i, ref in enumerate(refs + refs):
        assert abs(float((per[i] - ref).detach())) <= 1e-12 * float(ref.detach())
    with pytest.raises(RuntimeError, match="recorded no outputs"):
        som.loss()
    model(x)
    loss = som()
    loss.backward()
    assert all(p.grad is not None for p in model[0].parameters())
    som.remove()
    model(x)
    assert som.recorder.records == []


def test_module_default_layers_and_context_manager():
    model = _cnn()
    with SelfOrthogonality(model) as som:
        assert som.layer_names == ["0", "2"]  # every convolution
        model(torch.randn(2, 3, 8, 8, dtype=D64))
        assert som.loss(clear=False) == som.loss()
    assert som.recorder._handles == []
    recorder = OutputRecorder(model, nn.Linear, record_in_eval=True)
    model.eval()
    with torch.enable_grad():
        model(torch.randn(2, 3, 8, 8, dtype=D64))
    assert [d for _, d in recorder.take()] == [-1] and recorder.records == []
    recorder.remove()


def test_module_follows_the_model_to_float32():
    model = _cnn().float()
    som = SelfOrthogonality(model)
    model(torch.randn(2, 3, 8, 8))
    assert som.loss().dtype == torch.float32


@pytest.mark.parametrize("shape", [(1, 5), (6, 6), (7, 3), (3, 7), (16, 3, 3, 3), (4, 8, 3, 3), (65, 63)])
def test_weight_regularizers_equal_their_direct_formulas(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, dtype=D64, generator=g).requires_grad_()
    for ours, ref in (
        (biggan_orthogonal_regularizer(w, beta=0.3), reference.biggan_orthogonal_direct(w, 0.3)),
        (orthogonality_penalty(w, strength=2.0), reference.orthogonality_direct(w, 2.0)),
    ):
        assert abs(float((ours - ref).detach())) <= 1e-12 * max(float(ref.detach()), 1.0)
        if ref.requires_grad and float(ref.detach()) > 0:
            assert _rel(torch.autograd.grad(ours, w)[0], torch.autograd.grad(ref, w)[0]) <= 1e-11


@torch.no_grad()
def test_weight_regularizers_on_a_module_and_orthogonal_weights():
    model = _cnn()
    expected = sum(reference.orthogonality_direct(p) for p in model.parameters() if p.ndim >= 2)
    assert abs(float(orthogonality_penalty(model) - expected)) <= 1e-12 * float(expected)
    q, _ = torch.linalg.qr(torch.randn(9, 4, dtype=D64))
    assert float(orthogonality_penalty(q.T)) <= 1e-28 and float(biggan_orthogonal_regularizer(q.T)) <= 1e-28
    # BigGAN ignores the norms: scaled orthogonal filters are free
    assert float(biggan_orthogonal_regularizer(q.T * torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=D64))) <= 1e-26


def test_bad_inputs_raise_clear_errors():
    y = torch.randn(8, 4)
    for kwargs, match in [
        ({"gamma": 0.0}, "gamma must be > 0"),
        ({"gamma": -1.0}, "gamma must be > 0"),
        ({"gamma": float("inf")}, "gamma must be a finite"),
        ({"lambda1": -1.0}, "lambda1 must be >= 0"),
        ({"lambda2": float("nan")}, "lambda2 must be a finite"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"eps": 1e-200}, "eps² must not underflow"),
        ({"reduction": "mean"}, "reduction"),
        ({"channel_dim": 2}, "channel_dim"),
        ({"channel_dim": [1, 1]}, "channel_dim has 2 entries"),
    ]:
        with pytest.raises(ValueError, match=match):
            som_regularizer(y, **kwargs)
    with pytest.raises(TypeError, match="y must be a tensor"):
        som_regularizer(y.numpy())
    with pytest.raises(TypeError, match=r"y\[0\] must be float32"):
        som_regularizer(y.long())
    with pytest.raises(ValueError, match="ndim >= 2"):
        som_regularizer(torch.randn(5))
    with pytest.raises(ValueError, match="empty"):
        som_regularizer(torch.randn(0, 4))
    with pytest.raises(ValueError, match="at least one"):
        som_regularizer([])
    with pytest.raises(ValueError, match="backend must be"):
        som_regularizer(y, backend="cuda")
    with pytest.raises(NotImplementedError, match="cpp"):
        som_regularizer(y.to("meta"), backend="cpp")  # the C++ core runs on CPU tensors
    meta = som_regularizer(y.to("meta"), backend="torch")  # shape inference on meta tensors (no autocast there)
    assert meta.device.type == "meta" and meta.shape == ()
    model = _cnn()
    with pytest.raises(ValueError, match="no submodule named"):
        SelfOrthogonality(model, ["nope"])
    with pytest.raises(ValueError, match="not a submodule"):
        SelfOrthogonality(model, [nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="no module of type"):
        SelfOrthogonality(model, nn.LSTM)
    with pytest.raises(ValueError, match="gamma"):
        SelfOrthogonality(model, gamma=0)
    with pytest.raises(ValueError, match="backend must be"):
        SelfOrthogonality(model, backend="bogus")  # at construction, not at the first loss()
    for bad in (1.5, True, "1"):
        with pytest.raises(TypeError, match="channel_dim must be"):
            SelfOrthogonality(model, channel_dim=bad)
    with pytest.raises(ValueError, match="channel_dim must be"):
        SelfOrthogonality(model, channel_dim=[1, True])
    with pytest.raises(TypeError, match="model must be"):
        SelfOrthogonality("model")
    with pytest.raises(ValueError, match="beta"):
        biggan_orthogonal_regularizer(torch.randn(3, 3), beta=-1.0)
    with pytest.raises(ValueError, match="ndim >= 2"):
        orthogonality_penalty(torch.randn(3))
    with pytest.raises(TypeError, match="floating"):
        orthogonality_penalty(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no weights"):
        orthogonality_penalty(nn.ReLU())


@pytest.mark.slow
def test_torch_compile_fullgraph_torch_path():
    compiled = torch.compile(lambda y: som_regularizer(y, backend="torch"), fullgraph=True)
    for batch in (4, 3):  # the second batch size recompiles with a symbolic batch (the backward's views follow it)
        y = torch.randn(batch, 6, 5, 5, requires_grad=True)
        value = compiled(y)
        (grad,) = torch.autograd.grad(value, y)
        y2 = y.detach().requires_grad_()
        eager = som_regularizer(y2, backend="torch")
        (eager_grad,) = torch.autograd.grad(eager, y2)
        assert _rel(value, eager) <= 1e-5 and _rel(grad, eager_grad) <= 1e-4


def test_autocast_keeps_the_grams_in_float32():
    g = torch.Generator().manual_seed(12)
    y = (torch.randn(64, 16, generator=g) * 0.2).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram_route = som_regularizer(y, backend="torch")
        rows_route = som_regularizer(y[:8], backend="torch")  # b < k: the ẐẐᵀ route
    assert gram_route.dtype == rows_route.dtype == torch.float32
    assert _rel(gram_route, reference.som_direct(y.double())) <= 1e-5  # bf16 Grams would be ~1e-3 off
    assert _rel(rows_route, reference.som_direct(y[:8].double())) <= 1e-5


def test_enabled_false_pauses_recording():
    """som.enabled = False: forwards record nothing (loss() then says so); True records again; the setting survives
    a deep copy."""
    import copy

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3))
    som = SelfOrthogonality(model)
    x = torch.randn(2, 3, 8, 8)
    som.enabled = False
    model(x)
    assert som.recorder.records == [] and not som.enabled
    with pytest.raises(RuntimeError, match="recorded no outputs"):
        som.loss()
    copied_model, copied = copy.deepcopy((model, som))
    copied_model(x)
    assert not copied.enabled and copied.recorder.records == []
    som.enabled = True
    model(x)
    assert len(som.recorder.records) == 2 and torch.isfinite(som.loss())


def test_paused_gan_generator_step_leaves_no_stale_record():
    """A discriminator run in the generator step under som.paused() records nothing: the next loss() has only the
    discriminator step's records (unpaused, the generator step's freed graph broke that loss's backward)."""
    torch.manual_seed(0)
    disc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 1))  # fmt: skip
    som = SelfOrthogonality(disc)
    x = torch.randn(4, 3, 8, 8)
    with som.paused():
        disc(x).mean().backward()  # the generator step
    assert som.enabled and som.recorder.records == []
    out = disc(x)
    (out.mean() + som.loss()).backward()
    disc(x).mean().backward()  # unpaused: recorded, and its graph freed
    disc(x)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        som.loss(reduction="none").sum().backward()
    som.enabled = False
    with pytest.raises(ValueError, match="boom"), som.paused():
        raise ValueError("boom")
    assert not som.enabled  # restored to what it was


def test_activation_checkpointing_records_each_forward_once():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    som = SelfOrthogonality(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for _ in range(3):  # the recompute inside backward must not leave a stale record for the next step
        out = checkpoint(model, x, use_reentrant=False)
        assert len(som.recorder.records) == 2
        (out.square().mean() + som.loss()).backward()
        assert som.recorder.records == []
    model2 = nn.Sequential(nn.Conv2d(3, 8, 3))
    som2 = SelfOrthogonality(model2)
    out = checkpoint(model2, x, use_reentrant=True)  # its forward runs without gradients: nothing to regularize
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        som2.loss()
    out.sum().backward()
    assert som2.recorder.records == []


class _Wrapper(nn.Module):  # module level: pickled by reference
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3))
        self.som = SelfOrthogonality(self.net)


def test_copies_and_pickles_of_hooked_models():
    import copy
    import io

    x = torch.randn(2, 3, 8, 8)
    original = _Wrapper()
    copied = copy.deepcopy(original)
    copied.net(x)
    assert len(copied.som.recorder.records) == 1 and original.som.recorder.records == []
    original.net(x)
    assert len(original.som.recorder.records) == 1 and len(copied.som.recorder.records) == 1
    ema = copy.deepcopy(original.net)  # the model alone: not hooked, feeds no recorder
    ema(x)
    assert len(original.som.recorder.records) == 1
    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.net(x)
    assert len(loaded.som.recorder.records) == 1 and len(original.som.recorder.records) == 1
    torch.save(original.net, io.BytesIO())
    # each copy kept the copied hook beside the one its recorder attached (2, 3, 4 … hooks after copies of copies,
    # which remove() never took off), and a copied model alone kept one for good: a layer with a hook counts as
    # hooked (the i-ResNet block's fast paths step aside for hooks)
    conv = lambda model: model.net[0]  # noqa: E731
    again = loaded
    for _ in range(3):
        buffer = io.BytesIO()
        torch.save(again, buffer)
        buffer.seek(0)
        again = torch.load(buffer, weights_only=False)
    assert len(conv(again)._forward_hooks) == 1
    again.som.remove()
    assert len(conv(again)._forward_hooks) == 0
    assert len(ema[0]._forward_hooks) == 0  # the model-alone copy dropped its inactive hook at its first forward


def test_tall_weight_regularizers_do_not_cancel_in_float32():
    torch.manual_seed(0)
    for m, n in ((64, 16), (512, 256)):
        w = torch.zeros(m, n)
        w[:n] = torch.eye(n)
        w = w + 1e-3 * torch.randn(m, n)  # nearly orthogonal rows: the n×n identities subtract nearly equal terms
        for ours, ref in (
            (biggan_orthogonal_regularizer(w, beta=1.0), reference.biggan_orthogonal_direct(w.double(), 1.0)),
            (orthogonality_penalty(w), reference.orthogonality_direct(w.double())),
        ):
            assert ours.dtype == torch.float32
            assert abs(float(ours) - float(ref)) <= 1e-6 * float(ref)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_cpu_backward_buffers_are_reused_only_when_free(backend, monkeypatch):
    """The CPU backward's ∂R/∂Y buffers are kept for the next call (kexue_fast.ortho.workspace), but one still held
    (by the caller, as a leaf's .grad) is never handed out again, nor one moved to shared memory. (KEEP_Z off: its Z
    buffers come from the same pool; test_cpp_kept_z_buffers_are_reused_only_when_free.)"""
    from kexue_fast.ortho import som as som_module
    from kexue_fast.ortho import workspace

    monkeypatch.setattr(som_module, "KEEP_Z", False)
    workspace.release()
    g = torch.Generator().manual_seed(3)
    shape = (3, 5, 7)

    def grad_of(y):
        return torch.autograd.grad(som_regularizer(y, backend=backend), y)[0]

    g1 = grad_of(torch.randn(shape, generator=g).requires_grad_())
    held = g1.clone()
    g2 = grad_of(torch.randn(shape, generator=g).requires_grad_())
    assert torch.equal(g1, held) and g1.data_ptr() != g2.data_ptr()
    freed = g2.data_ptr()
    del g2
    g3 = grad_of(torch.randn(shape, generator=g).requires_grad_())
    assert g3.data_ptr() == freed  # free again: handed out again
    assert torch.equal(g1, held)
    leaf = torch.randn(shape, generator=g).requires_grad_()
    som_regularizer(leaf, backend=backend).backward()  # autograd may take the alias over as .grad: still protected
    first = leaf.grad.clone()
    del g1, g3
    for _ in range(3):
        grad_of(torch.randn(shape, generator=g).requires_grad_())
    assert torch.equal(leaf.grad, first)
    som_regularizer(leaf, backend=backend).backward()
    assert torch.allclose(leaf.grad, 2 * first, rtol=1e-6, atol=0)
    shared = grad_of(torch.randn(shape, generator=g).requires_grad_())
    shared.share_memory_()  # as multiprocessing does to send it: other processes may map it, no use count sees them
    del shared
    grad_of(torch.randn(shape, generator=g).requires_grad_())
    assert not any(b.untyped_storage().is_shared() for bufs in workspace._buffers.values() for b in bufs)
    assert workspace.kept_bytes() > 0
    workspace.release()
    assert workspace.kept_bytes() == 0
    monkeypatch.setattr(workspace, "MAX_BYTES", 64)  # larger than the cap: handed out, not kept
    grad_of(torch.randn(shape, generator=g).requires_grad_())
    assert workspace.kept_bytes() == 0
    size = 3 * 5 * 7 * 4
    monkeypatch.setattr(workspace, "MAX_BYTES", size)  # room for one: a buffer in use is never dropped for another
    held = workspace.grad_buffer(torch.Size(shape), torch.float32)
    other = workspace.grad_buffer(torch.Size((7, 5, 3)), torch.float32)
    assert workspace.kept_bytes() == size and list(workspace._buffers) == [(shape, torch.float32)]
    del held, other
    workspace.grad_buffer(torch.Size((7, 5, 3)), torch.float32)  # the free one goes, the new one is kept
    assert workspace.kept_bytes() == size and list(workspace._buffers) == [((7, 5, 3), torch.float32)]
    workspace.release()


@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (40, 7)])
def test_cpp_kept_z_buffers_are_reused_only_when_free(shape):
    """KEEP_Z: each forward's Z goes into a kept buffer, saved for the backward: a pending graph's Z is never handed
    to another forward (two graphs alive, each gradient its own, equal to the torch path's), and once a graph is
    freed its buffer serves the next forward (no new memory per step)."""
    from kexue_fast.ortho import workspace

    workspace.release()
    g = torch.Generator().manual_seed(5)
    ys = [torch.randn(shape, generator=g, dtype=D64).requires_grad_() for _ in range(3)]
    expect = [torch.autograd.grad(som_regularizer(y, backend="torch"), y)[0] for y in ys]
    held = len(workspace._buffers.get((shape, D64), []))  # the torch path's ∂R/∂Y (`expect` holds them)
    pending = [som_regularizer(y, backend="cpp") for y in ys[:2]]  # two graphs alive: two Z buffers
    assert len(workspace._buffers[(shape, D64)]) == held + 2
    for r, y, e in zip(pending, ys, expect):
        torch.testing.assert_close(torch.autograd.grad(r, y)[0], e, rtol=1e-10, atol=1e-12)
    del pending, r
    kept = workspace.kept_bytes()
    for _ in range(3):  # graphs freed: their buffers serve again (Z and ∂R/∂Y), nothing new is kept
        got = torch.autograd.grad(som_regularizer(ys[2], backend="cpp"), ys[2])[0]
        torch.testing.assert_close(got, expect[2], rtol=1e-10, atol=1e-12)
        del got
    assert workspace.kept_bytes() == kept
    workspace.release()


def test_recorder_keeps_the_outputs_themselves_unless_asked_for_aliases():
    model = _cnn()
    x = torch.randn(2, 3, 8, 8, dtype=D64)
    outputs = []
    handle = model[0].register_forward_hook(lambda m, i, o: outputs.append(o))
    for alias in (False, True):
        recorder = OutputRecorder(model, ["0"], alias_outputs=alias)
        out = model(x).sum()
        (rec, _), own = recorder.take()[0], outputs.pop()
        assert (rec is own) != alias and torch.equal(rec, own)
        grad = torch.autograd.grad(out, rec, allow_unused=True)[0]
        assert (grad is None) == alias  # an alias is off the model's path
        recorder.remove()
    handle.remove()


class _ConvThenReluInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3)

    def forward(self, x):
        return self.head(torch.relu_(self.conv(x)))


def test_module_refuses_outputs_modified_in_place_after_the_layer():
    """An in-place ReLU right after a hooked conv overwrites the recorded output before loss() reads it: loss()
    raises (naming the layer) instead of regularizing relu(Y) (the records once gave R of relu(Y) silently); where
    the model is an nn.Sequential with an inplace=True module after the layer, the constructor refuses it already
    (under torch.compile, which functionalizes the op, loss() regularized relu(Y) without a word). After a
    BatchNorm, an in-place ReLU is fine: it modifies another tensor."""
    x = torch.randn(2, 3, 8, 8, dtype=D64)
    for backend in ("torch", "cpp"):
        sequential = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(inplace=True), nn.Conv2d(6, 4, 3)).double()
        with pytest.raises(ValueError, match=r"layer '0' is followed by '1' \(inplace=True\)"):
            SelfOrthogonality(sequential, backend=backend)
        assert not sequential[0]._forward_hooks  # the refused module's hooks were removed
        model = _ConvThenReluInPlace().double()
        som = SelfOrthogonality(model, ["conv"], backend=backend)
        model(x)
        with pytest.raises(RuntimeError, match=r"layer 'conv' was modified in place"):
            som.loss(clear=False)
        with pytest.raises(RuntimeError, match=r"layer 'conv' was modified in place"):
            som.loss()
        assert som.recorder.records == []
        model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(inplace=True)).double()
        y = model[0](x)  # before the hooks
        som = SelfOrthogonality(model, backend=backend)
        model(x)
        assert _rel(som.loss(), reference.som_direct(_rows(y, 1))) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_module_gradient_is_added_into_the_models_own_in_place(backend, memory_format):
    """The hooks record an alias made right after each layer, so that backward adds the regularizer's gradient into
    the model's gradient of that output in place: no out-of-place sum as large as a hooked output (a new buffer per
    layer and step), and the gradients equal the functional call's. On the C++ route the layers return a tap (an
    alias) instead, whose hook adds ∂R/∂Y into the model's gradient in the C++ pass itself: no torch add at all.
    A channels_last model the same, its outputs and their gradients read and written in that memory order."""
    from torch.profiler import profile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))  # fmt: skip
    model = model.to(memory_format=memory_format)
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=memory_format)
    with SelfOrthogonality(model, backend=backend) as som:
        loss = model(x).square().mean() + som.loss()
        with profile(record_shapes=True) as prof:
            loss.backward()
    conv_out = [4, 8, 6, 6]
    adds = [e.name for e in prof.events()
            if e.name in ("aten::add", "aten::add_", "aten::copy_") and conv_out in e.input_shapes]  # fmt: skip
    assert adds == ([] if backend == "cpp" else ["aten::add_"] * 2), adds
    hooked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    a = model[0](x)
    b = model[3](model[2](model[1](a)))
    out = model[7](model[6](model[5](model[4](b))))
    (out.square().mean() + som_regularizer([a, b], backend=backend)).backward()
    for got, want in zip(hooked, (p.grad for p in model.parameters())):  # the tap's add may round as an FMA
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7 if backend == "torch" else 1e-6 * float(want.abs().max()))


def test_module_reports_channel_dim_out_of_range_at_the_forward():
    """A channel_dim beyond a hooked output's axes is reported by the forward that made the output, naming the layer
    (it surfaced at loss(), after the whole forward, as som_regularizer's y[i])."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    som = SelfOrthogonality(model, nn.Linear, channel_dim=[1, 2])
    with pytest.raises(ValueError, match=r"channel_dim 2 is out of range for layer '2'.*\(6, 3\)"):
        model(torch.randn(6, 5))
    som.clear()
    som.recorder.enabled = False
    model(torch.randn(6, 5))  # paused hooks check nothing
    som.remove()
    som = SelfOrthogonality(model, nn.Linear, channel_dim=-2)
    model(torch.randn(6, 5))
    assert som.loss(reduction="none").shape == (2,)


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_avx512(), reason="no AVX-512 here: the C++ core's AVX2 paths are what the tests run")
def test_cpp_core_avx2_paths_on_an_avx512_cpu():
    """The C++ core's hand-written AVX-512 tanh and Gram tiles run where the CPU has AVX-512, and KEXUE_FAST_AVX512=0
    keeps their AVX2 paths (what CPUs without AVX-512 run): this file's C++ tests again, in a process taking them."""
    env = {**os.environ, "KEXUE_FAST_AVX512": "0"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
                          __file__, "-k", "cpp and not avx2_paths"], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


def _torch_bundles_libgomp() -> bool:
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return sys.platform.startswith("linux") and any(n.startswith("libgomp") for n in os.listdir(lib))


@pytest.mark.skipif(not _torch_bundles_libgomp(), reason="torch here does not run on a bundled libgomp team")
def test_cpp_core_runs_on_torchs_openmp_team(monkeypatch):
    """Where torch runs on libgomp (its Linux CPU wheels), the C++ SOM core finds that loaded runtime and splits its
    work over torch's own team, as many threads as torch runs (som.cpp_threads); KEXUE_FAST_OMP_TEAM=0 turns it off
    (std::threads of its own, and the route on one thread): the C++ thread tests pass either way."""
    from kexue_fast import _core
    from kexue_fast.ortho import som

    assert _core.omp_team()
    monkeypatch.setattr(som, "CPP_THREADS", None)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert som.cpp_threads() == threads
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(som, "CPP_THREADS", 3)
    assert som.cpp_threads() == 3
    env = {**os.environ, "KEXUE_FAST_OMP_TEAM": "0"}
    check = "from kexue_fast import _core; from kexue_fast.ortho import som; print(_core.omp_team(), som.cpp_threads())"
    run = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["False", "1"], run.stdout + run.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
                          __file__, "-k", "cpp and threads"], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


def _tap_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 3)).double()  # fmt: skip


def _functional_grads(model, som, x, weight_model: float, weight_r: float):
    """The parameters' gradients of weight_model · (model output)² + weight_r · R of the two conv outputs, with R by
    som_regularizer on the outputs themselves (the hooks paused: no taps)."""
    model.zero_grad()
    som.enabled = False
    a = model[0](x)
    b = model[3](model[2](model[1](a)))
    out = model[6](model[5](model[4](b)))
    som.enabled = True
    loss = weight_r * som_regularizer([a, b], backend="cpp")
    (loss + weight_model * out.square().mean() if weight_model else loss).backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_module_taps_add_the_regularizer_gradient_where_the_model_backward_runs():
    """On the C++ route each hooked layer returns a tap (an alias of its output) and the regularizer's backward hands
    its share to the tap's hook, which adds ∂R/∂Y into the model's own gradient there; where the backward does not
    run through the taps (R alone) the penalty computes ∂R/∂Y itself. Float64 gradients equal the untapped
    functional call's in every case: with the model loss, R alone, a weighted R, a second backward of a retained graph,
    torch.autograd.grad, and a gradient that someone else holds (a user's hook kept it: added into a copy)."""
    model, x = _tap_net(), torch.randn(4, 3, 6, 6, dtype=D64)
    som = SelfOrthogonality(model, backend="cpp")
    cases = [(1.0, 1.0), (0.0, 1.0), (1.0, 0.25)]
    for weight_model, weight_r in cases:
        want = _functional_grads(model, som, x, weight_model, weight_r)
        model.zero_grad()
        out = model(x)
        assert all(r.tap is not None for r in som.recorder.records)
        loss = weight_r * som.loss()
        if weight_model:
            loss = loss + weight_model * out.square().mean()
        loss.backward(retain_graph=True)
        for got, w in zip((p.grad for p in model.parameters()), want):
            assert (got is None and w is None) or _rel(got, w) <= 1e-12
        loss.backward()  # the retained graph again: twice the gradient
        for got, w in zip((p.grad for p in model.parameters()), want):
            assert (got is None and w is None) or _rel(got, 2 * w) <= 1e-12
    want = _functional_grads(model, som, x, 1.0, 1.0)
    out = model(x)
    loss = som.loss() + out.square().mean()
    got = torch.autograd.grad(loss, list(model.parameters()))
    assert all(_rel(g, w) <= 1e-12 for g, w in zip(got, want))
    kept = []

    def keep(module, inputs, output) -> None:  # after SelfOrthogonality's hook: `output` is its tap
        output.register_hook(lambda g: kept.append((g, g.clone())))

    handle = model[0].register_forward_hook(keep)
    model.zero_grad()
    out = model(x)
    (som.loss() + out.square().mean()).backward()
    handle.remove()
    assert all(_rel(p.grad, w) <= 1e-12 for p, w in zip(model.parameters(), want))
    assert len(kept) == 1 and torch.equal(*kept[0])  # the gradient the user's hook kept was not added into
    som.taps = False  # off: aliases recorded, ∂R/∂Y returned to autograd; the same gradients
    model.zero_grad()
    out = model(x)
    assert all(r.tap is None for r in som.recorder.records)
    (som.loss() + out.square().mean()).backward()
    assert all(_rel(p.grad, w) <= 1e-12 for p, w in zip(model.parameters(), want))


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_module_taps_sum_is_one_value_of_the_layers_sum(dtype):
    """loss() (reduction "sum") on the tapped C++ route: R summed over the layers inside the penalty (a 0-dim tensor
    of the layers' dtype, summed in float64), equal to the sum of reduction="none"'s values and to the functional
    call's, before any backward."""
    torch.manual_seed(3)
    model = _tap_net().to(dtype)
    x = torch.randn(4, 3, 6, 6, dtype=dtype)
    som = SelfOrthogonality(model, backend="cpp")
    model(x)
    per_layer = som.loss(reduction="none")
    model(x)
    total = som.loss()
    assert total.shape == () and total.dtype == dtype and per_layer.shape == (2,)
    assert total.item() == pytest.approx(per_layer.double().sum().item(), rel=1e-6 if dtype == torch.float32 else 1e-14)
    som.enabled = False
    a = model[0](x)
    b = model[3](model[2](model[1](a)))
    want = som_regularizer([a, b], backend="cpp")
    assert total.item() == pytest.approx(want.item(), rel=1e-6 if dtype == torch.float32 else 1e-14)


def test_module_taps_on_linear_layers():
    """Taps on rows layouts (nn.Linear outputs [b, k], s = 1: the C++ route's row tiles add ∂R/∂Y there): the same
    float64 gradients as the untapped functional call."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 19), nn.Tanh(), nn.Linear(19, 3)).double()
    x = torch.randn(300, 12, dtype=D64)
    som = SelfOrthogonality(model, [model[0], model[2]], backend="cpp")
    out = model(x)
    assert all(r.tap is not None for r in som.recorder.records)
    (som.loss() + out.square().mean()).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    som.enabled = False
    a = model[0](x)
    b = model[2](model[1](a))
    out = model[4](model[3](b))
    (som_regularizer([a, b], channel_dim=-1, backend="cpp") + out.square().mean()).backward()
    assert all(_rel(g, p.grad) <= 1e-12 for g, p in zip(got, model.parameters()))


def test_module_taps_fail_loudly_and_fall_back(monkeypatch):
    """A tap whose hook does not add the deferred ∂R/∂Y by the end of the backward raises (never a silently missing
    gradient); where torch cannot say whether the tap's node will run, the penalty computes ∂R/∂Y itself."""
    from kexue_fast.ortho import som

    model, x = _tap_net(), torch.randn(4, 3, 6, 6, dtype=D64)
    sel = SelfOrthogonality(model, backend="cpp")
    want = _functional_grads(model, sel, x, 1.0, 1.0)
    with monkeypatch.context() as m:
        m.delattr(torch._C, "_will_engine_execute_node")
        model.zero_grad()
        out = model(x)
        (sel.loss() + out.square().mean()).backward()
        assert all(_rel(p.grad, w) <= 1e-12 for p, w in zip(model.parameters(), want))
    monkeypatch.setattr(som._TapSlot, "__call__", lambda self, grad: None)  # a hook that never adds
    out = model(x)
    with pytest.raises(RuntimeError, match="gradient hook did not run"):
        (sel.loss() + out.square().mean()).backward()


class _HookedOutput(nn.Module):
    """A conv whose output the model itself watches: a clamping gradient hook and retain_grad()."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 2, 3, padding=1)
        self.seen = None

    def forward(self, x):
        h = self.c1(x)
        h.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
        h.retain_grad()
        self.seen = h
        return self.c2(torch.relu(h))


def test_hooks_on_a_layers_output_see_the_regularizers_gradient_on_every_route():
    """With taps (the C++ route's default on few threads) the layer returns an alias whose own hook added ∂R/∂Y only
    after a model's hook on that output had run: a clamping hook clamped the model's share alone (c1's gradient norm
    455 against 0.099 on the torch path), so training changed with torch.set_num_threads. Observed taps now take the
    regularizer's gradient through autograd, summed before the hooks run, as on every other route."""
    x = torch.randn(2, 3, 8, 8, dtype=D64)
    grads = {}
    for route in ({"backend": "torch"}, {"backend": "cpp"}, {"backend": "cpp", "taps": False}):
        torch.manual_seed(0)
        model = _HookedOutput().double()
        som = SelfOrthogonality(model, ["c1"], **route)
        (model(x).square().mean() + som.loss()).backward()
        assert float(model.seen.grad.abs().max()) <= 1e-3
        grads[str(route)] = model.c1.weight.grad
    first, *others = grads.values()
    assert all(_rel(g, first) <= 1e-9 for g in others)  # routes' float64 rounding (4e-12 seen); the bug was 4600×


def test_module_messages_and_defaults():
    """A bad reduction raised only after loss() had taken the records (a corrected call then found none); a consumer
    returning no gradient for a tapped output raised without naming the way out; Embedding / LayerNorm outputs
    [B, T, d] took axis 1 (k = T) as their channels; a reentrant checkpoint dropped its layers without a word."""
    from torch.utils.checkpoint import checkpoint

    model = _cnn()
    som = SelfOrthogonality(model, ["0"], backend="cpp")
    model(torch.randn(2, 3, 8, 8, dtype=D64))
    with pytest.raises(ValueError, match="reduction"):
        som.loss(reduction="mean")
    assert som.loss().ndim == 0

    class Gate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return (a > 0).to(b.dtype) * b

        @staticmethod
        def backward(ctx, g):
            return None, g

    conv, other = nn.Conv2d(3, 4, 3).double(), nn.Conv2d(3, 4, 3).double()
    gated = nn.ModuleDict({"conv": conv, "other": other})
    som = SelfOrthogonality(gated, ["conv"], backend="cpp")
    x = torch.randn(2, 3, 6, 6, dtype=D64)
    out = Gate.apply(conv(x), other(x)).sum() + som.loss()
    with pytest.raises(RuntimeError, match="pass taps=False"):
        out.backward()
    som.remove()

    seq = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    som = SelfOrthogonality(seq, [seq[0], seq[1], seq[2]])
    assert som.recorder.dims == [-1, -1, -1]
    seq(torch.randint(0, 10, (4, 20)))
    assert som.loss(reduction="none").shape == (3,)

    model = _cnn()
    som = SelfOrthogonality(model, ["0", "2"], backend="torch")
    x = torch.randn(2, 3, 8, 8, dtype=D64, requires_grad=True)
    head = checkpoint(model[:2], x, use_reentrant=True)
    out = model[2:](head).sum() + som.loss()
    assert [r for r in som.layer_names] == ["0", "2"]
    with pytest.warns(RuntimeWarning, match="layer '0' ran inside a reentrant activation checkpoint"):
        out.backward()
