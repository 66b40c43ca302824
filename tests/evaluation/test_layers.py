import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsa
from dsa.evaluation import EvalSettings, LayerScanSettings, evaluate, scan_layers
from dsa.evaluation.layers import main as layers_main


@pytest.fixture(scope="module")
def converted(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    torch.manual_seed(0)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=16), indexer_trained=True)
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


def test_scan_ranks_layers_and_ends_dense(converted, text_file):
    model, tokenizer = converted
    text = text_file.read_text()
    result = scan_layers(model, tokenizer, text, LayerScanSettings(context_length=64, top_k=8, max_dense=2, oracle=True), show_progress=False)
    single = result["single_layer"]["dsa"]
    assert sorted(single) == [0, 1]
    assert sorted(result["single_layer"]["oracle"]) == [0, 1]
    assert [single[layer] for layer in result["ranking"]] == sorted(single.values(), reverse=True)
    curve = result["curve"]
    assert [len(point["dense_layers"]) for point in curve] == [0, 1, 2]
    assert curve[1]["dense_layers"] == [result["ranking"][0]]
    # Every layer dense is the dense model.
    assert curve[2]["excess"] == pytest.approx(0.0, abs=1e-6)
    # No dense layer is plain DSA: the same perplexity `dsa eval` reports for that window.
    reference = evaluate(model, tokenizer, text, EvalSettings(context_lengths=[64], top_ks=[8], windows=1, passkey_trials=0), show_progress=False)
    assert curve[0]["perplexity"] == pytest.approx(reference["lengths"]["64"]["top_k=8"]["dsa"]["perplexity"], rel=1e-6)
    assert result["dense"] == pytest.approx(reference["lengths"]["64"]["dense"]["perplexity"], rel=1e-6)
    # Sparse attention changes a random model's perplexity, in either direction.
    assert abs(curve[0]["excess"]) > 1e-6
    # The model's own settings come back after the scan.
    runtime = dsa.get_runtime(model)
    assert runtime.config.top_k == 16
    assert runtime.config.dense_layers == []
    assert runtime.mode == "sparse"


def test_scan_keeps_configured_dense_layers(converted, text_file):
    model, tokenizer = converted
    dsa.update_config(model, dense_layers=[0])
    try:
        result = scan_layers(model, tokenizer, text_file.read_text(), LayerScanSettings(context_length=64, top_k=8, max_dense=1), show_progress=False)
    finally:
        dsa.update_config(model, dense_layers=[])
    assert result["sparse_layers"] == [1]
    assert [point["dense_layers"] for point in result["curve"]] == [[0], [0, 1]]


def test_scan_rejects_bad_settings(converted, text_file):
    model, tokenizer = converted
    with pytest.raises(ValueError, match="max_dense=3 is invalid; expected 0 to 2"):
        scan_layers(model, tokenizer, text_file.read_text(), LayerScanSettings(context_length=64, max_dense=3), show_progress=False)


def test_cli_writes_json_markdown_and_plot(tiny_checkpoint, text_file, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=16))
    dsa.save_indexer(model, tmp_path / "adapter")
    output = tmp_path / "scan"
    args = ["--model_name_or_path", str(tiny_checkpoint), "--indexer_path", str(tmp_path / "adapter"), "--data", str(text_file),
            "--output_dir", str(output), "--context_length", "64", "--top_k", "8", "--max_dense", "1"]
    assert layers_main(args) == 0
    result = json.loads((output / "layers.json").read_text())
    assert len(result["curve"]) == 2
    assert "| layer | DSA excess |" in (output / "layers.md").read_text()
    assert result["settings"]["top_k"] == 8
    assert (output / "layers.png").stat().st_size > 1000
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        layers_main(args)
    assert layers_main([*args, "--overwrite", "--dense_layers", "1", "--max_dense", "0"]) == 0
    result = json.loads((output / "layers.json").read_text())
    assert result["base_dense_layers"] == [1]
    assert result["sparse_layers"] == [0]
    assert "Layers [1] stay dense throughout" in (output / "layers.md").read_text()
