"""FSDP (1 and 2) and DeepSpeed ZeRO-2/ZeRO-3 with CPU offload, on two CPU processes over gloo.

`Trainer` cannot shard across CPU processes, because accelerate enables FSDP and DeepSpeed only for
accelerator process groups. So distributed_worker.py drives the engines directly, with the shipped
DeepSpeed config files. scripts/gpu_check_deepspeed.sh runs `dsa train` itself on GPUs. Each sharded run must
end with the weights of an unsharded reference run that reads the same rows.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dsa
from dsa.integrations.hf.serialization import indexer_state_dict
from dsa.training.main import main as train_main

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _free_port() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _run(command: list[str], output: Path) -> dict:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((output / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, text_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference")
    summary = _run([sys.executable, str(WORKER), "reference", str(tiny_checkpoint), str(text_file), str(output)], output)
    return summary, load_file(output / "adapter" / "indexer.safetensors")


ENGINES = [
    pytest.param(["fsdp1"], id="fsdp1"),
    pytest.param(["fsdp2"], id="fsdp2"),
    pytest.param(["deepspeed", "configs/zero3_offload_bf16.json"], id="zero3-offload", marks=pytest.mark.deepspeed),
    pytest.param(["deepspeed", "configs/zero2.json"], id="zero2", marks=pytest.mark.deepspeed),
]


@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_warmup_matches_unsharded(engine, reference, tiny_checkpoint, text_file, tmp_path):
    if engine[0] == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    name, *config = engine
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", _free_port(), str(WORKER), name, str(tiny_checkpoint), str(text_file), str(tmp_path),
               *[str(REPO / path) for path in config]]
    summary = _run(command, tmp_path)
    reference_summary, reference_weights = reference

    assert summary["world_size"] == 2
    zero3 = config == ["configs/zero3_offload_bf16.json"]
    assert summary["base_sharded_at_load"] is zero3, "ZeRO-3 builds the base model sharded"
    assert summary["indexer_sharded"] is (name != "deepspeed" or zero3), "the indexers were not sharded"
    kl = summary["kl"]
    assert sum(kl[-3:]) < sum(kl[:3]), kl
    first, second = summary["checksums"]
    assert first == second, "the ranks gathered different indexer weights"
    assert summary["initial_checksum"] == pytest.approx(reference_summary["initial_checksum"], rel=1e-12)
    assert summary["gathered_shapes"] == summary["initial_shapes"]

    # The adapter contains the full trained weights: those of the unsharded run on the same rows.
    weights = load_file(tmp_path / "adapter" / "indexer.safetensors")
    assert weights.keys() == reference_weights.keys()
    for key, tensor in weights.items():
        assert (tensor - reference_weights[key]).abs().max() < 1e-4, key
    model = dsa.load_indexer(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), tmp_path / "adapter")
    loaded = indexer_state_dict(model)
    assert float(sum(t.double().sum() for t in loaded.values())) == pytest.approx(first, rel=1e-9)


def test_deepspeed_on_cpu_rejected(tiny_checkpoint, text_file, tmp_path):
    with pytest.raises(ValueError, match="--deepspeed needs GPUs"):
        train_main(["--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(text_file),
                    "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_cpu",
                    "--deepspeed", str(REPO / "configs" / "zero2.json"), "--report_to", "none"])
    assert not (tmp_path / "out").exists()


def _fsdp_arguments(tmp_path: Path, *extra: str):
    from dsa.training.main import parse_arguments

    _, _, args = parse_arguments(["--model_name_or_path", "unused", "--dataset_name_or_path", "unused",
                                  "--output_dir", str(tmp_path), "--use_cpu", "--fsdp", "full_shard auto_wrap", *extra])
    return args


@pytest.mark.parametrize("fsdp_config", [None, '{"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}'])
def test_fsdp_wraps_each_indexer(fsdp_config, tiny_checkpoint, tmp_path):
    """accelerate's FSDP2 wrapping policy, fed the plugin arguments dsa train passes, picks the indexers."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from dsa.training.main import _wrap_indexers_as_fsdp_units

    args = _fsdp_arguments(tmp_path, *(["--fsdp_config", fsdp_config] if fsdp_config else []))
    model = dsa.convert(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8))
    _wrap_indexers_as_fsdp_units(args, model)
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(**args.fsdp_plugin_args), model)
    units = [type(module).__name__ for module in model.modules() if policy(module)]
    assert units == ["LlamaDecoderLayer", "LightningIndexer"] * 2


def test_fsdp_size_based_wrap_rejected(tiny_checkpoint, tmp_path):
    from dsa.training.main import _wrap_indexers_as_fsdp_units

    args = _fsdp_arguments(tmp_path, "--fsdp_config", '{"auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": 1000}')
    model = dsa.convert(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), dsa.DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8))
    with pytest.raises(ValueError, match="TRANSFORMER_BASED_WRAP"):
        _wrap_indexers_as_fsdp_units(args, model)
