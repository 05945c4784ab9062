"""`OutputRecorder`: forward hooks that keep chosen layers' outputs (and their channel axis) until a loss takes them."""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
DEFAULT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LayerSpec = Union[None, Type[nn.Module], Tuple[Type[nn.Module], ...], Iterable[Union[str, nn.Module]]]


_LAST_AXIS = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.LayerNorm,
              *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))  # fmt: skip


def default_channel_dim(module: nn.Module) -> int:
    """The channel (neuron) axis of a module's output: last for nn.Linear, nn.Bilinear, nn.Embedding(Bag),
    nn.LayerNorm and nn.RMSNorm ([..., features]), 1 otherwise (NC..., as convolutions and batch norms)."""
    return -1 if isinstance(module, _LAST_AXIS) else 1


def inplace_successors(model: nn.Module, layers: Sequence[Tuple[str, nn.Module]]) -> List[Tuple[str, str]]:
    """(layer, successor) names where a chosen layer is followed in its nn.Sequential by a module with inplace=True
    (nn.ReLU(inplace=True), say): that module overwrites the layer's output. In eager mode check_unmodified sees it
    by the version counter; under torch.compile, which functionalizes the in-place op, nothing would."""
    chosen = {id(m): name for name, m in layers}
    found = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (_, child), (next_name, successor) in zip(children, children[1:]):
            if id(child) in chosen and getattr(successor, "inplace", False) is True:
                found.append((chosen[id(child)], f"{parent_name}.{next_name}" if parent_name else next_name))
    return found


class Record(tuple):
    """One recorded output: unpacks as (output, channel_dim); .layer is the layer's name, .version the output's
    version counter when it was recorded (None under torch.compile), for check_unmodified; .tap the alias of the
    output that the layer returned instead of it (OutputRecorder.taps), else None."""

    def __new__(cls, output: Tensor, dim: int, layer: str, version: Optional[int], tap: Optional[Tensor] = None
                ) -> Record:  # fmt: skip
        record = super().__new__(cls, (output, dim))
        record.layer, record.version, record.tap = layer, version, tap
        return record


def check_unmodified(records: Sequence[Tuple[Tensor, int]]) -> None:
    """Raises RuntimeError when a recorded output was modified in place after its layer returned it (an in-place op
    on it: its version counter moved), since a regularizer of the record would then see the modified values."""
    for record in records:
        version = getattr(record, "version", None)
        if version is not None and record[0]._version != version:
            raise RuntimeError(
                f"the output of layer {record.layer!r} was modified in place after it was recorded (an in-place op "
                "on it, such as nn.ReLU(inplace=True) right after the layer): a regularizer of it would see the "
                "modified values, not the layer's output. Make that op out of place (e.g. nn.ReLU(inplace=False))"
            )


