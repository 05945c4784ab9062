"""Drop-in `spectral_norm` parametrization with a Lipschitz coefficient and conv operator norms, and
`update_spectral_norms`, which advances the power iteration of every such layer of a model in one batched call.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import weakref
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import _dispatch
from .._autograd import no_autocast
from .._layout import memory_order
from ..spectral._validate import check_finite, check_n_iters, check_positive
from ..spectral.conv import ConvOperator, conv_power_iteration
from ..spectral.power_iteration import OP as POWER_ITERATION_OP
from ..spectral.power_iteration import check_sigma, run_backend
from ..spectral.reference import unit_or_keep

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FROZEN = [False]  # read by the layers' forward: a list element, on which torch.compile guards
_MODES: Dict[int, List[bool]] = {}  # per thread, the modes its open power_iteration_frozen blocks set, innermost last
_MODES_LOCK = threading.Lock()


@contextlib.contextmanager
def frozen_power_iteration() -> Iterator[None]:
    """Within this block, spectral-norm layers do not advance their power iteration in forward, so recomputing a
    function (a memory-efficient backward, an exact Jacobian) sees the same normalized weights as the first pass.
    The flag is process-wide, not per thread: while one thread is inside (InvertibleResBlock.inverse,
    ResidualFlow.sample), other threads' training forwards do not advance their iterations either; it clears once no
    thread is inside any more (each thread's blocks are kept apart, so blocks of two threads may end in any order).
    (A threading.local was tried: torch.compile guards on it, but its writes inside compiled fullgraph blocks and
    inverses left it set afterwards in the test suite, freezing every later training forward.)"""
    with power_iteration_frozen(True):
        yield


@contextlib.contextmanager
def power_iteration_frozen(frozen: bool) -> Iterator[None]:
    """Within this block, the power iterations are frozen or not as `frozen` says (a replay of a forward pass runs
    in the mode the pass itself ran in), for this thread; process-wide they are frozen while any thread's innermost
    block freezes them. A save-and-restore of one flag left it frozen for good when two threads' blocks overlapped and
    ended out of order (the stale value restored last)."""
    if torch.compiler.is_compiling():  # traced: the list's writes replay as side effects (no lock, no thread id)
        previous = _FROZEN[0]
        _FROZEN[0] = bool(frozen)
        try:
            yield
        finally:
            _FROZEN[0] = previous
        return
    me = threading.get_ident()
    with _MODES_LOCK:
        _MODES.setdefault(me, []).append(bool(frozen))
        _FROZEN[0] = any(modes[-1] for modes in _MODES.values())
    try:
        yield
    finally:
        with _MODES_LOCK:
            modes = _MODES[me]
            modes.pop()
            if not modes:
                del _MODES[me]
            _FROZEN[0] = any(modes[-1] for modes in _MODES.values())


def power_iteration_is_frozen() -> bool:
    return _FROZEN[0]


_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class SpectralNorm(nn.Module):
    """The parametrization W ↦ W / σ̂ (coeff=None, torch's rule) or W ↦ W / max(1, σ̂/c) (coeff=c).

    Matrix mode: σ̂ = uᵀ W_mat v with W_mat the weight with `dim` moved first and flattened, exactly as
    torch.nn.utils.parametrizations.spectral_norm (same buffers `_u` [rows], `_v` [cols], same random init and 15
    warm-up iterations, same update in training mode); with coeff, warm-up continues until σ̂ settles (relative
    change ≤ 1e-6 over 10 iterations, at most 500 more), so that the layer starts within its bound. Operator mode
    (conv + input_shape): u, v live in the conv's output / input spaces, and σ̂ = ⟨u, conv(v)⟩ estimates the norm
    of the convolution operator; its power iteration converges slowly, so the same stopping rule can leave σ̂ short of
    ‖A‖₂ and the layer slightly above c at the start (up to 0.1% for a coeff=0.97 Conv2d(64, 64, 3, padding=1) on
    64 × 32 × 32 inputs in a docs audit's check, seeds 0–2); conv_operator_norm_bound and lipschitz_report certify the
    bound.
    """

    def __init__(
        self,
        weight: Tensor,
        n_power_iterations: int = 1,
        dim: int = 0,
        eps: float = 1e-12,
        coeff: Optional[float] = None,
        conv: Optional[ConvOperator] = None,
    ) -> None:
        super().__init__()
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        ndim = weight.ndim
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -ndim <= dim < max(ndim, 1):
            raise ValueError(f"dim must be an int in [-{ndim}, {ndim}), got {dim!r}")
        if conv is not None and not isinstance(conv, ConvOperator):
            raise TypeError(f"conv must be a ConvOperator or None, got {type(conv).__name__}")
        self.dim = int(dim) if dim >= 0 else int(dim) + ndim
        self.eps = check_positive(eps, "eps")
        self.coeff = check_positive(coeff, "coeff", allow_none=True)
        self.n_power_iterations = check_n_iters(n_power_iterations, "n_power_iterations", minimum=0)
        self.conv = conv
        if ndim > 1:
            with torch.no_grad():
                if conv is None:
                    weight_mat = self._reshape_weight_to_matrix(weight)
                    h, w = weight_mat.size()
                    u = weight_mat.new_empty(h).normal_(0, 1)
                    v = weight_mat.new_empty(w).normal_(0, 1)
                else:
                    u = weight.new_empty(conv.output_shape).normal_(0, 1)
                    v = weight.new_empty(conv.input_shape).normal_(0, 1)
                if conv is None:
                    u, v = F.normalize(u, dim=0, eps=eps), F.normalize(v, dim=0, eps=eps)
                else:
                    u = u / torch.linalg.vector_norm(u).clamp_min(eps)
                    v = v / torch.linalg.vector_norm(v).clamp_min(eps)
                self.register_buffer("_u", u)
                self.register_buffer("_v", v)
                self._power_method(weight, 15)
                if coeff is not None and weight.device.type != "meta":
                    self._settle(weight)

    def _apply(self, fn, recurse: bool = True):
        """nn.Module._apply with u, v of 4 or more axes (a Conv3d operator's [C, D, H, W]) converted as flat vectors:
        Module.to(memory_format=...) converts every 4-D and 5-D tensor, so channels_last_3d raised "required rank 5"
        inside torch; they are vectors of the operator's spaces, kept contiguous (dtype and device conversions as for
        any buffer)."""
        vectors = {k: b for k, b in self._buffers.items() if k in ("_u", "_v") and b is not None and b.dim() >= 4}
        for key, b in vectors.items():
            self._buffers[key] = b.reshape(-1)
        try:
            return super()._apply(fn, recurse)
        finally:
            for key, b in vectors.items():
                new = self._buffers[key]
                same = new.data_ptr() == b.data_ptr() and new.dtype == b.dtype and new.device == b.device
                self._buffers[key] = b if same else new.view(b.shape)

    def _settle(self, weight: Tensor, tol: float = 1e-6, most: int = 500) -> None:
        """More warm-up iterations, 10 at a time, until σ̂ changes by at most tol (relative) or `most` ran: torch's
        15 leave σ̂ short of ‖W‖₂ (power iteration converges from below), and a coeff layer then starts above its
        bound (‖W‖₂ = 1.022 for coeff 0.97 on a 64 × 64 Linear; an i-ResNet block's Lip(g) ≥ 1 at init)."""
        previous = float(self.sigma(weight).real)
        for _ in range(most // 10):
            self._power_method(weight, 10)
            current = float(self.sigma(weight).real)
            if abs(current - previous) <= tol * abs(current):
                return
            previous = current

    def _reshape_weight_to_matrix(self, weight: Tensor) -> Tensor:
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.dim()) if d != self.dim))
        return weight.flatten(1)

    @torch.autograd.no_grad()
    def _power_method(self, weight: Tensor, n_power_iterations: int) -> None:
        if self.conv is not None:
            conv_power_iteration(self.conv, weight, self._u, self._v, n_power_iterations, None, self.eps)
            return
        weight_mat = self._reshape_weight_to_matrix(weight)
        for _ in range(n_power_iterations):
            if self.coeff is None:  # torch's update, to the bit (a zero weight zeroes u, v: σ̂ = 0, W/σ̂ NaN, as torch)
                self._u = F.normalize(torch.mv(weight_mat, self._v), dim=0, eps=self.eps, out=self._u)
                self._v = F.normalize(torch.mv(weight_mat.H, self._u), dim=0, eps=self.eps, out=self._v)
            else:  # u, v kept where W = 0: zeroed, they would stay 0 and σ̂ = 0 let the layer through unscaled
                unit_or_keep(torch.mv(weight_mat, self._v), self._u, self.eps, out=self._u)
                unit_or_keep(torch.mv(weight_mat.H, self._u), self._v, self.eps, out=self._v)

    def sigma(self, weight: Tensor) -> Tensor:
        """σ̂ = uᵀ W v with the current u, v (differentiable w.r.t. weight)."""
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        if self.conv is not None:
            return torch.vdot(u.flatten(), self.conv.apply(weight, v.unsqueeze(0)).flatten())
        return torch.vdot(u, torch.mv(self._reshape_weight_to_matrix(weight), v))

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim == 1:
            if self.coeff is None:
                return F.normalize(weight, dim=0, eps=self.eps)
            return weight / (torch.linalg.vector_norm(weight) / self.coeff).clamp_min(1.0)
        return weight / self.divisor(weight)

    def divisor(self, weight: Tensor) -> Tensor:
        """σ̂ (coeff=None) or max(1, σ̂/c), after advancing the iteration in training mode (unless frozen): the
        parametrized weight is weight / divisor. Differentiable w.r.t. weight through σ̂ = uᵀWv."""
        # σ̂ in the weight's dtype: autocast would lower the products (a conv operator's u·Av met float32 u with a
        # bfloat16 Av and failed; and the iterates would lose precision)
        with no_autocast(weight.device.type):
            if self.training and self.n_power_iterations > 0 and not _FROZEN[0]:
                self._power_method(weight, self.n_power_iterations)
            sigma = self.sigma(weight)
        if self.coeff is None:
            return sigma  # complex weights: complex σ̂ (≈ real), as torch divides by it
        return ((sigma.real if sigma.is_complex() else sigma) / self.coeff).clamp_min(1.0)

    def right_inverse(self, value: Tensor) -> Tensor:
        return value

    def extra_repr(self) -> str:
        mode = f"conv input_shape={self.conv.input_shape}" if self.conv is not None else f"dim={self.dim}"
        return f"coeff={self.coeff}, n_power_iterations={self.n_power_iterations}, {mode}, eps={self.eps}"


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: Optional[int] = None,
    *,
    coeff: Optional[float] = None,
    input_shape: Optional[Sequence[int]] = None,
) -> nn.Module:
    """Drop-in for torch.nn.utils.parametrizations.spectral_norm, with a Lipschitz coefficient and conv norms.

        coeff=None:  W ← W / σ̂                  (torch's rule; identical outputs, gradients and state_dict)
        coeff=c:     W ← W / max(1, σ̂ / c)      (i-ResNet / Residual Flows: only ever scales down, ‖W‖₂ ≲ c)

    σ̂ comes from power iteration (u ← Wv/‖Wv‖, v ← Wᵀu/‖Wᵀu‖, σ̂ = uᵀWv), advanced `n_power_iterations` times per
    forward in training mode. n_power_iterations=0 never iterates in forward: call
    `update_spectral_norms(model)` after `optimizer.step()` instead (the Residual Flows schedule), which does every
    layer at once. Where W v = 0 (a zero-initialized weight) the iteration keeps v (σ̂ = 0) instead of zeroing u and
    v for good — in a coeff layer's forward, in operator mode and in `update_spectral_norms`; a coeff=None matrix
    layer's own forward follows torch (u, v zeroed, W/σ̂ NaN). Positional arguments follow torch's order (name,
    n_power_iterations, eps, dim).

    For Conv1d/2d/3d, `input_shape` = the per-sample input shape (C, *spatial) switches σ̂ to the norm of the
    convolution operator (power iteration through conv and conv_transpose with the module's stride, padding,
    dilation and groups; an input larger than input_shape then raises ValueError in forward, since the norm grows
    with the input size); without it, the reshaped kernel is normalized, as torch does (which neither bounds nor
    equals the layer's Lipschitz constant). State-dict keys are torch's: parametrizations.<name>.original, .0._u, .0._v;
    a matrix-mode layer also loads a checkpoint of the deprecated torch.nn.utils.spectral_norm (<name>_orig, _u, _v).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if coeff is not None:  # (SpectralNorm checks them again: here first, before anything else is checked or built)
        coeff = check_positive(coeff, "coeff")
    n_power_iterations = check_n_iters(n_power_iterations, "n_power_iterations", minimum=0)
    eps = check_positive(eps, "eps")
    if not (weight.is_floating_point() or weight.is_complex()):
        raise TypeError(f"{name} must be a floating or complex tensor, got {weight.dtype}")
    if weight.device.type != "meta":  # deferred initialization (meta tensors) has no values to check yet
        check_finite(weight.detach(), f"{name}")
    if dim is not None and input_shape is not None:  # the operator norm has no reshaping axis: dim was ignored
        raise ValueError("dim reshapes the kernel for the matrix norm; input_shape takes the conv operator's norm "
                         "instead: pass one of them")  # fmt: skip
    if dim is None:
        dim = 1 if isinstance(module, _CONV_TRANSPOSES) else 0
    conv = None
    if input_shape is not None:
        if not isinstance(module, _CONVS) or name != "weight":
            raise ValueError("input_shape is for the weight of nn.Conv1d/2d/3d modules (the conv operator norm); "
                             f"got {type(module).__name__}.{name}")  # fmt: skip
        if module.padding_mode != "zeros":
            raise ValueError(f"input_shape supports padding_mode='zeros' only, got {module.padding_mode!r}")
        conv = ConvOperator.build(
            weight.shape, input_shape, module.stride, module.padding, module.dilation, module.groups
        )
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps, coeff, conv))
    if conv is not None:
        module.register_forward_pre_hook(_InputShapeCheck(tuple(conv.input_shape[1:])))
    else:
        module._register_load_state_dict_pre_hook(_LegacyKeys(name), with_module=True)
    return module


class _LegacyKeys:
    """A load_state_dict pre-hook of a matrix-mode layer: a checkpoint of the deprecated hook-based
    torch.nn.utils.spectral_norm (keys <name>_orig, <name>_u, <name>_v: many GAN checkpoints) loads into the
    parametrization's keys (parametrizations.<name>.original, .0._u, .0._v), which hold the same tensors (the same
    reshaping dim, u of its rows and v of its columns, torch's update); torch's own parametrization needs them
    renamed by hand. Only a checkpoint holding all three old keys and none of the new ones is renamed."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        if not parametrize.is_parametrized(module, self.name):  # removed since (remove_parametrizations)
            return
        old = [f"{prefix}{self.name}{suffix}" for suffix in ("_orig", "_u", "_v")]
        new = [f"{prefix}parametrizations.{self.name}.{key}" for key in ("original", "0._u", "0._v")]
        if all(k in state_dict for k in old) and not any(k in state_dict for k in new):
            for key, renamed in zip(old, new):
                state_dict[renamed] = state_dict.pop(key)


class _InputShapeCheck:
    """A forward pre-hook of an operator-mode conv: inputs larger than `input_shape` raise, since a zero-padded
    convolution's operator norm grows with its input (a smaller input's operator is a submatrix of it: its norm is
    bounded). A module-level class: the hook pickles and deep-copies with its module (a parametrized module itself is
    saved by its state_dict: torch.save refuses it whole, as for torch's own spectral_norm). Inert once the module
    has no spectral norm of its weight left (remove_parametrizations)."""

    input_size_check = True  # the flows' closed forms, which call conv layers' weights directly, run it themselves

    def __init__(self, spatial: Tuple[int, ...]) -> None:
        self.spatial = spatial

    def __call__(self, module: nn.Module, inputs) -> None:
        x = inputs[0] if inputs else None
        if isinstance(x, Tensor) and parametrize.is_parametrized(module, "weight"):
            self.check(x)

    def check(self, x: Tensor) -> None:
        if x.ndim < len(self.spatial):
            return
        shape = tuple(x.shape[x.ndim - len(self.spatial) :])
        if any(a > b for a, b in zip(shape, self.spatial)):
            raise ValueError(
                f"the input's spatial shape {shape} exceeds input_shape's {self.spatial} given to spectral_norm: the "
                "operator norm normalized (and a coeff's bound) holds for inputs up to that size only, and grows "
                "with it; pass the largest input shape the layer will see"
            )


def spectral_norm_layers(model: nn.Module) -> List[Tuple[SpectralNorm, Tensor]]:
    """Every kexue_fast SpectralNorm parametrization in `model`, with the parameter it normalizes.

    Only spectral norms that come first in their parametrization list (they normalize `original` itself; `_walk`
    also lists the others); a module shared by several parents is listed once. Walks `_modules`
    directly: named_modules() costs ~2 µs a module, which a per-step update cannot afford."""
    return _walk(model)[0]


def _walk(model: nn.Module):
    """(first-position spectral norms with their original, [(later spectral norm, its ParametrizationList, index)])."""
    found, chained, seen = [], [], set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:  # tied modules: one update each
            continue
        seen.add(id(module))
        children = module._modules
        if isinstance(module, parametrize.ParametrizationList):
            original = module._parameters.get("original")
            if original is None:
                original = module._buffers.get("original")  # a parametrized buffer keeps its original as a buffer
            for i, p in enumerate(children.values()):
                if isinstance(p, SpectralNorm) and "_v" in p._buffers:
                    if i == 0 and original is not None:
                        found.append((p, original))
                    elif i > 0:  # after a parametrization with several originals too (original0, original1, …)
                        chained.append((p, module, i))
            continue
        stack.extend(reversed([c for c in children.values() if c is not None]))
    return found, chained


class _Group:
    """Matrix-mode layers sharing (device, dtype, eps): the tensors (and, for C++, NumPy views) one batched call
    reads and writes. Views stay valid while the parameters and buffers keep their storage, which optimizers and
    load_state_dict preserve; the plan's signature notices when they do not."""

    def __init__(self, eps: float, members: List[Tuple[SpectralNorm, Tensor]]) -> None:
        self.eps = eps
        self.members = members
        mats = [p._reshape_weight_to_matrix(w.detach()) for p, w in members]
        self.is_view = [m.is_contiguous() and m.data_ptr() == w.data_ptr() for m, (_, w) in zip(mats, members)]
        self.us = [p._u for p, _ in members]
        self.vs = [p._v for p, _ in members]
        # a weight whose input axes lie in another order in memory (a channels_last conv: [out, kh, kw, in]) is read
        # in place as W P, P a permutation of the columns (the same σ), with v in that order in a scratch vector
        self.orders: List[Optional[List[int]]] = [None] * len(members)
        for i, ((p, w), view) in enumerate(zip(members, self.is_view)):
            order = None if view else _column_order(p, w)
            if order is not None:
                mats[i] = w.detach().permute(0, *order).flatten(1)
                self.is_view[i], self.orders[i] = True, order
                self.vs[i] = torch.empty_like(p._v)
        self.weights = [m if view else m.contiguous() for m, view in zip(mats, self.is_view)]
        self.device, self.dtype = members[0][1].device, members[0][1].dtype
        self._numpy: Optional[tuple] = None

    def refresh_copies(self) -> None:
        """Permuted weights (ConvTranspose's dim=1) are not views: re-copy them every call. Column-permuted views'
        v in their order (the layer's own forward may have moved v since)."""
        for (p, w), view, order, weight, v in zip(self.members, self.is_view, self.orders, self.weights, self.vs):
            if not view:
                weight.copy_(p._reshape_weight_to_matrix(w.detach()))
            elif order is not None:
                v.copy_(p._v.view(w.shape[1:]).permute(*(d - 1 for d in order)).flatten())

    def write_back(self) -> None:
        """The column-permuted layers' new v into their buffers, in torch's column order."""
        for i, order in enumerate(self.orders):
            if order is not None:
                p, w = self.members[i]
                shape = [w.shape[d] for d in order]
                inverse = [order.index(d) for d in range(1, w.dim())]
                p._v.view(w.shape[1:]).copy_(self.vs[i].view(shape).permute(*inverse))

    def numpy(self) -> tuple:
        if self._numpy is None:
            self._numpy = tuple([t.numpy() for t in ts] for ts in (self.weights, self.us, self.vs))
        return self._numpy


def _column_order(p: SpectralNorm, w: Tensor) -> Optional[List[int]]:
    """For a dim-0 weight of 3 or more axes whose input axes (1, 2, ...) lie densely in another order than its
    shape's (a channels_last conv weight), that order: w.permute(0, *order).flatten(1) is then a view; else None."""
    if p.dim != 0 or w.dim() < 3 or w.is_complex():
        return None
    return memory_order(w, first=1)


def _signature(layers: List[Tuple[SpectralNorm, Tensor]]) -> tuple:
    # eps too: a layer whose eps changed since gets a new group
    return tuple((id(p), w.data_ptr(), p._buffers["_u"].data_ptr(), p._buffers["_v"].data_ptr(), w.dtype, w.device,
                  p.eps) for p, w in layers)  # fmt: skip


_PLANS: weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, List[_Group], list]] = weakref.WeakKeyDictionary()


