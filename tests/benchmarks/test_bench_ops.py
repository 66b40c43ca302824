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


def test_real_inputs_with_bf16_scores(tmp_path):
    # Captures layer 1 of the default model with the shipped adapter on real text, checks both paths
    # against the references (bf16 score product), then times them.
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and then it rests in the shade. " * 60)
    output = tmp_path / "ops.json"
    completed = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--inputs", "real", "--text", str(text), "--score-dtype", "bfloat16",
            "--tiers", "prefill", "decode", "--prefill-tokens", "400", "--decode-tokens", "600", "--top-k", "64",
            "--repeats", "1", "--idle-wait", "0", "--retries", "0", "--output", str(output),
        ],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["settings"]["inputs"] == "real"
    assert results["settings"]["score_dtype"] == "bfloat16"
    assert [case["status"] for case in results["cases"]] == ["ok"] * 4
    # Each case's memory comes from its second child process.
    assert all("peak_rss_growth_bytes" in case and case["baseline_rss_bytes"] > 0 for case in results["cases"])
    dsa_prefill = next(case for case in results["cases"] if case["path"] == "dsa" and case["tier"] == "prefill")
    assert dsa_prefill["check"]["rows"], "no selected row was compared with the reference"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--inputs", "real", "--shape", "qwen3-4b"], "--shape qwen3-4b has no model here"),
        (["--inputs", "real", "--text", "missing.txt"], "--text missing.txt is not a file"),
        (["--inputs", "real", "--real-layer", "0", "--decode-tokens", "300", "--tiers", "decode"], "--real-layer 0 is a dense layer"),
        (["--inputs", "real", "--real-layer", "30", "--decode-tokens", "300", "--tiers", "decode"], "--real-layer 30 is out of range"),
        (["--text", "poe.txt"], "--text poe.txt applies to --inputs real only"),
        (["--real-layer", "3"], "--real-layer 3 applies to --inputs real only"),
    ],
)
def test_real_inputs_reject_bad_options(tmp_path, arguments, message):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments, "--idle-wait", "0", "--output", str(tmp_path / "ops.json")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert completed.returncode != 0
    assert message in completed.stderr
