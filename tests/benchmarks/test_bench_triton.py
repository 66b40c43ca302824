"""The GPU benchmark script, run at tiny sizes in Triton's interpreter (tests/conftest.py sets it)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the Triton benchmark needs it (pip install triton)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_triton  # noqa: E402

import dsa.ops.sparse_attention.triton as kernels  # noqa: E402

TINY = ["--smoke", "--shapes", "smollm2-135m", "--tokens", "20", "--repeats", "1"]


def test_smoke_run_checks_then_writes_results(tmp_path, capsys):
    output, markdown = tmp_path / "triton.json", tmp_path / "triton.md"
    assert bench_triton.main([*TINY, "--output", str(output), "--markdown", str(markdown)]) == 0
    results = json.loads(output.read_text())
    assert set(results["checks"]["smollm2-135m"]) == {"out", "dq", "dk", "dv"}
    (record,) = results["records"]
    assert record["tokens"] == 20
    assert record["sparse_fwd_ms"] > 0
    assert record["dense_fwd_ms"] > 0
    assert "fwd ratio" in markdown.read_text()
    assert "match PyTorch" in capsys.readouterr().out


def test_failed_check_times_nothing(tmp_path, monkeypatch, capsys):
    wrong = kernels.sparse_attention_triton

    def off_by_one(*args, **kwargs):
        return wrong(*args, **kwargs) + 1

    monkeypatch.setattr(kernels, "sparse_attention_triton", off_by_one)
    output = tmp_path / "triton.json"
    assert bench_triton.main([*TINY, "--output", str(output)]) == 1
    assert not output.exists()
    assert "correctness check failed, nothing timed" in capsys.readouterr().err


def test_existing_output_is_kept(tmp_path, capsys):
    output = tmp_path / "triton.json"
    output.write_text("earlier results")
    assert bench_triton.main([*TINY, "--output", str(output)]) == 2
    assert output.read_text() == "earlier results"
    assert "pass --force" in capsys.readouterr().err


def test_causal_indices_are_distinct_and_visible():
    indices = bench_triton.causal_indices(50, 8, torch.device("cpu"), torch.Generator().manual_seed(0), rows=16)
    for t in range(50):
        row = indices[0, t]
        valid = row[row >= 0]
        assert len(valid) == min(t + 1, 8)
        assert len(set(valid.tolist())) == len(valid)
        assert int(valid.max()) <= t
        assert (row[len(valid):] == -1).all()
