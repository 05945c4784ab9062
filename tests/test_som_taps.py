"""Gradient taps (kexue_fast.ortho.taps): SelfOrthogonality on the Triton route adds ∂R/∂Y into the model's own
gradient of Y inside the backward kernel. Every kind of backward must give the gradients of the plain route: with and
without the model's loss, partial ones, retained graphs, in-place ops after the layer, double backward. Interpreted on
CPU (TRITON_INTERPRET=1, set by conftest.py without CUDA) with taps forced on (SelfOrthogonality taps CUDA outputs)."""

import copy

import pytest
import torch
from torch import nn

from kexue_fast.nn.self_orthogonality import SelfOrthogonality
from kexue_fast.ortho import som_regularizer, taps

pytest.importorskip("triton")
from kexue_fast.kernels import som as kernels

D64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True),  # modified in place right after the hooked layer
        nn.MaxPool2d(2), nn.Conv2d(6, 5, 3, padding=1), nn.Flatten(), nn.Linear(5 * 4 * 4, 7),
    ).to(DEV, D64)  # fmt: skip


def _x():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(3, 3, 8, 8, generator=g, dtype=D64) * 0.3).to(DEV)


def _grads(kind, tapped, backend):
    """Parameter gradients (and the backward's extra outputs) of `kind` of backward, on one route."""
    model, x = _model(), _x()
    layers = [model[6]] if kind == "one layer's regularizer only" else (nn.Conv2d, nn.Linear)
    som = SelfOrthogonality(model, layers=layers, backend=backend, gamma=2.0, lambda1=3.0)
    som.recorder.tap_outputs = tapped
    params = list(model.parameters())
    out = model(x)
    task = out.square().mean()
    if kind == "both":
        (task + 0.5 * som.loss()).backward()
    elif kind in ("regularizer only", "one layer's regularizer only"):  # the last: no gradient from the model
        som.loss().backward()
    elif kind == "unused regularizer":
        som.loss()
        task.backward()
    elif kind == "autograd.grad":
        return torch.autograd.grad(task + som.loss(), params)
    elif kind == "retained twice":
        loss = task + som.loss()
        loss.backward(retain_graph=True)
        loss.backward()
    elif kind == "two regularizer terms":
        (task + som.loss(clear=False) + 2.0 * som.loss()).backward()
    elif kind == "per-layer weights":
        (task + (som.loss(reduction="none") * torch.arange(1.0, 5.0, dtype=D64, device=DEV)).sum()).backward()
    som.remove()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


KINDS = ["both", "regularizer only", "one layer's regularizer only", "unused regularizer", "autograd.grad",
         "retained twice", "two regularizer terms", "per-layer weights"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_tapped_gradients_equal_the_plain_routes(kind, monkeypatch):
    added = []
    backward = kernels.gram_backward
    monkeypatch.setattr(kernels, "gram_backward", lambda *a, add=None, **k: added.append(add is not None)
                        or backward(*a, add=add, **k))  # fmt: skip
    tapped = _grads(kind, True, "triton")
    fused_calls = sum(added)
    added.clear()
    plain = _grads(kind, False, "triton")
    assert not any(added)
    reference = _grads(kind, False, "torch")
    for a, b, c in zip(tapped, plain, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)
    # the fused add runs where a gradient from downstream reaches a tapped output on the Triton route: two
    # convolutions. The one modified in place by ReLU(inplace) is no longer tapped (the plain route), and the Linear
    # output (b < k) takes the torch ẐẐᵀ form, its tap passing the gradient through. With only the last
    # convolution's regularizer, nothing comes from downstream: the tap returns ∂R/∂Y alone
    expected = {"both": 2, "regularizer only": 2, "one layer's regularizer only": 0, "unused regularizer": 0,
                "autograd.grad": 2, "retained twice": 4, "two regularizer terms": 4,
                "per-layer weights": 2}  # fmt: skip
    assert fused_calls == expected[kind]


def test_tap_is_the_identity_for_the_model_alone_and_in_double_backward():
    """A tapped model without a pending regularizer gradient: the same gradients, and a gradient penalty (double
    backward through the taps) works; with the regularizer's gradient pending, double backward raises."""
    x = _x().requires_grad_()
    results = []
    for tapped in (False, True):
        model = _model()
        som = SelfOrthogonality(model, backend="triton")
        som.recorder.tap_outputs = tapped
        (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        penalty = gx.square().sum()
        results.append(torch.autograd.grad(penalty, list(model.parameters())))
        som.clear()
        som.remove()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    model = _model()
    som = SelfOrthogonality(model, layers=[model[0]], backend="triton")
    som.recorder.tap_outputs = True
    loss = model(x).square().sum() + som.loss()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_gradient_with_respect_to_the_records_takes_the_plain_route():
    """torch.autograd.grad(R, records): autograd does not run the taps then, so R's backward returns ∂R/∂Y itself."""
    model, x = _model(), _x()
    som = SelfOrthogonality(model, layers=[model[0], model[6]], backend="triton")
    som.recorder.tap_outputs = True
    model(x)
    records = [y for y, _ in som.recorder.take()]
    assert all(taps.tap_node(y) is not None for y in records)
    got = torch.autograd.grad(som_regularizer(records, backend="triton"), records)
    leaves = [y.detach().requires_grad_() for y in records]
    want = torch.autograd.grad(som_regularizer(leaves, backend="torch"), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_kernel_add_equals_the_separate_sum_and_checks_its_argument():
    g = torch.Generator().manual_seed(3)
    ys = [(torch.randn(s, generator=g, dtype=D64) * 0.3).to(DEV) for s in [(3, 5, 4, 4), (7, 9)]]
    layouts = [(3, 5, 16), (7, 9, 1)]
    a = kernels.penalty(ys, layouts, 2.0, 1.0, 1.0, 1e-12)[1]
    scale = torch.tensor([0.5, -2.0], dtype=D64, device=DEV)
    plain = kernels.gram_backward(ys, layouts, 2.0, a, scale)
    other = torch.randn(plain.shape, generator=g, dtype=D64).to(DEV)
    summed = kernels.gram_backward(ys, layouts, 2.0, a, scale, add=other)
    torch.testing.assert_close(summed, plain + other, rtol=1e-15, atol=1e-15)
    assert not torch.equal(summed, other)  # add itself is left as it was, the sum is a new tensor
    for bad in (other[1:], other.float(), torch.stack([other, other], 1)[:, 0]):
        with pytest.raises(ValueError, match="add must be"):
            kernels.gram_backward(ys, layouts, 2.0, a, scale, add=bad)


def test_recorder_tap_setting_is_checked_kept_and_device_scoped():
    model = _model()
    som = SelfOrthogonality(model)
    assert som.recorder.tap_outputs == "cuda"
    assert copy.deepcopy(som.recorder).tap_outputs == "cuda"
    model(_x())
    y = som.recorder.take()[0][0]
    assert (taps.tap_node(y) is not None) == (DEV == "cuda")
    with pytest.raises(TypeError, match="tap_outputs"):
        type(som.recorder)(model, tap_outputs=1)
    som.remove()
