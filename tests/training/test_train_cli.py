import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dsa
from dsa.cli import main as dsa_main
from dsa.training.data import DataError
from dsa.training.main import main as train_main

COMMON = ["--model_max_length", "128", "--per_device_train_batch_size", "4", "--indexer_heads", "2",
          "--indexer_head_dim", "16", "--rope_dim", "8", "--top_k", "16", "--report_to", "none", "--seed", "3"]


def _free_port() -> str:
    """Return a free TCP port on the loopback interface for torchrun's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _history(output_dir: Path) -> list[dict]:
    return [entry for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in entry]


def _first_last(values: list[float], count: int = 3) -> tuple[float, float]:
    return sum(values[:count]) / count, sum(values[-count:]) / count


def test_warmup_lowers_kl_raises_recall_keeps_base(tiny_checkpoint, text_file, tmp_path):
    output = tmp_path / "warmup"
    train_main(["--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(text_file),
                "--output_dir", str(output), "--max_steps", "30", "--logging_steps", "1", "--learning_rate", "1e-2",
                "--save_steps", "30", *COMMON])
    history = _history(output)
    kl_start, kl_end = _first_last([entry["indexer_kl"] for entry in history])
    recall_start, recall_end = _first_last([entry["recall"] for entry in history])
    assert kl_end < kl_start, (kl_start, kl_end)
    assert recall_end > recall_start, (recall_start, recall_end)
    for field in ("learning_rate", "tokens_per_second", "peak_memory_mib"):
        assert field in history[-1]
    # The frozen model's LM loss does not depend on the indexer, so warm-up does not compute it.
    assert "lm_loss" not in history[-1]

    original = load_file(tiny_checkpoint / "model.safetensors")
    trained = load_file(output / "checkpoint-30" / "model.safetensors")
    for name, tensor in original.items():
        assert torch.equal(trained[name], tensor), f"{name} changed during warm-up"
    assert any(".indexer." in name for name in trained)

    model = dsa.load_indexer(__import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_checkpoint), output / "adapter")
    assert dsa.get_runtime(model).config.top_k == 16
    assert (output / "checkpoint-30" / "adapter" / "indexer.safetensors").is_file()


def test_sparse_stage_lowers_lm_loss(tiny_checkpoint, text_file, tmp_path):
    output = tmp_path / "sparse"
    train_main(["--stage", "sparse", "--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(text_file),
                "--output_dir", str(output), "--max_steps", "20", "--logging_steps", "1", "--learning_rate", "2e-3",
                "--save_strategy", "no", *COMMON])
    lm_start, lm_end = _first_last([entry["lm_loss"] for entry in _history(output)])
    assert lm_end < lm_start - 0.1, (lm_start, lm_end)
    assert dsa.is_converted(dsa.from_pretrained(output))


def test_sparse_stage_with_lora(tiny_checkpoint, text_file, tmp_path):
    output = tmp_path / "lora"
    dsa_main(["train", "--stage", "sparse", "--use_lora", "--model_name_or_path", str(tiny_checkpoint),
              "--dataset_name_or_path", str(text_file), "--output_dir", str(output), "--max_steps", "3",
              "--logging_steps", "1", "--save_strategy", "no", *COMMON])
    assert (output / "adapter_model.safetensors").is_file()
    assert (output / "adapter" / "indexer.safetensors").is_file()


def test_resume_matches_uninterrupted_run(tiny_checkpoint, text_file, tmp_path):
    args = ["--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(text_file), "--max_steps", "6",
            "--logging_steps", "1", "--learning_rate", "1e-2", "--save_steps", "3", *COMMON]
    train_main([*args, "--output_dir", str(tmp_path / "whole")])
    train_main([*args, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-3")])
    whole = load_file(tmp_path / "whole" / "adapter" / "indexer.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "indexer.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)
    # The resumed run's history starts with the checkpoint's first three steps, then continues the curve.
    whole_losses = [entry["loss"] for entry in _history(tmp_path / "whole")]
    resumed_losses = [entry["loss"] for entry in _history(tmp_path / "resumed")]
    assert len(resumed_losses) == len(whole_losses) == 6
    assert resumed_losses[3:] == pytest.approx(whole_losses[3:], rel=1e-5)


def test_bad_data_fails_before_training(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        train_main(["--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(empty),
                    "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *COMMON])
    assert not (tmp_path / "out" / "adapter").exists()


def test_existing_adapter_not_overwritten(tiny_checkpoint, text_file, tmp_path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileExistsError, match="already contains a trained adapter"):
        train_main(["--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(text_file),
                    "--output_dir", str(tmp_path), "--max_steps", "1", *COMMON])


def test_invalid_stage_rejected(tiny_checkpoint, text_file, tmp_path):
    with pytest.raises(ValueError, match="--stage 'pretrain' is invalid"):
        train_main(["--stage", "pretrain", "--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path",
                    str(text_file), "--output_dir", str(tmp_path), *COMMON])


def test_negative_recall_sample_rejected(tiny_checkpoint, text_file, tmp_path):
    with pytest.raises(ValueError, match="--recall_sample_rows -1 is invalid"):
        train_main(["--recall_sample_rows", "-1", "--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path",
                    str(text_file), "--output_dir", str(tmp_path), *COMMON])


def test_sampled_recall_is_logged(tiny_checkpoint, text_file, tmp_path):
    """With fewer sampled rows than tokens, logging steps still log a recall between 0 and 1."""
    output = tmp_path / "sampled"
    train_main(["--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(text_file),
                "--output_dir", str(output), "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
                "--recall_sample_rows", "32", *COMMON])
    recalls = [entry["recall"] for entry in _history(output)]
    assert len(recalls) == 2 and all(0.0 < recall <= 1.0 for recall in recalls)


def test_report_to_tensorboard(tiny_checkpoint, text_file, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    output = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(output / "logs"))
    train_main(["--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(text_file),
                "--output_dir", str(output), "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
                *[a for a in COMMON if a not in ("--report_to", "none")],
                "--report_to", "tensorboard"])
    events = list((output / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file was written"


def test_help_explains_units():
    completed = subprocess.run([sys.executable, "-m", "dsa.train", "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0
    assert "Tokens per training sequence" in completed.stdout
    assert "--stage" in completed.stdout
    assert "--indexer_learning_rate" in completed.stdout


def test_ddp_two_processes_on_cpu(tiny_checkpoint, text_file, tmp_path):
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", _free_port(),
               "-m", "dsa.train", "--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(text_file),
               "--output_dir", str(output), "--max_steps", "12", "--logging_steps", "1", "--learning_rate", "1e-2",
               "--save_strategy", "no", "--use_cpu", "--ddp_backend", "gloo", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Trained as DistributedDataParallel on 2 process(es)" in completed.stderr
    assert "All 2 processes hold the same indexer weights" in completed.stderr
    kl_start, kl_end = _first_last([entry["indexer_kl"] for entry in _history(output)])
    assert kl_end < kl_start
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert dsa.is_converted(dsa.load_indexer(model, output / "adapter"))


def test_fsdp_on_cpu_rejected_not_silently_ddp(tiny_checkpoint, text_file, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", _free_port(),
               "-m", "dsa.train", "--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(text_file),
               "--output_dir", str(tmp_path / "fsdp"), "--max_steps", "2", "--use_cpu", "--ddp_backend", "gloo",
               "--fsdp", "full_shard auto_wrap", "--fsdp_config", '{"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}',
               *COMMON]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode != 0
    assert "FSDP through Trainer needs GPUs" in completed.stderr


def test_dense_layers_option_reaches_adapter(tiny_checkpoint, text_file, tmp_path):
    output = tmp_path / "warmup"
    previous = os.umask(0o022)
    try:
        train_main(["--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(text_file),
                    "--output_dir", str(output), "--max_steps", "2", "--save_steps", "2", "--dense_layers", "0", *COMMON])
    finally:
        os.umask(previous)
    config = json.loads((output / "adapter" / "dsa_adapter.json").read_text())
    assert config["dsa_config"]["dense_layers"] == [0]
    # The adapter folder is staged with mkdtemp (mode 0700); it must end up readable like any folder.
    assert (output / "adapter").stat().st_mode & 0o777 == 0o755


def test_console_prints_input_errors_without_traceback(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    command = [sys.executable, "-m", "dsa.cli", "train", "--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path",
               str(empty), "--output_dir", str(tmp_path / "out"), "--use_cpu", "--max_steps", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert f"dsa train: error: data file {empty} is empty" in completed.stderr
    assert "Traceback" not in completed.stderr
    with_traceback = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "DSA_TRACEBACK": "1"})
    assert with_traceback.returncode == 1
    assert "Traceback" in with_traceback.stderr