def _plan(model: nn.Module) -> Tuple[List[_Group], List[Tuple[SpectralNorm, Tensor]], list]:
    """(matrix-mode groups, layers iterated one by one, spectral norms after other parametrizations), from one walk."""
    layers, chained = _walk(model)
    for p, _ in layers:  # the batched calls write u, v in place, which needs them contiguous (a strided state dict
        for key in ("_u", "_v"):  # loaded with assign=True is not): a contiguous copy takes the buffer's place
            if not p._buffers[key].is_contiguous():
                p._buffers[key] = p._buffers[key].contiguous()
    signature = _signature(layers)
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1], cached[2], chained
    by_key: Dict[tuple, List[Tuple[SpectralNorm, Tensor]]] = {}
    conv_layers = []
    for p, original in layers:
        if p.conv is not None or original.is_complex():  # complex weights: the layer's own iteration, one by one
            conv_layers.append((p, original))
        else:
            by_key.setdefault((original.device, original.dtype, p.eps), []).append((p, original))
    groups = [_Group(eps, members) for (_, _, eps), members in by_key.items()]
    _PLANS[model] = (signature, groups, conv_layers)
    return groups, conv_layers, chained


@contextlib.contextmanager
def eval_mode(modules: Iterable[nn.Module]) -> Iterator[None]:
    """The modules in eval mode for a while, each restored to its own mode after (a stateful module, such as torch's
    own spectral_norm, advances its state when evaluated in training mode)."""
    modes = [(m, m.training) for m in modules]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _chained_input(plist: parametrize.ParametrizationList, index: int) -> Tensor:
    """What the parametrizations before `index` hand the spectral norm at `index`, evaluated in eval mode: a stateful
    one would otherwise advance its state, which this update does not own."""
    earlier = list(plist)[:index]
    with eval_mode(m for q in earlier for m in q.modules()):
        if plist.is_tensor:
            weight = earlier[0](plist.original)
        else:  # a first parametrization whose right_inverse returned several tensors
            weight = earlier[0](*(getattr(plist, f"original{i}") for i in range(plist.ntensors)))
        for q in earlier[1:]:
            weight = q(weight)
    return weight


