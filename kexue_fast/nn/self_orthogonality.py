"""`SelfOrthogonality`: hooks a model's layers and returns the SOM regularizer of their outputs in one grouped call."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._dispatch import BACKENDS
from ..ortho.hooks import LayerSpec, OutputRecorder, inplace_successors
from ..ortho.som import check_hyperparameters, cpp_route, cpp_route_takes, som_regularizer, tapped_penalty, taps_hold


class SelfOrthogonality(nn.Module):
    """The Self-Orthogonality Module (Zhang et al. 2020; kexue.fm "Self-Orthogonality Module") as a plug-in.

    Attaches forward hooks to `layers` of `model` (None: every Conv1d/2d/3d; a type or tuple of types; or names /
    submodules) and records their outputs Y during training forwards (as aliases made right after each layer, so that
    backward adds the regularizer's gradient into the model's own in place: OutputRecorder's alias_outputs). loss()
    (or calling the module) returns
        Σ_layers  λ₁(Σ_{i≠j}Θ_ij)² + λ₂Σ_{i≠j}Θ_ij²,   Θ = ẐᵀẐ,  Ẑ = column-normalized tanh(γY) [b, k]
    over everything recorded since the last loss() — all layers in a few kernel launches on CUDA
    (kexue_fast.ortho.som_regularizer) — and forgets the records. Channels: axis 1 (convolutions), the last axis
    for nn.Linear, or `channel_dim`. The model is not registered as a submodule (no parameters, no state).

        som = SelfOrthogonality(model)
        loss = criterion(model(x), target) + som.loss()

    Records accumulate over every training-mode forward with gradients until loss() takes them. A forward that is
    not to be regularized must run paused: a GAN discriminator's forward in the generator step, say
    (`with som.paused(): g_loss = -D(G(z)).mean()`), or call clear() before the forwards to regularize. Else the
    next loss() includes it, and that loss's backward fails once the forward's graph has been freed by its own
    backward (torch's "Trying to backward through the graph a second time").

    On the CPU's C++ route (som_regularizer's backend "cpp", what "auto" takes there) with taps=True (the default) each
    hooked layer returns an alias of its output (a tap) to its consumers and the output itself is recorded: in a
    backward that runs through the model, the regularizer's backward leaves ∂R/∂Y to the tap's gradient hook, which adds
    it into the model's own gradient of Y in the same C++ pass that computes it (no ∂R/∂Y buffer written and added by
    autograd apart); elsewhere (R alone, say) the regularizer's backward returns ∂R/∂Y itself. A gradient of the tap
    that something else holds (another hook kept it) is copied, not added into; a tap that something watches at loss()
    (a gradient hook registered on the layer's output, or retain_grad()) takes the regularizer's gradient through
    autograd instead, summed before those hooks run, as on the other routes. On a 2-core AVX-512 Xeon VM the tapped
    step was the faster in 10 of 10 rounds on one torch thread and even on two; on a 2-core AVX2 EPYC VM an earlier form
    of taps was the slower (README, "Cascading Rejection, SOM, ..."): python -m kexue_fast.benchmarks.som_profile
    --device cpu --batch 32 --taps 5 times both on a machine; taps=False records aliases as on the other routes.

    On CUDA a whole training step with it captures in one CUDA graph in relaxed capture mode
    (torch.cuda.graph(graph, capture_error_mode="relaxed"): the Triton kernels' pointer tables for the capture's own
    addresses are built while capturing), the way to take the host's per-step cost away for small models.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        *,
        gamma: float = 10.0,
        lambda1: float = 100.0,
        lambda2: float = 1.0,
        eps: float = 1e-12,
        channel_dim: Optional[Union[int, Sequence[int]]] = None,
        record_in_eval: bool = False,
        backend: str = "auto",
        taps: bool = True,
    ) -> None:
        super().__init__()
        check_hyperparameters(gamma, lambda1, lambda2, eps)
        if backend is not None and backend not in ("auto", *BACKENDS):  # None: "auto", as for som_regularizer
            raise ValueError(f"backend must be one of 'auto', 'triton', 'cpp', 'torch'; got {backend!r}")
        self.gamma, self.lambda1, self.lambda2, self.eps = float(gamma), float(lambda1), float(lambda2), float(eps)
        self.backend = backend
        self.taps = bool(taps)
        self._routes: dict = {}  # _pass_route's memo
        self.recorder = OutputRecorder(model, layers, channel_dim=channel_dim, record_in_eval=record_in_eval,
                                       alias_outputs=True)  # fmt: skip
        overwritten = inplace_successors(model, self.recorder.layers)
        if overwritten:
            self.recorder.remove()
            layer, successor = overwritten[0]
            raise ValueError(
                f"layer {layer!r} is followed by {successor!r} (inplace=True) in its nn.Sequential: the in-place op "
                "overwrites the output the regularizer must read (eager loss() would raise; torch.compile hides it "
                "and would regularize the overwritten values). Make that op out of place (e.g. nn.ReLU())"
            )
        self.recorder.taps = self._tap

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_routes", {})  # a module pickled before the memo
        self.recorder.taps = self._tap  # not pickled with the recorder

    def _tap(self, output: Tensor, channel_dim: int) -> bool:
        return getattr(self, "taps", True) and cpp_route_takes(output, channel_dim, self.backend, self._pass_route)

    def _pass_route(self, dtype: torch.dtype) -> bool:
        """The C++ route's backend choice for `dtype`, once per forward pass (memoized until loss() or clear(), which
        check it afresh: taps_hold): each hooked layer's hook asks, and reading the environment and the dispatcher
        there cost the step's host time per layer."""
        key = (dtype, self.backend)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = cpp_route(dtype, self.backend)
        return route

    @property
    def enabled(self) -> bool:
        """Whether the hooks record now; set False to run the model as if unhooked (a forward whose outputs should
        not be regularized, such as a validation pass in training mode)."""
        return self.recorder.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.recorder.enabled = bool(value)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """`with som.paused(): ...` runs the model without recording (enabled = False inside, restored after)."""
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    @property
    def layer_names(self):
        return self.recorder.names

    def loss(self, *, clear: bool = True, reduction: str = "sum") -> Tensor:
        """The regularizer of the recorded outputs (reduction "none": one value per recorded output, in call order).
        Raises RuntimeError when nothing was recorded (no training-mode forward since the last loss()), and when a
        recorded output was modified in place after its layer (an nn.ReLU(inplace=True) right after it: the
        regularizer would see the modified values; make that op out of place)."""
        if reduction not in ("sum", "none"):  # before the records are taken: a corrected call still finds them
            raise ValueError(f'reduction must be "sum" or "none", got {reduction!r}')
        self._routes.clear()  # the next forward pass asks afresh
        records = self.recorder.take() if clear else self.recorder.peek()
        if not records:
            raise RuntimeError("SelfOrthogonality recorded no outputs: run a forward pass of the model in training "
                               "mode with gradients enabled before loss() (or pass record_in_eval=True); a "
                               "reentrant checkpoint (use_reentrant=True) runs its forward without gradients: use "
                               "use_reentrant=False")  # fmt: skip
        taps = [getattr(r, "tap", None) for r in records]
        if any(t is not None and _observed(t) for t in taps):
            # A hook on a layer's returned output (or retain_grad) must see the regularizer's gradient summed in, as
            # without taps: R of the taps themselves, whose ∂R/∂tap autograd adds there before running the hooks.
            records = [(t, d) if t is not None else (y, d) for (y, d), t in zip(records, taps)]
        elif all(t is not None for t in taps) and taps_hold([y.dtype for y, _ in records], self.backend):
            return tapped_penalty([y for y, _ in records], taps, [d for _, d in records], gamma=self.gamma,
                                  lambda1=self.lambda1, lambda2=self.lambda2, eps=self.eps,
                                  total=reduction == "sum")  # fmt: skip
        return som_regularizer(
            [y for y, _ in records],
            gamma=self.gamma,
            lambda1=self.lambda1,
            lambda2=self.lambda2,
            channel_dim=[d for _, d in records],
            eps=self.eps,
            reduction=reduction,
            backend=self.backend,
        )

    def forward(self) -> Tensor:
        return self.loss()

    def clear(self) -> None:
        self._routes.clear()
        self.recorder.clear()

    def remove(self) -> None:
        """Detach the hooks (the module then records nothing)."""
        self.recorder.remove()

    def __enter__(self) -> SelfOrthogonality:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return f"layers={self.layer_names}, gamma={self.gamma}, lambda1={self.lambda1}, lambda2={self.lambda2}"


def _observed(tap: Tensor) -> bool:
    """Whether something already watches a tap's gradient: a hook registered on it (Tensor.register_hook) or
    retain_grad(). The tap's own hook, registered at loss(), would run after those and add ∂R/∂Y too late for them."""
    return bool(tap._backward_hooks) or tap.retains_grad
