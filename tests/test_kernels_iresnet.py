"""The fused dense residual kernel (kernels/iresnet.py) against torch, at odd shapes; interpreted on CPU."""

import pytest
import torch
import torch.nn.functional as F

from kexue_fast import _dispatch

pytestmark = pytest.mark.skipif(
    _dispatch.why_not("invertible_resblock", "triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                      torch.float32) is not None,
    reason="triton cannot run here",
)  # fmt: skip
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, w1, b1, w2, b2, t1, t2, activation, param):
    h = x @ w1.T * t1 + b1
    if activation == "lipswish":
        s = torch.sigmoid(param * h)
        a, d = h * s / 1.1, (s + param * h * s * (1 - s)) / 1.1
    elif activation == "elu":
        a = F.elu(h, param)
        d = torch.where(h > 0, torch.ones_like(h), a + param)
    else:
        a = torch.tanh(h)
        d = 1 - a * a
    return x + a @ w2.T * t2 + b2, a, d


@pytest.mark.parametrize("activation, param", [("lipswish", 0.7), ("elu", 1.0), ("tanh", 0.0)])
@pytest.mark.parametrize("batch, dim, hidden", [(1, 1, 1), (7, 2, 33), (63, 5, 70), (65, 16, 16), (33, 17, 65)])
def test_fused_forward_matches_torch(activation, param, batch, dim, hidden):
    from kexue_fast.kernels.iresnet import dense_residual_forward

    g = torch.Generator().manual_seed(batch * 100 + dim)
    x, w1, b1 = (torch.randn(s, generator=g) for s in ((batch, dim), (hidden, dim), (hidden,)))
    w2, b2 = torch.randn(dim, hidden, generator=g), torch.randn(dim, generator=g)
    scales = torch.tensor([0.4, 0.7])
    args = [t.to(DEVICE) for t in (x, w1, b1, w2, b2, scales)]
    y, a, d = dense_residual_forward(*args, activation, torch.tensor([param], device=DEVICE))
    ref = _reference(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), 0.4, 0.7, activation, param)
    ours_ref = _reference(x, w1, b1, w2, b2, 0.4, 0.7, activation, param)
    for got, truth, torch32 in zip((y, a, d), ref, ours_ref):
        err = (got.cpu().double() - truth).abs().max()
        torch_err = (torch32.double() - truth).abs().max()
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)  # at most 2x torch's own float32 error


def test_fused_forward_rejects_bad_inputs():
    from kexue_fast.kernels.iresnet import dense_residual_forward

    x, w1, b1, w2, b2 = torch.randn(4, 3), torch.randn(8, 3), torch.randn(8), torch.randn(3, 8), torch.randn(3)
    ok = dict(scales=torch.ones(2), activation="tanh", param=torch.zeros(1))
    with pytest.raises(TypeError, match=r"x of dtype torch\.float64"):
        dense_residual_forward(x.double(), w1, b1, w2, b2, **ok)
    with pytest.raises(ValueError, match="do not chain"):
        dense_residual_forward(x, w1, b1, torch.randn(4, 8), b2, **ok)
    with pytest.raises(ValueError, match="D <= 128"):
        big = torch.randn(2, 200)
        dense_residual_forward(big, torch.randn(8, 200), b1, torch.randn(200, 8), torch.randn(200), **ok)
    with pytest.raises(ValueError, match="w1 must be contiguous"):
        dense_residual_forward(x, torch.randn(3, 8).T, b1, w2, b2, **ok)