def _check_finite_weight(weight: Tensor) -> None:
    """A CPU weight's NaN/Inf as the batched groups report it (unit_or_keep would keep u, v and hide it); on CUDA
    the check would sync the host."""
    if weight.device.type == "cpu" and not bool(torch.isfinite(weight).all()):
        raise ValueError("a spectral-norm weight contains NaN or Inf")


def update_spectral_norms(
    model: nn.Module, *, n_iters: int = 1, tol: Optional[float] = None, backend: str = "auto"
) -> None:
    """Advances the power iteration of every kexue_fast spectral-norm layer in `model` by `n_iters` at once.

    Matrix-mode layers are grouped by (device, dtype, eps) and each group is one batched call (one C++ call on CPU,
    one Triton launch per iteration on CUDA), reading the weights in place and writing each layer's `_u`, `_v`
    buffers in place. Conv operator-mode layers iterate through conv/conv_transpose, layer by layer. With `tol`,
    iterate until each σ̂ changes by at most tol relative (a host sync per iteration on GPU).
    Use after `optimizer.step()` with layers built with n_power_iterations=0 (Residual Flows' schedule).
    The grouping is cached per model and rebuilt whenever a layer, parameter or buffer changes identity; the cache
    refers to the tensors it read, so after `model.to(...)` the old copies stay alive until the next call. A weight
    holding NaN or Inf raises ValueError (checked on CPU tensors only: on CUDA the check would sync the host).
    `backend` picks the batched matrix groups' backend (checked, for every group, before any layer is updated);
    operator-mode conv layers and spectral norms chained after other parametrizations iterate with torch ops.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    n_iters = check_n_iters(n_iters)
    tol = check_positive(tol, "tol", allow_none=True)
    _dispatch.requested_backend(backend)  # a bad name raises here, whatever layers the model has
    groups, conv_layers, chained = _plan(model)
    # every group's backend before any buffer moves: an explicit backend that cannot run raises with nothing changed
    chosen = [_dispatch.choose(POWER_ITERATION_OP, group.device, group.dtype, backend) for group in groups]
    with torch.no_grad(), frozen_power_iteration():
        for p, plist, index in chained:  # after other parametrizations: iterate on what they hand it
            weight = _chained_input(plist, index)
            _check_finite_weight(weight)
            p._power_method(weight.detach(), n_iters)
    for p, original in conv_layers:
        _check_finite_weight(original)
        with torch.no_grad():
            if p.conv is None:
                p._power_method(original.detach(), n_iters)
            else:
                conv_power_iteration(p.conv, original.detach(), p._u, p._v, n_iters, tol, p.eps)
    for group, backend_of_group in zip(groups, chosen):
        group.refresh_copies()
        if backend_of_group == "cpp":
            from .. import _core

            w, u, v = group.numpy()
            sigma, _ = _core.power_iteration(w, u, v, n_iters, -1.0 if tol is None else tol, group.eps,
                                             torch.get_num_threads())  # fmt: skip
            # written through NumPy views, which autograd does not see: a graph that saved u or v (a compiled
            # forward's, before its backward) would otherwise use the new values silently instead of raising
            torch.autograd.graph.increment_version(group.us + group.vs)
            values = sigma.tolist()
        else:
            with torch.no_grad():
                sigma = run_backend(backend_of_group, group.weights, group.vs, group.us, group.vs, n_iters, tol,
                                    group.eps)  # fmt: skip
            values = sigma.tolist() if group.device.type == "cpu" else []
        with torch.no_grad():
            group.write_back()
        for weight, value in zip(group.weights, values):
            if not math.isfinite(value) or value == 0:  # NaN/Inf weights, or float32 squares that overflow
                check_sigma(weight, value, "a spectral-norm weight")
