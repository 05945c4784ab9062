"""`python -m kexue_fast.info` and `python -m kexue_fast.bench` run and say what they should."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from kexue_fast import _dispatch


def test_info_reports_versions_core_and_choices():
    out = subprocess.run([sys.executable, "-m", "kexue_fast.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "_core" in out and "triton" in out
    assert "power_iteration" in out
    expected = "cpp" if _dispatch.core_status()[0] else "torch"
    assert any(line.startswith("power_iteration") and f" {expected}" in line for line in out.splitlines())
    env = {**__import__("os").environ, "KEXUE_FAST_BACKEND": "torch"}  # the environment's choice wins over auto
    out = subprocess.run([sys.executable, "-m", "kexue_fast.info"], capture_output=True, text=True, check=True,
                         env=env).stdout  # fmt: skip
    assert any(line.startswith("power_iteration") and "torch (requested by KEXUE_FAST_BACKEND)" in line
               for line in out.splitlines())  # fmt: skip


@pytest.mark.parametrize("variable, expected", [
    ("KEXUE_FAST_AVX512", "AVX-512 paths off"),
    ("KEXUE_FAST_OMP_TEAM", "SOM core runs on the calling thread (no OpenMP team: off or none loaded), 1 thread(s)"),
])  # fmt: skip
@pytest.mark.parametrize("value", ["0", "off", "FALSE", "No"])
def test_info_says_how_the_som_core_runs(variable, expected, value):
    """`info` says whether the C++ SOM core's AVX-512 paths run and where its threads run; each switch turns off, by
    "0" and by the usual spellings of off (only "0" did: "off" left both on, silently)."""
    if not _dispatch.core_status()[0]:
        return
    env = {**__import__("os").environ, variable: value}
    out = subprocess.run([sys.executable, "-m", "kexue_fast.info"], capture_output=True, text=True, check=True,
                         env=env).stdout  # fmt: skip
    assert expected in out


def test_backends_are_checked_before_any_work_or_change(monkeypatch):
    """A bad backend raised only after the work it was for had begun: update_spectral_norms iterated a model's conv
    layers first (and raised nothing for a model without matrix layers), hsic took its median bandwidths first
    (seconds at n = 30000), JoSE stored any value until fit(). `auto` for a dtype no backend runs picked torch,
    which then refused it (and `info` named torch): now it raises, and info says none."""
    import torch
    from torch import nn

    from kexue_fast import hsic
    from kexue_fast.hsic import api
    from kexue_fast.jose import JoSE
    from kexue_fast.nn import spectral_norm, update_spectral_norms

    torch.manual_seed(0)
    conv_only = nn.Sequential(spectral_norm(nn.Conv2d(2, 3, 3), input_shape=(2, 6, 6)))
    mixed = nn.Sequential(spectral_norm(nn.Conv2d(2, 3, 3), input_shape=(2, 6, 6)), spectral_norm(nn.Linear(4, 4)))
    for model in (conv_only, mixed, nn.Linear(2, 2)):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for bad in ("bogus", 123):
            with pytest.raises(ValueError, match="backend"):
                update_spectral_norms(model, backend=bad)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    half = nn.Sequential(spectral_norm(nn.Conv2d(2, 3, 3), input_shape=(2, 6, 6)), spectral_norm(nn.Linear(4, 4)))
    half[1].half()  # a float16 matrix group, which the C++ core does not take
    u = half[0].parametrizations.weight[0]._u.clone()
    with pytest.raises(NotImplementedError, match="cpp"):
        update_spectral_norms(half, backend="cpp")
    assert torch.equal(half[0].parametrizations.weight[0]._u, u)  # the conv layer was not iterated first

    def no_median(*args, **kwargs):
        raise AssertionError("the median bandwidth ran before the backend was checked")

    monkeypatch.setattr(api, "median_bandwidth", no_median)
    x = torch.randn(64, 3)
    with pytest.raises(ValueError, match="backend"):
        hsic(x, x, backend="bogus")
    for bad in (1, "bogus", b"cpp"):
        with pytest.raises(ValueError, match="backend"):
            JoSE(backend=bad)
    cpu = torch.device("cpu")
    with pytest.raises(NotImplementedError, match="no backend runs jose_train"):
        _dispatch.choose("jose_train", cpu, torch.float64)
    assert _dispatch.describe("jose_train", cpu, torch.float64, None).startswith("none")


def test_import_does_not_import_triton_or_dynamo():
    # DESIGN §3: probes are lazy; `import triton` costs ~0.5 s and torch._dynamo ~1 s.
    code = "import sys, kexue_fast; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bench_writes_results(tmp_path):
    from kexue_fast.benchmarks import spectral

    path = spectral.run(tmp_path, quick=True, device="cpu", layer_counts=(1, 3), reps=3)
    text = path.read_text()
    assert "torch / ours" in text and "git:" in text and "machine:" in text
    assert (tmp_path / "spectral-cpu.csv").exists()
    table = text.split("\n\n")[2].splitlines()  # title, metadata, then the main table
    assert table[0].startswith("| layers") and len(table) == 4  # header, rule, one row per layer count
    assert "C++ kernel ms" in text


def test_flows_bench_and_digits_script_run(tmp_path):
    from kexue_fast.benchmarks import digits, flows

    path = flows.run(tmp_path, cases=((2, 16, 32),), terms=(3,), reps=2)
    text = path.read_text()
    assert "kexue_fast Neumann" in text and "normflows Neumann" in text and "FrEIA" in text
    path = digits.run(tmp_path, steps=3, batch=16)
    assert "bits/dim" in path.read_text()


def test_hsic_bench_runs(tmp_path):
    from kexue_fast.benchmarks import hsic

    text = hsic.run(tmp_path, sizes=(40,), max_runs=1).read_text()
    assert "kexue_fast" in text and "naive torch" in text
    failed = [line for line in text.splitlines() if "failed" in line]
    # hyppo is a bench extra: a machine without it (a lent GPU's bare image) reports its row as failed, nothing else
    assert failed == ([] if importlib.util.find_spec("hyppo") else ["| 40 | hyppo | failed/timeout |  |  |  |  |"])


def test_hsic_bottleneck_example_runs(tmp_path):
    from kexue_fast.benchmarks import hsic_bottleneck

    text = hsic_bottleneck.run(tmp_path, epochs=1).read_text()
    assert "linear probe (HSIC-trained)" in text and "random init" in text


def test_auto_skips_a_backend_registered_as_slower_without_warning(caplog):
    import torch

    if not _dispatch.core_status()[0]:
        import pytest

        pytest.skip("needs kexue_fast._core")
    cpu = torch.device("cpu")
    _dispatch.register_op("_test_not_auto", {"cpp": (torch.float32,), "torch": (torch.float32,)},
                          not_auto={"cpp": "measured slower in a test"})  # fmt: skip
    try:
        with caplog.at_level("WARNING", logger="kexue_fast"):
            assert _dispatch.choose("_test_not_auto", cpu, torch.float32) == "torch"
        assert not caplog.records  # a deliberate choice, not a missing fast path
        assert _dispatch.choose("_test_not_auto", cpu, torch.float32, "cpp") == "cpp"  # explicit still runs it
        assert "measured slower in a test" in _dispatch.describe("_test_not_auto", cpu, torch.float32)
    finally:
        del _dispatch._OPS["_test_not_auto"]


def test_an_older_triton_is_refused_clearly_for_dtypes_its_compiler_cannot_build(monkeypatch):
    """Triton 3.3 and 3.4 cannot compile a float64 tl.dot (tests/test_kernels_compile.py under them): SOM's float64
    kernels and HSIC's backward are refused there with the reason, instead of failing inside the compiler."""
    import pytest
    import torch

    pytest.importorskip("triton")
    from kexue_fast.hsic import api as hsic_api
    from kexue_fast.ortho import som

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors count as Triton's, as on a GPU
    cpu = torch.device("cpu")
    monkeypatch.setattr(_dispatch, "triton_version", lambda: (3, 4))
    reason = _dispatch.why_not(som.OP, "triton", cpu, torch.float64)
    assert reason is not None and "float64 tl.dot" in reason and "3.5" in reason
    assert _dispatch.why_not(som.OP, "triton", cpu, torch.float32) is None
    assert "3.5" in _dispatch.why_not(hsic_api.OP, "triton", cpu, torch.float32)
    with pytest.raises(NotImplementedError, match=r"compiles from 3\.5"):
        som.som_regularizer(torch.randn(8, 3, dtype=torch.float64), backend="triton")
    monkeypatch.setattr(_dispatch, "triton_version", lambda: (3, 5))
    assert _dispatch.why_not(som.OP, "triton", cpu, torch.float64) is None
    monkeypatch.setattr(_dispatch, "triton_version", lambda: (3, 1))  # its compiler aborts on SOM's bfloat16 dots
    assert "3.2" in _dispatch.why_not(som.OP, "triton", cpu, torch.bfloat16)
    assert _dispatch.why_not(som.OP, "triton", cpu, torch.float16) is None
    monkeypatch.setattr(_dispatch, "triton_version", lambda: (3, 2))
    assert _dispatch.why_not(som.OP, "triton", cpu, torch.bfloat16) is None


