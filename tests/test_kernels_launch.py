"""kernels/_launch.py: a compiled kernel is relaunched directly only for the exact call signature it was compiled
for (what Triton specializes on), with every parameter in order; anything else goes through the JIT."""

import pytest
import torch

pytest.importorskip("triton")
from kexue_fast.kernels import _launch


class FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class FakeKernel:
    """A JITFunction stand-in: (y, n, x, BLOCK, MODE); its launches return a compiled kernel (None: the interpreter)."""

    arg_names = ("y", "n", "x", "BLOCK", "MODE")

    def __init__(self, compiles=True):
        self.log, self.compiles = [], compiles

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.log) if self.compiles else None

        return jit


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(_launch, "_RUNNERS", type(_launch._RUNNERS)())


def test_second_launch_of_a_signature_is_direct_with_every_parameter_in_order(direct):
    k = FakeKernel()
    y = torch.zeros(8)
    _launch.launch(k, 3, (y, 5, 0.5), {"BLOCK": 16, "MODE": 1}, {"num_warps": 4})
    _launch.launch(k, 3, (y, 5, 0.25), {"MODE": 1, "BLOCK": 16}, {"num_warps": 4})
    assert k.log[0] == ("jit", (3,), (y, 5, 0.5), {"BLOCK": 16, "MODE": 1, "num_warps": 4})
    # constexprs given in another order are another key: a second JIT launch, then direct ones in parameter order
    _launch.launch(k, 3, (y, 5, 0.25), {"MODE": 1, "BLOCK": 16}, {"num_warps": 4})
    assert [entry[0] for entry in k.log] == ["jit", "jit", "direct"]
    assert k.log[2] == ("direct", (3, 1, 1), (y, 5, 0.25, 16, 1))


@pytest.mark.parametrize(
    "change",
    ["grid", "int", "alignment", "dtype", "constexpr", "options"],
)
def test_any_change_of_what_triton_specializes_on_goes_through_the_jit(direct, change):
    k = FakeKernel()
    base = torch.zeros(16)
    call = {"grid": 3, "args": (base, 5, 0.5), "constexprs": {"BLOCK": 16, "MODE": 1}, "options": {"num_warps": 4}}
    _launch.launch(k, call["grid"], call["args"], call["constexprs"], call["options"])
    if change == "grid":
        call["grid"] = 4
    elif change == "int":
        call["args"] = (base, 6, 0.5)
    elif change == "alignment":
        call["args"] = (base[1:], 5, 0.5)  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        call["args"] = (base.double(), 5, 0.5)
    elif change == "constexpr":
        call["constexprs"] = {"BLOCK": 32, "MODE": 1}
    else:
        call["options"] = {"num_warps": 8}
    _launch.launch(k, call["grid"], call["args"], call["constexprs"], call["options"])
    assert [entry[0] for entry in k.log] == ["jit", "jit"]


def test_no_compiled_kernel_or_disabled_means_the_jit_every_time(direct, monkeypatch):
    k = FakeKernel(compiles=False)  # the interpreter's launches return None
    y = torch.zeros(8)
    for _ in range(2):
        _launch.launch(k, 2, (y, 1, 0.5), {"BLOCK": 16, "MODE": 0}, {})
    assert [entry[0] for entry in k.log] == ["jit", "jit"]
    monkeypatch.setattr(_launch, "ENABLED", False)
    k = FakeKernel()
    for _ in range(2):
        _launch.launch(k, 2, (y, 1, 0.5), {"BLOCK": 16, "MODE": 0}, {})
    assert [entry[0] for entry in k.log] == ["jit", "jit"]


def test_constexprs_must_name_every_remaining_parameter(direct):
    k = FakeKernel()
    y = torch.zeros(8)
    for _ in range(2):  # MODE left to a default: not cached, since the runner needs every parameter
        _launch.launch(k, 2, (y, 1, 0.5), {"BLOCK": 16}, {})
    assert [entry[0] for entry in k.log] == ["jit", "jit"]


def test_direct_launches_are_off_on_rocm_and_when_asked(monkeypatch):
    monkeypatch.delenv("KEXUE_FAST_DIRECT_LAUNCH", raising=False)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(_launch.triton, "__version__", "3.6.0")
    assert _launch._supported()
    monkeypatch.setattr(_launch.triton, "__version__", "3.2.0")  # the runner took only the non-constexprs then
    assert not _launch._supported()
    monkeypatch.setattr(_launch.triton, "__version__", "3.6.0")
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert not _launch._supported()
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setenv("KEXUE_FAST_DIRECT_LAUNCH", "0")
    assert not _launch._supported()
