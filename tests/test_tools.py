"""`python -m kexue_fast.info` and `python -m kexue_fast.bench` run and say what they should."""

import subprocess
import sys

from kexue_fast import _dispatch


def test_info_reports_versions_core_and_choices():
    out = subprocess.run([sys.executable, "-m", "kexue_fast.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "_core" in out and "triton" in out
    assert "power_iteration" in out
    expected = "cpp" if _dispatch.core_status()[0] else "torch"
    assert any(line.startswith("power_iteration") and f" {expected}" in line for line in out.splitlines())


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
    assert "kexue_fast" in text and "naive torch" in text and "failed" not in text


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