def test_double_backward_through_closed_form_gradients_raises_clearly():
    """Functions whose backward has no graph of its own refuse create_graph=True: a second-order term through them
    would otherwise be silently missing from a larger expression (here a gradient penalty plus a plain term)."""
    import pytest
    import torch
    from torch import nn

    from kexue_fast.hsic import hsic
    from kexue_fast.nn import InvertibleResBlock, spectral_norm
    from kexue_fast.ortho import som_regularizer
    from kexue_fast.rope import ellipj

    d64 = torch.float64
    x = torch.rand(6, 2, dtype=d64, requires_grad=True)
    g = nn.Sequential(spectral_norm(nn.Linear(2, 4), coeff=0.9), nn.Softplus(),
                      spectral_norm(nn.Linear(4, 2), coeff=0.9))  # fmt: skip
    block = InvertibleResBlock(g.double())
    assert block.series_path == "autograd"
    cases = {  # the public op named, and what supports double backward where something does
        "the Jacobi elliptic functions": lambda t: ellipj(t, 0.5, backend="cpp").sn.sum(),
        "the Jacobi elliptic functions ": lambda t: ellipj(t, 0.5, backend="torch").sn.sum(),
        r"som_regularizer .* torch.func transforms": lambda t: som_regularizer(t.reshape(3, 2, 2), backend="torch"),
        r"hsic / cka .* kexue_fast.hsic.reference": lambda t: hsic(t, t.detach() ** 2),
        "memory-efficient Neumann gradient .* memory_efficient=False": lambda t: block(t)[1].sum(),
    }
    for name, fn in cases.items():
        with pytest.raises(RuntimeError, match=f"double backward .*{name.strip()}"):
            torch.autograd.grad(fn(x) + x.pow(3).sum(), x, create_graph=True)
        (first,) = torch.autograd.grad(fn(x), x)  # first order is unaffected
        assert bool(first.isfinite().all())


