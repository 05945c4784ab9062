import itertools

import pytest
import torch
import torch.nn.functional as F
from testing import rel_err

import kexue_fast
from kexue_fast.spectral.conv import ConvOperator
from kexue_fast.spectral.reference import conv_operator_matrix

CASES = list(itertools.product([1, 2], [0, 1], [1, 2]))  # stride, padding, groups


def _explicit_norm(op: ConvOperator, weight: torch.Tensor) -> torch.Tensor:
    matrix = conv_operator_matrix(lambda x, w: op.apply(w, x), weight, op.input_shape)
    return torch.linalg.matrix_norm(matrix, ord=2)


@pytest.mark.parametrize("stride, padding, groups", CASES)
def test_conv2d_operator_norm_matches_explicit_matrix(stride, padding, groups):
    torch.manual_seed(stride * 10 + padding * 3 + groups)
    weight = torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64)
    input_shape = (4, 6, 5)
    sigma, u, v = kexue_fast.conv_operator_norm(
        weight, input_shape, stride=stride, padding=padding, groups=groups, n_iters=3000, tol=1e-15
    )
    op = ConvOperator.build(weight.shape, input_shape, stride, padding, 1, groups)
    assert u.shape == op.output_shape and v.shape == input_shape
    assert rel_err(sigma, _explicit_norm(op, weight)) <= 1e-6


@pytest.mark.parametrize(
    "weight_shape, input_shape, kwargs",
    [
        ((3, 2, 4), (2, 9), {"padding": "same"}),  # asymmetric 'same' padding
        ((3, 2, 3), (2, 11), {"dilation": 2, "stride": 2, "padding": 2}),
        ((2, 1, 2, 2, 2), (1, 3, 4, 3), {"padding": 1}),
        ((4, 2, 3, 3), (2, 5, 5), {"padding": "valid"}),
    ],
)
def test_conv_operator_other_geometries(weight_shape, input_shape, kwargs):
    torch.manual_seed(0)
    weight = torch.randn(weight_shape, dtype=torch.float64)
    sigma, _, _ = kexue_fast.conv_operator_norm(weight, input_shape, n_iters=3000, tol=1e-15, **kwargs)
    op = ConvOperator.build(weight_shape, input_shape, kwargs.get("stride", 1), kwargs.get("padding", 0),
                            kwargs.get("dilation", 1), 1)  # fmt: skip
    assert rel_err(sigma, _explicit_norm(op, weight)) <= 1e-6


@pytest.mark.parametrize("stride, padding, groups", CASES)
def test_adjoint_is_the_transpose(stride, padding, groups):
    weight = torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64)
    op = ConvOperator.build(weight.shape, (4, 7, 6), stride, padding, 1, groups)
    x = torch.randn(1, *op.input_shape, dtype=torch.float64)
    y = torch.randn(1, *op.output_shape, dtype=torch.float64)
    assert abs(float((op.apply(weight, x) * y).sum() - (x * op.adjoint(weight, y)).sum())) < 1e-10
    assert torch.allclose(op.apply(weight, x), F.conv2d(x, weight, None, stride, padding, 1, groups))


def test_conv_sigma_gradient():
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    sigma, _, _ = kexue_fast.conv_operator_norm(weight, (2, 5, 5), padding=1, n_iters=2000, tol=1e-15)
    sigma.backward()
    op = ConvOperator.build(weight.shape, (2, 5, 5), 1, 1, 1, 1)
    w2 = weight.detach().clone().requires_grad_()
    _explicit_norm(op, w2).backward()
    assert rel_err(weight.grad, w2.grad) < 1e-5


@pytest.mark.parametrize(
    "input_shape, kwargs, match",
    [
        ((3, 6, 6), {}, "channels"),
        ((4, 2, 2), {}, "smaller than the dilated kernel"),
        ((4, 6), {}, "spatial dims"),
        ((4, 6, 6, 6), {}, "spatial dims"),
        ((4, 0, 6), {}, "positive ints"),
        ((4, True, 6), {}, "positive ints"),
        (6, {}, "positive ints"),
        ((4, 6, 6), {"stride": 0}, "stride"),
        ((4, 6, 6), {"padding": "same", "stride": 2}, "same"),
        ((4, 6, 6), {"n_iters": 0}, "n_iters"),
    ],
)
def test_conv_bad_inputs(input_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kexue_fast.conv_operator_norm(torch.randn(5, 4, 3, 3), input_shape, **kwargs)


def test_zero_kernel_and_zero_start_vector():
    """A zero kernel returned u from torch.empty (inf or 5.7e18, run to run); a zero start vector a false "contains
    NaN or Inf" or a σ̂ read from uninitialized memory. bool strides were taken as ints."""
    sigma, u, v = kexue_fast.conv_operator_norm(torch.zeros(4, 3, 3, 3, dtype=torch.float64), (3, 6, 6), padding=1)
    assert float(sigma) == 0.0 and float(u.abs().max()) == 0.0 and abs(float(v.norm()) - 1) <= 1e-12
    with pytest.raises(ValueError, match="v must be a non-zero start vector"):
        kexue_fast.conv_operator_norm(torch.randn(4, 3, 3, 3), (3, 6, 6), v=torch.zeros(3, 6, 6))
    with pytest.raises(ValueError, match="stride must be an int or a tuple"):
        kexue_fast.conv_operator_norm(torch.randn(4, 3, 3, 3), (3, 6, 6), stride=(True, 1))


def test_operator_mode_refuses_inputs_larger_than_input_shape():
    """A layer normalized for (2, 3, 3) inputs ran 12 × 12 ones silently, where its Lipschitz constant is 1.15 for
    coeff = 0.9: the zero-padded operator norm grows with the input. Smaller inputs are fine (a submatrix)."""
    from kexue_fast.nn import spectral_norm

    conv = spectral_norm(torch.nn.Conv2d(2, 2, 3, padding=1), coeff=0.9, input_shape=(2, 6, 6))
    conv(torch.randn(1, 2, 6, 6))
    conv(torch.randn(1, 2, 4, 5))
    with pytest.raises(ValueError, match=r"spatial shape \(12, 12\) exceeds input_shape's \(6, 6\)"):
        conv(torch.randn(1, 2, 12, 12))
    torch.nn.utils.parametrize.remove_parametrizations(conv, "weight")
    conv(torch.randn(1, 2, 12, 12))  # no spectral norm left: no limit
