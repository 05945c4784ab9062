"""Cascading Rejection: the one-GEMM form against the sequential rejections, its geometry, the conditional head, the
losses, the module, and bad inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kexue_fast.gan import (
    cascading_directions,
    cascading_rejection,
    cascading_rejection_generator_loss,
    cascading_rejection_loss,
    reference,
)
from kexue_fast.gan.losses import stage_weights
from kexue_fast.nn.cascading import CascadingRejection

D64 = torch.float64


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("batch", [1, 7, 65])
@pytest.mark.parametrize("n_stages, dim", [(1, 1), (1, 7), (2, 7), (3, 63), (7, 65), (7, 3)])
def test_one_gemm_equals_sequential_rejections(batch, n_stages, dim):
    g = torch.Generator().manual_seed(batch * 100 + n_stages * 10 + dim)
    v = torch.randn(batch, dim, dtype=D64, generator=g, requires_grad=True)
    w = torch.randn(n_stages, dim, dtype=D64, generator=g, requires_grad=True)
    ours, rej = cascading_rejection(v, w, return_rejection=True)
    seq, seq_rej = reference.cascading_rejection_sequential(v, w)
    assert _rel(ours, seq) <= 1e-12
    assert (rej - seq_rej).abs().max() <= 1e-12 * v.abs().max()
    probe = torch.randn(batch, n_stages, dtype=D64, generator=g)
    probe_v = torch.randn(batch, dim, dtype=D64, generator=g)
    grads = torch.autograd.grad((ours * probe).sum() + (rej * probe_v).sum(), [v, w])
    seq_grads = torch.autograd.grad((seq * probe).sum() + (seq_rej * probe_v).sum(), [v, w])
    for a, b in zip(grads, seq_grads):
        assert _rel(a, b) <= 1e-12


def test_gradcheck_unconditional_and_conditional():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 5, dtype=D64, generator=g, requires_grad=True)
    w = torch.randn(3, 5, dtype=D64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=D64, generator=g, requires_grad=True)
    e = torch.randn(2, 3, 5, dtype=D64, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0])
    torch.autograd.gradcheck(lambda v, w, b: cascading_rejection(v, w, bias=b, return_rejection=True), (v, w, b))
    torch.autograd.gradcheck(
        lambda v, w, e: cascading_rejection(v, w, labels=y, class_weight=e, return_rejection=True), (v, w, e)
    )


@pytest.mark.parametrize("n_stages, dim", [(4, 9), (5, 5)])
def test_each_rejection_is_orthogonal_to_its_head(n_stages, dim):
    g = torch.Generator().manual_seed(n_stages)
    v = torch.randn(6, dim, dtype=D64, generator=g)
    w = torch.randn(n_stages, dim, dtype=D64, generator=g)
    full = cascading_rejection(v, w)
    for i in range(1, n_stages + 1):
        scores, rej = cascading_rejection(v, w[:i], return_rejection=True)  # rej = v_{i+1}
        assert (rej @ w[i - 1]).abs().max() <= 1e-12 * v.norm(dim=1).max() * w[i - 1].norm()
        assert torch.equal(scores, full[:, :i]) or _rel(scores, full[:, :i]) <= 1e-13


def test_orthogonal_heads_reduce_to_a_plain_linear_head():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(17, 5, dtype=D64, generator=g))
    w = (q * torch.tensor([0.5, 2.0, 1.0, 3.0, 0.1], dtype=D64)).T  # 5 orthogonal heads of different norms
    v = torch.randn(9, 17, dtype=D64, generator=g)
    b = torch.randn(5, dtype=D64, generator=g)
    assert _rel(cascading_directions(w), w) <= 1e-13
    assert _rel(cascading_rejection(v, w, bias=b), F.linear(v, w, b)) <= 1e-13


def test_parallel_and_zero_heads_score_zero():
    g = torch.Generator().manual_seed(4)
    v = torch.randn(5, 6, dtype=D64, generator=g)
    w1 = torch.randn(6, dtype=D64, generator=g)
    w = torch.stack([w1, -2.5 * w1, torch.zeros(6, dtype=D64), torch.randn(6, dtype=D64, generator=g)])
    scores, rej = cascading_rejection(v, w, return_rejection=True)
    seq, seq_rej = reference.cascading_rejection_sequential(v, w)
    assert scores[:, 1].abs().max() <= 1e-12 * scores[:, 0].abs().max()  # nothing left along w1 after stage 1
    assert torch.all(scores[:, 2] == 0)
    assert _rel(scores, seq) <= 1e-12 and _rel(rej, seq_rej) <= 1e-12


@pytest.mark.parametrize("n_classes", [1, 3])
def test_conditional_equals_per_sample_unconditional(n_classes):
    torch.manual_seed(n_classes)
    head = CascadingRejection(7, 3, conditional_classes=n_classes).double()
    v = torch.randn(11, 7, dtype=D64)
    y = torch.randint(0, n_classes, (11,))
    scores, rej = head(v, y, return_rejection=True)
    for i in range(11):
        w_i = head.weight + head.class_weight[y[i]]
        s_i, r_i = cascading_rejection(v[i : i + 1], w_i, bias=head.bias, return_rejection=True)
        assert _rel(scores[i], s_i[0]) <= 1e-12 and _rel(rej[i], r_i[0]) <= 1e-12
    assert _rel(head.directions(y)[4], cascading_directions(head.weight + head.class_weight[y[4]])) <= 1e-13


def test_module_parameters_state_and_shapes():
    head = CascadingRejection(16, 4, weights=[4, 3, 2, 1])
    assert set(head.state_dict()) == {"weight", "bias", "stage_weights"}
    assert torch.allclose(head.stage_weights, torch.tensor([0.4, 0.3, 0.2, 0.1]))
    v = torch.randn(8, 16)
    scores = head(v)
    assert scores.shape == (8, 4) and scores.dtype == torch.float32
    expected = sum(lam * F.relu(1 - scores[:, i]).mean() for i, lam in enumerate([0.4, 0.3, 0.2, 0.1]))
    assert torch.allclose(head.loss(scores, True), expected)
    by_function = cascading_rejection_generator_loss(scores, "wgan", [4, 3, 2, 1])
    assert torch.allclose(head.generator_loss(scores, "wgan"), by_function)
    plain = CascadingRejection(16, 1, bias=False)
    assert set(plain.state_dict()) == {"weight", "stage_weights"}
    assert torch.allclose(plain(v)[:, 0], v @ plain.weight[0])
    cond = CascadingRejection(16, 2, conditional_classes=5)
    assert cond.class_weight.shape == (5, 2, 16) and cond(v, torch.arange(8) % 5).shape == (8, 2)
    assert "conditional_classes=5" in repr(cond)


@pytest.mark.parametrize("kind", ["hinge", "bce", "wgan"])
def test_losses_match_their_formulas(kind):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(10, 3, dtype=D64, generator=g) * 2
    lam = torch.tensor([1.0, 2.0, 5.0], dtype=D64) / 8
    real_terms = {"hinge": F.relu(1 - s), "bce": F.softplus(-s), "wgan": -s}[kind]
    fake_terms = {"hinge": F.relu(1 + s), "bce": F.softplus(s), "wgan": s}[kind]
    gen_terms = {"hinge": -s, "bce": F.softplus(-s), "wgan": -s}[kind]
    for real, terms in ((True, real_terms), (False, fake_terms)):
        got = cascading_rejection_loss(s, real, kind, weights=[1, 2, 5])
        assert torch.allclose(got, (terms.mean(0) * lam).sum(), rtol=1e-14, atol=0)
    mask = torch.arange(10) % 3 == 0
    mixed = torch.where(mask[:, None], real_terms, fake_terms)
    assert torch.allclose(cascading_rejection_loss(s, mask, kind), mixed.mean(), rtol=1e-14, atol=0)
    assert torch.allclose(cascading_rejection_generator_loss(s, kind), gen_terms.mean(), rtol=1e-14, atol=0)


def test_single_stage_bce_is_the_standard_gan_loss():
    s = torch.randn(12, dtype=D64)
    bce_real = F.binary_cross_entropy_with_logits(s, torch.ones_like(s))
    assert torch.allclose(cascading_rejection_loss(s, True, "bce"), bce_real, rtol=1e-14, atol=0)
    assert torch.allclose(cascading_rejection_loss(s[:, None], False, "bce"),
                          F.binary_cross_entropy_with_logits(s, torch.zeros_like(s)), rtol=1e-14, atol=0)  # fmt: skip


def test_bad_inputs_raise_clear_errors():
    v, w = torch.randn(4, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="n_stages"):
        CascadingRejection(5, 0)
    with pytest.raises(ValueError, match="in_features"):
        CascadingRejection(0, 2)
    with pytest.raises(ValueError, match="conditional_classes"):
        CascadingRejection(5, 2, conditional_classes=0)
    with pytest.raises(ValueError, match="weights"):
        CascadingRejection(5, 2, weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        CascadingRejection(5, 2, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        CascadingRejection(5, 2, weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="weights"):
        CascadingRejection(5, 2, weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="n_stages"):
        cascading_rejection(v, torch.randn(0, 5))
    with pytest.raises(ValueError, match="in_features"):
        cascading_rejection(v, torch.randn(3, 6))
    with pytest.raises(ValueError, match="v must be"):
        cascading_rejection(v[0], w)
    with pytest.raises(TypeError, match="v must be a floating"):
        cascading_rejection(v.long(), w)
    with pytest.raises(TypeError, match=r"weight must be a torch\.Tensor"):
        cascading_rejection(v, [[1.0] * 5])
    with pytest.raises(ValueError, match="must match"):
        cascading_rejection(v, w.double())
    with pytest.raises(ValueError, match="bias"):
        cascading_rejection(v, w, bias=torch.randn(2))
    with pytest.raises(ValueError, match="labels and class_weight"):
        cascading_rejection(v, w, labels=torch.zeros(4, dtype=torch.long))
    e = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        cascading_rejection(v, w, labels=torch.tensor([0, 1, 2, 0]), class_weight=e)
    with pytest.raises(TypeError, match="integer"):
        cascading_rejection(v, w, labels=torch.zeros(4), class_weight=e)
    with pytest.raises(ValueError, match=r"labels must be \[batch\]"):
        cascading_rejection(v, w, labels=torch.zeros(3, dtype=torch.long), class_weight=e)
    with pytest.raises(ValueError, match="class_weight must be"):
        cascading_rejection(v, w, labels=torch.zeros(4, dtype=torch.long), class_weight=torch.randn(2, 5))
    head = CascadingRejection(5, 3, conditional_classes=2)
    with pytest.raises(ValueError, match="pass labels"):
        head(v)
    with pytest.raises(ValueError, match="unconditional"):
        CascadingRejection(5, 3)(v, torch.zeros(4, dtype=torch.long))
    s = torch.randn(4, 3)
    with pytest.raises(ValueError, match="kind"):
        cascading_rejection_loss(s, True, "lsgan")
    with pytest.raises(TypeError, match="real"):
        cascading_rejection_loss(s, 1, "hinge")
    with pytest.raises(ValueError, match="real must be"):
        cascading_rejection_loss(s, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights"):
        cascading_rejection_loss(s, True, weights=[1, 2])
    with pytest.raises(ValueError, match="scores must be"):
        cascading_rejection_loss(torch.randn(2, 3, 4), True)
    with pytest.raises(ValueError, match="n_stages = 3"):
        head.loss(torch.randn(4, 2), True)
    for bad in (5.0, True, "5"):
        with pytest.raises(TypeError, match="in_features must be an integer"):
            CascadingRejection(bad, 2)
    with pytest.raises(ValueError, match=r"bias \(torch.float64"):
        cascading_rejection(v, w, bias=torch.randn(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"class_weight \(torch.float64"):
        cascading_rejection(v, w, labels=torch.zeros(4, dtype=torch.long), class_weight=e.double())


def test_integer_likes_weights_and_scalar_real_are_accepted():
    """numpy integers as sizes, huge finite stage weights (normalized without overflowing their sum), and a 0-d bool
    tensor or numpy bool as `real` (one label for the batch)."""
    head = CascadingRejection(np.int64(5), np.int32(3), conditional_classes=np.int64(2))
    assert (head.in_features, head.n_stages, head.conditional_classes) == (5, 3, 2)
    assert type(head.in_features) is int
    lam = stage_weights([1e308, 1e308, 1.0], 3, dtype=D64)
    assert torch.allclose(lam, torch.tensor([0.5, 0.5, 0.5e-308], dtype=D64), rtol=1e-12, atol=0)
    s = torch.randn(6, 3, dtype=D64)
    want = cascading_rejection_loss(s, True)
    assert torch.equal(cascading_rejection_loss(s, torch.tensor(True)), want)
    assert torch.equal(cascading_rejection_loss(s, np.True_), want)


def test_half_heads_reject_in_float32():
    """float16 heads of norm ~400 (‖w‖² overflows float16) or ~4e-4 (‖w‖² subnormal): the final rejection is still
    orthogonal to the last head and matches the float64 cascade (it was computed in float16: ~50% off)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(8, 16, dtype=D64, generator=g)
    for scale in (400.0, 4e-4):
        w = torch.randn(2, 16, dtype=D64, generator=g) * scale / 4
        w16 = w.half()
        _, rej = cascading_rejection(v.half(), w16, return_rejection=True)
        _, want = reference.cascading_rejection_sequential(v.half().double(), w16.double())
        assert rej.dtype == torch.float16
        assert float((rej.double() - want).norm() / want.norm()) <= 2e-3, scale