# ------------------------------------------------------------------------------------- fixes from an audit
def test_info_survives_a_bad_backend_variable():
    """The tool that diagnoses a bad KEXUE_FAST_BACKEND died on it with a traceback."""
    env = {**__import__("os").environ, "KEXUE_FAST_BACKEND": "CPP"}
    out = subprocess.run([sys.executable, "-m", "kexue_fast.info"], capture_output=True, text=True, check=True,
                         env=env).stdout  # fmt: skip
    assert "KEXUE_FAST_BACKEND INVALID" in out and "'CPP'" in out
    assert any(line.startswith("power_iteration") for line in out.splitlines())


def _fake_suite(monkeypatch, name, run):
    import importlib

    module = importlib.import_module(f"kexue_fast.benchmarks.{name}")
    monkeypatch.setattr(module, "run", run)
    return module


def test_bench_goes_on_past_a_failing_suite_and_skips_cpu_only_suites_on_cuda(tmp_path, monkeypatch, capsys):
    """A missing anchor or corpus in one suite stopped the whole default run (nothing written after it); on a CUDA
    machine the CPU-only infomap suite was rerun and written as infomap-cuda.md."""
    import pytest

    from kexue_fast import bench

    calls = []

    def failing(out_dir, quick=True, device="cpu"):
        calls.append(("jose", device))
        raise FileNotFoundError("no corpus")

    def writing(name):
        def run(out_dir, quick=True, device="cpu"):
            calls.append((name, device))
            path = out_dir / f"{name}-{device}.md"
            path.write_text(f"# {name} on {device}")
            return path

        return run

    _fake_suite(monkeypatch, "jose", failing)
    for name in ("infomap", "rope"):
        _fake_suite(monkeypatch, name, writing(name))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--suite", "jose", "--suite", "infomap", "--suite", "rope", "--out", str(tmp_path)])
    assert stop.value.code == 1
    assert calls == [("jose", "cpu"), ("jose", "cuda"), ("infomap", "cpu"), ("rope", "cpu"), ("rope", "cuda")]
    captured = capsys.readouterr()
    assert "suite jose on cpu failed: FileNotFoundError: no corpus" in captured.err
    assert "failed suites: jose (cpu), jose (cuda)" in captured.err and "# rope on cuda" in captured.out
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):  # checked before any measuring (it failed after a suite had run)
        bench.main(["--suite", "rope", "--out", str(tmp_path / "file")])


