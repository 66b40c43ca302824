import json
import math

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsa
from dsa.evaluation import EvalSettings, evaluate
from dsa.evaluation.main import main as eval_main


@pytest.fixture(scope="module")
def converted(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=16), indexer_trained=True)
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


def test_evaluate_compares_three_attentions(converted, text_file):
    model, tokenizer = converted
    settings = EvalSettings(context_lengths=[64, 96], top_ks=[8, 128], windows=2, passkey_trials=2)
    results = evaluate(model, tokenizer, text_file.read_text(), settings, show_progress=False)
    for length in ("64", "96"):
        entry = results["lengths"][length]
        dense = entry["dense"]["perplexity"]
        assert math.isfinite(dense)
        assert dense > 1
        small, large = entry["top_k=8"], entry["top_k=128"]
        assert 0 < small["dsa"]["recall_mean"] <= small["oracle"]["recall_mean"] + 1e-6 <= 1 + 1e-6
        assert len(small["dsa"]["recall_per_layer"]) == 2
        # top_k above the window length keeps every key: identical to dense, recall 1.
        assert large["dsa"]["perplexity"] == pytest.approx(dense, rel=1e-6)
        assert large["oracle"]["recall_mean"] == pytest.approx(1.0, abs=1e-5)
        assert 0 <= entry["passkey"]["dense"] <= 1
        assert entry["passkey"]["top_k"] == 16
    # The model's own settings come back after the evaluation.
    assert dsa.get_runtime(model).config.top_k == 16
    assert dsa.get_runtime(model).mode == "sparse"


def test_text_too_short_rejected(converted):
    model, tokenizer = converted
    with pytest.raises(ValueError, match="fewer than one window of 4096"):
        evaluate(model, tokenizer, "short text", EvalSettings(context_lengths=[4096], top_ks=[8], passkey_trials=0), show_progress=False)


def test_cli_writes_json_report_and_plots(tiny_checkpoint, text_file, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=16))
    dsa.save_indexer(model, tmp_path / "adapter")
    output = tmp_path / "eval"
    args = ["--model_name_or_path", str(tiny_checkpoint), "--indexer_path", str(tmp_path / "adapter"), "--data", str(text_file),
            "--output_dir", str(output), "--context_lengths", "64", "--top_k", "8", "--windows", "1", "--passkey_trials", "1"]
    assert eval_main(args) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["lengths"]["64"]["top_k=8"]["dsa"]["recall_mean"] > 0
    assert "| 64 | 8 |" in (output / "report.md").read_text()
    assert (output / "perplexity_recall.png").stat().st_size > 1000
    assert (output / "recall_per_layer.png").is_file()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        eval_main(args)


def test_cli_requires_indexer_for_plain_model(tiny_checkpoint, text_file, tmp_path):
    with pytest.raises(ValueError, match="pass --indexer_path"):
        eval_main(["--model_name_or_path", str(tiny_checkpoint), "--data", str(text_file), "--output_dir", str(tmp_path)])


def _small_cli_run(tiny_checkpoint, text_file, tmp_path, *options):
    """Run `dsa eval` on the tiny model with a fresh adapter at 64 tokens and top_k 8; return the output folder."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=16))
    dsa.save_indexer(model, tmp_path / "adapter")
    output = tmp_path / "eval"
    assert eval_main(["--model_name_or_path", str(tiny_checkpoint), "--indexer_path", str(tmp_path / "adapter"),
                      "--data", str(text_file), "--output_dir", str(output), "--context_lengths", "64", "--top_k", "8",
                      "--windows", "1", "--passkey_trials", "0", *options]) == 0
    return output


def test_cli_dense_layers_reach_report(tiny_checkpoint, text_file, tmp_path):
    output = _small_cli_run(tiny_checkpoint, text_file, tmp_path, "--dense_layers", "0")
    results = json.loads((output / "results.json").read_text())
    assert results["dsa_config"]["dense_layers"] == [0]
    assert list(results["lengths"]["64"]["top_k=8"]["dsa"]["recall_per_layer"]) == ["1"]
    assert "Layers [0] keep dense attention" in (output / "report.md").read_text()


def test_cli_bf16_index_scores_reach_results(tiny_checkpoint, text_file, tmp_path):
    output = _small_cli_run(tiny_checkpoint, text_file, tmp_path, "--indexer_score_dtype", "bfloat16")
    results = json.loads((output / "results.json").read_text())
    assert results["dsa_config"]["indexer_score_dtype"] == "bfloat16"
    assert "index scores bfloat16" in (output / "report.md").read_text()


def test_quality_checks_judge_against_oracle():
    from dsa.evaluation.report import quality_checks

    def kind(perplexity, recall):
        return {"perplexity": perplexity, "recall_mean": recall, "recall_per_layer": {"0": recall}}

    results = {"lengths": {
        "1024": {"dense": {"perplexity": 10.0}, "top_k=64": {"oracle": kind(10.2, 0.90), "dsa": kind(10.25, 0.88)},
                 "passkey": {"top_k": 64, "dense": 1.0, "dsa": 1.0}},
        "2048": {"dense": {"perplexity": 10.0}, "top_k=64": {"oracle": kind(10.2, 0.90), "dsa": kind(11.0, 0.80)},
                 "passkey": {"top_k": 64, "dense": 1.0, "dsa": 0.5}},
    }}
    text = "\n".join(quality_checks(results))
    assert "| 1024 | 64 | 0.978 | met | 1.2 | met |" in text
    assert "| 2048 | 64 | 0.889 | missed | 5.0 | missed |" in text
    assert "Pass key at 1024: DSA 1.00 against dense 1.00, met." in text
    assert "Pass key at 2048: DSA 0.50 against dense 1.00, missed." in text
