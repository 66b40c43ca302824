import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_model_benchmark_writes_results_and_plot(tmp_path):
    output = tmp_path / "model.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_model.py"), "--layers", "1", "--contexts", "200", "--prefill_tokens", "96",
         "--steps", "2", "--top_k", "32", "--dsa_preset", "smollm2-135m", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    (decode,) = results["decode"]
    assert decode["context"] == 200
    assert len(decode["dsa_step_ms"]) == 2
    (prefill,) = results["prefill"]
    assert prefill["tokens"] == 96
    assert "memory call" not in completed.stderr, completed.stderr[-3000:]
    assert prefill["dense_peak_mib"] is None or prefill["dense_peak_mib"] > 0
    assert prefill["dsa_peak_mib"] is None or prefill["dsa_peak_mib"] > 0
    assert output.with_suffix(".png").exists()
    # The preset sizes the indexer (4 heads of 32 dims) and --top_k overrides its top_k of 256.
    config = results["settings"]["dsa_config"]
    assert (config["indexer_heads"], config["indexer_head_dim"], config["top_k"]) == (4, 32, 32)


def test_model_benchmark_rejects_context_within_top_k():
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_model.py"), "--contexts", "100", "--top_k", "128"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 2
    assert "must exceed --top_k=128" in completed.stderr


def test_training_benchmark_reports_slope(tmp_path):
    output = tmp_path / "training.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_training.py"), "--tokens", "256", "512", "--output", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert [case["path"] for case in results["cases"]] == ["dense", "warmup", "dense", "warmup"]
    assert results["warmup_slope_mib_per_1k_tokens"] is not None
    plot = output.with_suffix(".png")
    assert plot.is_file(), "no plot next to the JSON"
    assert plot.stat().st_size > 0, "empty plot"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["training.json", "training.png"]