def test_quick_runs_never_overwrite_a_full_runs_results(tmp_path, monkeypatch):
    """README's main job (a quick run) wrote over the committed full runs' files; the CSV's metadata filled the row
    a CSV reader takes for the header."""
    import csv

    from kexue_fast.benchmarks import common

    for mode, stem in (("quick", "demo-cpu-quick"), ("full", "demo-cpu"), (None, "demo-cpu")):
        monkeypatch.setattr(common, "RUN_MODE", mode)
        path = common.write_results(tmp_path, "demo-cpu", "Demo", {"date": "d", "git": "g"}, ["a", "b"], [[1, 2]])
        assert path == tmp_path / f"{stem}.md" and (tmp_path / f"{stem}.csv").exists()
    with open(tmp_path / "demo-cpu-quick.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines == [["# date: d"], ["# git: g"], ["a", "b"], ["1", "2"]]
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/spectral-cpu-quick.md"],
                             cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert ignored.returncode in (0, 128)  # ignored (128: not a git checkout, as in an sdist)


def test_results_record_the_packages_checkout_not_the_current_directory(tmp_path, monkeypatch):
    """git ran in the current directory: another repository's HEAD was recorded, or 'unknown' in a subfolder."""
    from kexue_fast.benchmarks.common import git_sha

    monkeypatch.delenv("KEXUE_GIT_SHA", raising=False)
    here = git_sha()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-q",
                    "--allow-empty", "-m", "other"], check=True)  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert git_sha() == here


def test_jose_and_infomap_say_they_need_the_cpp_core(monkeypatch):
    """Without kexue_fast._core the torch/Triton JoSE paths and Infomap failed with a bare 'cannot import name'."""
    import pytest

    import kexue_fast
    from kexue_fast.jose import JoSE

    monkeypatch.delattr(kexue_fast, "_core", raising=False)
    monkeypatch.setitem(sys.modules, "kexue_fast._core", None)
    with pytest.raises(ImportError, match=r"JoSE needs the C\+\+ extension kexue_fast\._core"):
        JoSE(dim=4, min_count=1, epochs=1, backend="torch", progress=False).fit([["a", "b"], ["b", "c"]])
    with pytest.raises(ImportError, match=r"Infomap run on the C\+\+ extension"):
        kexue_fast.infomap(([0, 1, 2], [1, 2, 0]))


def test_core_bindings_refuse_what_a_sanitizer_build_caught():
    """Direct kexue_fast._core calls that an ASan/UBSan build of the cores showed reading or looping wrongly: a delta
    kernel side without columns (a null read; a segfault), n·c·s overflowing int64 (a heap overflow), all-zero
    counts (NaN cast to a table slot), NaN rows in the k-th pair search (it never ended), dim 0 JoSE tables (the
    init redrew zero rows for ever), element-misaligned arrays (misaligned loads)."""
    import numpy as np
    import pytest

    from kexue_fast import _core

    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least one column"):
        _core.hsic_stats(rng.random((5, 2)), np.zeros((5, 0)), 0, 1.0, 4, 0.0, 1)
    with pytest.raises(ValueError, match="one column of labels"):
        _core.hsic_stats(rng.random((5, 2)), np.zeros((5, 2)), 0, 1.0, 4, 0.0, 1)
    with pytest.raises(ValueError, match="overflows"):
        _core.som_penalty(np.zeros(0, np.float32), 2**62, 4, 1, 1.0, 1.0, 1.0, 1e-8, None, 1)
    with pytest.raises(ValueError, match="positive count"):
        _core.jose_negative_table(np.array([0, 0]), 1000)
    x = rng.random((6, 2))
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        _core.kth_pair_sq_distance(x, 10, 0, 1024, 0, 1)
    empty = np.zeros((3, 0), np.float32)
    with pytest.raises(ValueError, match="columns"):
        _core.jose_init_tables(empty, empty.copy(), np.zeros((2, 0), np.float32), 0)
    raw = np.zeros(8 * 20 + 1, np.uint8)
    misaligned = np.frombuffer(raw.data, dtype=np.float64, count=20, offset=1).reshape(10, 2)
    with pytest.raises(ValueError, match="not aligned to its element size"):
        _core.hsic_stats(misaligned, misaligned.copy(), 0, 1.0, 0, 1.0, 1)
    import torch  # a tensor made at a byte offset reaches the binding too: the message says what to do

    import kexue_fast

    shifted = torch.frombuffer(bytearray(8 * 12 + 1), dtype=torch.float64, offset=1, count=12).view(4, 3)
    with pytest.raises(ValueError, match=r"w's data is not aligned .*\(t\.clone\(\)"):
        kexue_fast.power_iteration(shifted, backend="cpp")