def test_meta_tensors_and_per_sample_gradients():
    """Shape inference on meta tensors (no autocast state there), and torch.func per-sample gradients of the
    conditional head (the labels' range check skips transformed tensors, as inside torch.compile)."""
    meta = CascadingRejection(4, 2, conditional_classes=3, device="meta")
    x = torch.randn(5, 4, device="meta")
    assert meta(x, torch.zeros(5, dtype=torch.long, device="meta")).shape == (5, 2)
    head = CascadingRejection(4, 2, conditional_classes=3).double()
    params = {k: p.detach() for k, p in head.named_parameters()}
    x, y = torch.randn(5, 4, dtype=D64), torch.tensor([0, 2, 1, 0, 2])

    def loss(p, xb, yb):
        return torch.func.functional_call(head, p, (xb[None], yb[None])).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for b in range(5):
        one = torch.func.grad(loss)(params, x[b], y[b])
        for k in params:
            assert torch.allclose(per_sample[k][b], one[k], rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """Compiled with fullgraph; out-of-range labels, which eager mode checks on the host, raise from an asynchronous
    assertion in the graph (a negative label scored as class C − 1, an index past C crashed in an inductor kernel);
    a 0-d bool `real` is not read on the host (it broke fullgraph)."""
    head = CascadingRejection(8, 3, conditional_classes=4)
    v, y = torch.randn(5, 8), torch.tensor([0, 3, 1, 1, 2])
    compiled = torch.compile(lambda v, y: head(v, y, return_rejection=True), fullgraph=True)
    for a, b in zip(compiled(v, y), head(v, y, return_rejection=True)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for bad in (torch.tensor([0, -1, 1, 1, 2]), torch.tensor([0, 4, 1, 1, 2])):
        with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 4\)"):
            compiled(v, bad)
    loss = torch.compile(lambda s, r: cascading_rejection_loss(s, r), fullgraph=True)
    scores = torch.randn(5, 3)
    assert torch.allclose(loss(scores, torch.tensor(True)), cascading_rejection_loss(scores, True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_heads_and_autocast(dtype):
    torch.manual_seed(0)
    head = CascadingRejection(16, 4)
    v = torch.randn(8, 16)
    reference_scores = head(v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_scores = head(v)
    assert _rel(autocast_scores.float(), reference_scores) <= 0.05
    half = CascadingRejection(16, 4, dtype=dtype)
    half.load_state_dict({k: t.to(dtype) for k, t in head.state_dict().items()})
    scores = half(v.to(dtype))
    assert scores.dtype == dtype
    assert _rel(scores.float(), reference_scores) <= 0.05
    assert cascading_directions(head.weight.to(dtype)).dtype == dtype


def test_directions_check_their_labels():
    head = CascadingRejection(6, 3, conditional_classes=4)
    assert head.directions(torch.tensor([0, 3])).shape == (2, 3, 6)
    with pytest.raises(ValueError, match="lie in"):
        head.directions(torch.tensor([-1]))
    with pytest.raises(ValueError, match="unconditional"):
        CascadingRejection(6, 3).directions(torch.tensor([0]))


def test_autocast_features_from_a_lower_precision_body():
    """Under autocast an nn.Linear body hands the head bfloat16 features while its weights stay float32: the head
    raised "weight and v must match" where nn.Linear casts both. float64 heads under autocast were solved in
    float32 (1.9e-7 off)."""
    torch.manual_seed(0)
    body = torch.nn.Linear(5, 16)
    head = CascadingRejection(16, 4, conditional_classes=3)
    x, y = torch.randn(8, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    want = head(body(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = body(x)
        scores, rejection = head(v, y, return_rejection=True)
        plain = torch.nn.Linear(16, 4)(v)
    assert v.dtype == torch.bfloat16 and scores.dtype == plain.dtype == torch.bfloat16
    assert rejection.dtype == torch.bfloat16 and _rel(scores.float(), want) <= 0.05
    scores.float().sum().backward()
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.class_weight.grad).all()
    w = torch.randn(3, 16, dtype=D64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = cascading_directions(w)
    assert inside.dtype == D64 and torch.equal(inside, cascading_directions(w))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="must match"):
        head(torch.randn(8, 16, dtype=D64), y)  # float64 is not autocast's to cast


@pytest.mark.parametrize("batch", [2, 9])
def test_conditional_directions_per_sample_or_per_class(batch):
    """A batch smaller than the number of classes solves the cascade per sample (C = 1000 solved every class at each
    call: 10× the time), a larger one per class; both give the per-sample heads' directions and gradients."""
    from kexue_fast.gan.cascading import conditional_directions

    g = torch.Generator().manual_seed(batch)
    w = torch.randn(3, 6, dtype=D64, generator=g, requires_grad=True)
    e = torch.randn(5, 3, 6, dtype=D64, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (batch,), generator=g)
    heads, directions = conditional_directions(w, e, y)
    want = torch.stack([cascading_directions(w + e[i]) for i in y.tolist()])
    assert _rel(directions, want) <= 1e-13 and torch.equal(heads, w + e[y])
    probe = torch.randn(batch, 3, 6, dtype=D64, generator=g)
    got = torch.autograd.grad((directions * probe).sum(), [w, e])
    ref = torch.autograd.grad((want * probe).sum(), [w, e])
    assert all(_rel(a, b) <= 1e-12 for a, b in zip(got, ref))


def test_labels_under_vmap_are_checked():
    """Under vmap the range check was skipped: −1 wrapped around to the last class."""
    head = CascadingRejection(4, 2, conditional_classes=3).double()
    x = torch.randn(3, 4, dtype=D64)
    call = torch.func.vmap(lambda xb, yb: head(xb[None], yb[None]))
    assert call(x, torch.tensor([0, 1, 2])).shape == (3, 1, 2)
    for bad in (torch.tensor([0, 1, -1]), torch.tensor([0, 1, 3])):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            call(x, bad)


def test_stage_weights_checks_and_gradients():
    """stage_weights(None, 0) divided by zero, "12" was read as [1, 2], a tensor that requires grad was detached;
    a checkpoint's invalid λ loaded silently (the loss then NaN); dtype=torch.long crashed in nn.Parameter."""
    for n in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="n_stages must be an int >= 1"):
            stage_weights(None, n)
    with pytest.raises(TypeError, match="got str"):
        stage_weights("12", 2)
    lam = torch.tensor([1.0, 3.0], dtype=D64, requires_grad=True)
    scores = torch.randn(4, 2, dtype=D64)
    loss = cascading_rejection_loss(scores, True, weights=lam)
    (grad,) = torch.autograd.grad(loss, lam)
    assert torch.allclose(loss, cascading_rejection_loss(scores, True, weights=[1.0, 3.0]), rtol=1e-14)
    assert torch.autograd.gradcheck(lambda t: cascading_rejection_loss(scores, True, weights=t), (lam,))
    assert grad.abs().sum() > 0
    head = CascadingRejection(6, 3, weights=torch.tensor([1.0, 1.0, 2.0], requires_grad=True))
    assert not head.stage_weights.requires_grad
    state = head.state_dict()
    for bad in ([-1.0, 5.0, 1.0], [float("nan"), 1.0, 1.0], [0.0, 0.0, 0.0]):
        state["stage_weights"] = torch.tensor(bad)
        with pytest.raises(ValueError, match="weights must be finite"):
            head.load_state_dict(state)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        CascadingRejection(6, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels must be \[batch\] \(one class index per sample\)"):
        CascadingRejection(6, 3, conditional_classes=4).directions(torch.tensor(1))
