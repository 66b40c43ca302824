import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ops.py"


@pytest.mark.slow
def test_quick_sweep_writes_results(tmp_path):
    output = tmp_path / "ops.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--idle-wait", "0", "--retries", "0", "--output", str(output)],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results
    assert "dense/DSA" in completed.stdout


def test_help_names_units():
    completed = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0
    assert "tokens" in completed.stdout
    assert "seconds" in completed.stdout


def test_help_lists_shapes():
    completed = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert "qwen3-4b" in completed.stdout