def test_som_sweep_settings_are_checked():
    import pytest

    from kexue_fast.benchmarks import som_profile

    settings = som_profile.parse_settings('[{}, {"GRAD_ROWS": 32, "tf32": true}]')
    assert settings == [{}, {"GRAD_ROWS": 32, "tf32": True}]
    for bad, match in (('[{"GRAD_ROW": 32}]', "unknown knobs"), ('{"GRAD_ROWS": 32}', "JSON list"), ("[{", "JSON")):
        with pytest.raises(ValueError, match=match):
            som_profile.parse_settings(bad)


def test_som_profile_counts_page_faults_per_step(capsys):
    """som_profile --faults: both steps' median time and page-fault counts, and the overhead, one line each."""
    from kexue_fast.benchmarks import som_profile

    som_profile.page_faults(batch=2, steps=2)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("CPU step, batch 2, 2 interleaved steps each")
    assert [line.split(":")[0].strip() for line in out[1:]] == ["step", "step + SOM (cpp)", "overhead"]
    assert all("minor page faults per step median" in line for line in out[1:3])


def test_som_profile_splits_the_host_side_in_the_step(capsys):
    """som_profile --host-split: each piece of the C++ route's host side timed in the step (all of them ran), and the
    pieces it wrapped restored after."""
    from kexue_fast.benchmarks import som_profile
    from kexue_fast.ortho import hooks, som

    before = (hooks._RecordHook.__call__, som._TapSlot.__call__, som._Probe.__call__, som._cpp_core,
              som._CppPenalty.__dict__["backward"])  # fmt: skip
    som_profile.host_split(batch=2, steps=2)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("CPU step, batch 2, 2 interleaved steps each")
    pieces = {line.split(":")[0].strip(): float(line.split(":")[1].split("(")[0]) for line in out[1:]}
    labels = [
        "forward hooks",
        "loss() (less the C++ calls in it)",
        "penalty backward",
        "tap hooks (less the C++ calls in it)",
        "C++ forward",
        "C++ backward",
        "Python and torch in those pieces",
    ]
    assert list(pieces) == labels  # fmt: skip
    assert all(value > 0 for value in pieces.values())
    assert before == (hooks._RecordHook.__call__, som._TapSlot.__call__, som._Probe.__call__, som._cpp_core,
                      som._CppPenalty.__dict__["backward"])  # fmt: skip


def test_som_profile_runs_the_address_calls_on_builds_without_them():
    """--compare-cores with builds from before som_penalties_at / som_gram_backward_at: som_profile runs the library's
    address calls through those builds' array calls, with the same results; NoOpCore's address calls write zeros."""
    import numpy as np
    import torch

    from kexue_fast import _core
    from kexue_fast.benchmarks import som_profile

    class OldCore:  # what a build before the address calls offers
        som_penalties, som_gram_backward = _core.som_penalties, _core.som_gram_backward
        som_z_stride = _core.som_z_stride

    g = torch.Generator().manual_seed(3)
    n, c, s = 3, 8, 256
    y = torch.randn(n * c * s, generator=g) * 0.4
    z = {k: torch.zeros(n * c * _core.som_z_stride(s, 4)) for k in ("new", "old")}
    a = {k: torch.zeros(c, c, dtype=torch.float64) for k in ("new", "old")}
    out = {k: torch.zeros((), dtype=torch.float64) for k in ("new", "old")}
    for key, core in (("new", _core), ("old", OldCore())):
        calls = [(y.data_ptr(), False, n, c, s, 10.0, 2.0, 0.5, 1e-12, a[key].data_ptr(), 1, z[key].data_ptr())] * 2
        som_profile._penalties_at(core, calls, out[key].data_ptr(), True, True)
    assert out["new"].item() == out["old"].item() != 0 and torch.equal(a["new"], a["old"]) and z["new"].any()
    assert torch.equal(z["new"], z["old"])
    for add, from_z in ((False, False), (True, False), (True, True)):
        dy = {k: torch.ones(n * c * s) for k in ("new", "old")}
        source = z["new"] if from_z else y
        for key, core in (("new", _core), ("old", OldCore())):
            som_profile._gram_backward_at(core, source.data_ptr(), False, n, c, s, 10.0, a["new"].data_ptr(),
                                          dy[key].data_ptr(), 1, 0.7, add, from_z)  # fmt: skip
        assert torch.equal(dy["new"], dy["old"]) and not torch.equal(dy["new"], torch.ones(n * c * s))
    r = np.full(2, np.nan, np.float32)
    som_profile.NoOpCore().som_penalties_at(calls, r.ctypes.data, False)
    assert not r.any() and not a["old"].any()
