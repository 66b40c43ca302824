import re
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import dsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402


def test_demo_runs_end_to_end_on_tiny_model(tiny_checkpoint, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=32))
    dsa.save_indexer(model, tmp_path / "adapter")
    assert demo.main(["--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"),
                      "--context_tokens", "300", "--max_new_tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "context: 300 tokens    top_k: 32" in printed
    assert "keys attended per decoded token (DSA): 32-32 of 300-302" in printed
    assert "sparse layers: 2 of 2\n" in printed
    assert re.search(r"^DSA\s+answer: ", printed, re.MULTILINE)
    assert re.search(r"^dense\s+answer: ", printed, re.MULTILINE)


def test_demo_dense_layers_option(tiny_checkpoint, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=32, dense_layers=[1]))
    dsa.save_indexer(model, tmp_path / "adapter")
    common = ["--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"), "--context_tokens", "300", "--max_new_tokens", "2"]
    assert demo.main(common) == 0
    assert "sparse layers: 1 of 2 (dense: [1])" in capsys.readouterr().out
    assert demo.main([*common, "--dense_layers"]) == 0
    assert "sparse layers: 2 of 2\n" in capsys.readouterr().out
    with pytest.raises(ValueError, match="dense_layers"):
        demo.main([*common, "--dense_layers", "5"])


def test_demo_bf16_index_scores(tiny_checkpoint, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=32))
    dsa.save_indexer(model, tmp_path / "adapter")
    assert demo.main(["--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"), "--context_tokens", "300",
                      "--max_new_tokens", "2", "--indexer_score_dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "top_k: 32    index scores: bfloat16" in printed
    assert "keys attended per decoded token (DSA): 32-32 of 300-301" in printed


def test_demo_rejects_too_long_context(tiny_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=32))
    dsa.save_indexer(model, tmp_path / "adapter")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(ValueError, match="use a longer text or a shorter length"):
        demo.main(["--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"), "--prompt_file", str(short)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max_new_tokens", "0"], "--max_new_tokens 0 is invalid"),
        (["--depth", "2"], "--depth 2.0 is invalid"),
        (["--top_k", "0"], "--top_k 0 is invalid"),
        (["--context_tokens", "10"], "use a length of at least"),
    ],
)
def test_demo_rejects_bad_options(tiny_checkpoint, tmp_path, args, message):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=32))
    dsa.save_indexer(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=message):
        demo.main(["--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"), *args])


def test_demo_without_sparse_layers(tiny_checkpoint, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    dsa.convert(model, dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=32))
    dsa.save_indexer(model, tmp_path / "adapter")
    assert demo.main(["--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"), "--context_tokens", "300",
                      "--max_new_tokens", "2", "--dense_layers", "0", "1"]) == 0
    printed = capsys.readouterr().out
    assert "sparse layers: 0 of 2 (dense: [0, 1])" in printed
    assert "every key, since no layer is sparse" in printed


def test_shipped_text_is_long_enough():
    assert Path(demo.DEFAULT_TEXT).stat().st_size > 40000