def resolve_layers(model: nn.Module, layers: LayerSpec) -> List[Tuple[str, nn.Module]]:
    """(name, module) pairs: layers=None → every Conv1d/2d/3d; a module type (or tuple of types) → every module of
    it; else an iterable of names (as in model.named_modules()) and/or submodules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = list(model.named_modules())
    if layers is None:
        layers = DEFAULT_LAYERS
    if isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)):
        found = [(name, m) for name, m in named if isinstance(m, layers)]
        if not found:
            raise ValueError(f"model has no module of type {layers}: pass layers= explicitly")
        return found
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    by_name = dict(named)
    by_id = {id(m): name for name, m in named}
    found = []
    for item in layers:  # type: ignore[union-attr]
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"layers: model has no submodule named {item!r}")
            found.append((item, by_name[item]))
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"layers: {type(item).__name__} is not a submodule of model")
            found.append((by_id[id(item)], item))
        else:
            raise TypeError(f"layers must hold names or submodules, got {type(item).__name__}")
    if not found:
        raise ValueError("layers is empty: name at least one layer")
    return found


class _RecordHook:
    """The forward hook of one recorded layer: a module-level class, not a closure, so that a hooked model can be
    pickled (torch.save) and deep-copied. A copy of the hook alone records nothing: a copied model is not hooked
    unless its recorder is copied with it (the recorder then hooks the copied layers itself; OutputRecorder's
    __setstate__), and a copy of the model alone (an EMA copy) never feeds, or leaks into, a recorder."""

    def __init__(self, recorder: Optional[OutputRecorder], name: str, dim: int) -> None:
        self.recorder, self.name, self.dim = recorder, name, dim

    def __call__(self, module: nn.Module, inputs, output) -> Optional[Tensor]:
        recorder = self.recorder
        if recorder is None:  # a copy's: it records nothing, and leaves the copied layer unhooked from now on
            if not torch.compiler.is_compiling():  # (not while a graph is traced: no module mutation there)
                _drop_inactive_hooks(module)
            return
        if not recorder.enabled or not torch.is_grad_enabled():
            return
        if not (module.training or recorder.record_in_eval):
            return
        node = torch._C._current_autograd_node()
        if node is not None:  # a forward recomputed inside backward (activation checkpointing)
            if node.name() == "CheckpointFunctionBackward":  # reentrant: its first forward ran without gradients
                _warn_reentrant(self.name)
            return  # non-reentrant: the output was recorded at the first forward
        if not isinstance(output, Tensor):
            kind = type(output).__name__
            raise TypeError(f"layer {self.name!r} returned {kind}; only tensor outputs can be recorded")
        if not -output.ndim <= self.dim < output.ndim:  # here, at the forward that made it, not at loss() much later
            raise ValueError(f"channel_dim {self.dim} is out of range for layer {self.name!r}'s output of shape "
                             f"{tuple(output.shape)}")  # fmt: skip
        tap = None
        if recorder.alias_outputs:
            if recorder.taps is not None and recorder.taps(output, self.dim):
                # A tap: the layer's consumers get the alias (returned below), the record keeps Y itself; a loss of
                # the record can then add its gradient into the model's own one at the alias (a hook on it), in
                # one pass, where autograd would write it apart and add the two.
                tap = output.view_as(output)
            else:
                # An alias made here, right after the layer: its backward node then sits between the layer and the
                # layer's consumers in autograd's order, so a regularizer's gradient (computed first, its node being
                # the last created) reaches Y after the model's own and is added into that buffer in place. Recorded
                # as is, Y would get the regularizer's gradient first and autograd would allocate a new buffer for
                # the sum.
                output = output.view_as(output)
        version = None if torch.compiler.is_compiling() else output._version
        recorder.records.append(Record(output, self.dim, self.name, version, tap))
        return tap

    def __reduce__(self):
        return (_RecordHook, (None, self.name, self.dim))

    def __deepcopy__(self, memo) -> _RecordHook:
        return _RecordHook(None, self.name, self.dim)


def _warn_reentrant(layer: str) -> None:
    warnings.warn(
        f"layer {layer!r} ran inside a reentrant activation checkpoint (torch.utils.checkpoint(..., "
        "use_reentrant=True)), whose forward runs without gradients: its output was not recorded, so the loss of "
        "the records computed before this backward left it out. Use use_reentrant=False, which records it",
        RuntimeWarning,
        stacklevel=2,
    )


def _drop_inactive_hooks(module: nn.Module) -> None:
    """Removes the recorder-less _RecordHook copies (left by pickling or deep-copying a hooked model) from module: a
    layer that keeps one counts as hooked (the i-ResNet block's fast paths step aside for hooks), and each copy of a
    copy added one more."""
    for key, hook in list(module._forward_hooks.items()):
        if isinstance(hook, _RecordHook) and hook.recorder is None:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


class OutputRecorder:
    """Keeps the output of each chosen layer at every forward call (a layer called twice is recorded twice), while
    the layer is in training mode (or always, with record_in_eval=True) and gradients are enabled; forwards that
    activation checkpointing recomputes inside backward are not recorded again.

    records: [(output, channel_dim)] (Record tuples), in call order; take() returns and clears them, peek() returns a
    copy; both raise RuntimeError if a recorded output was modified in place since its layer returned it (an
    nn.ReLU(inplace=True) right after the layer: a loss of the records would see the modified values, not the
    layer's output; check_unmodified). alias_outputs=True records an
    alias of each output made right after its layer instead (what SelfOrthogonality uses: a loss of the records then
    has its gradient added into the model's own in place); the gradient of any other loss with respect to such a
    record is then only what flows through the record. With alias_outputs, `taps` (an attribute, None by default;
    not pickled nor copied: its owner sets it again) may be set to a predicate of (output, channel_dim): where it
    holds, the layer returns the alias instead (Record.tap) and the output itself is recorded. Setting .enabled =
    False pauses recording (the hooks stay attached and return at once). Use remove() (or a `with` block) to detach
    the hooks. Pickling or deep-copying the recorder together with its model gives a recorder hooked to the copied
    layers (records are not copied).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        *,
        channel_dim: Optional[Union[int, Sequence[int]]] = None,
        record_in_eval: bool = False,
        alias_outputs: bool = False,
    ) -> None:
        self.layers = resolve_layers(model, layers)
        if channel_dim is None:
            dims = [default_channel_dim(m) for _, m in self.layers]
        elif isinstance(channel_dim, int) and not isinstance(channel_dim, bool):
            dims = [channel_dim] * len(self.layers)
        elif not isinstance(channel_dim, (list, tuple)):
            raise TypeError(f"channel_dim must be None, an int or one int per layer, got {channel_dim!r}")
        else:
            dims = list(channel_dim)
            if len(dims) != len(self.layers) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
                raise ValueError(f"channel_dim must be an int or one int per layer ({len(self.layers)}), "
                                 f"got {channel_dim!r}")  # fmt: skip
        self.dims = dims
        self.record_in_eval = bool(record_in_eval)
        self.alias_outputs = bool(alias_outputs)
        self.enabled = True
        self.records: List[Tuple[Tensor, int]] = []
        self.taps: Optional[Callable[[Tensor, int], bool]] = None
        self._attach()

    def _attach(self) -> None:
        self._handles = [m.register_forward_hook(_RecordHook(self, name, d))
                         for (name, m), d in zip(self.layers, self.dims)]  # fmt: skip

    def __getstate__(self) -> dict:
        return {"layers": self.layers, "dims": self.dims, "record_in_eval": self.record_in_eval,
                "alias_outputs": self.alias_outputs, "enabled": self.enabled,
                "attached": bool(self._handles)}  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        self.layers, self.dims, self.record_in_eval = state["layers"], state["dims"], state["record_in_eval"]
        self.alias_outputs = state.get("alias_outputs", False)
        self.enabled = state.get("enabled", True)
        self.records = []
        self.taps = None
        self._handles = []
        for _, module in self.layers:  # the copied layers' copies of the old hooks: this recorder hooks them anew
            _drop_inactive_hooks(module)
        if state["attached"]:
            self._attach()

    @property
    def names(self) -> List[str]:
        return [name for name, _ in self.layers]

    def take(self) -> List[Tuple[Tensor, int]]:
        """The records, cleared here; RuntimeError (check_unmodified) if one was modified in place since."""
        records, self.records = self.records, []
        check_unmodified(records)
        return records

    def peek(self) -> List[Tuple[Tensor, int]]:
        """A copy of the records, kept here; RuntimeError (check_unmodified) if one was modified in place since."""
        check_unmodified(self.records)
        return list(self.records)

    def clear(self) -> None:
        self.records = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.records = []

    def __enter__(self) -> OutputRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
