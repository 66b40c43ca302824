"""One rank of the sharded-training checks on the CPU; tests/training/test_sharded_cpu.py launches two.

accelerate enables FSDP and DeepSpeed only for accelerator process groups, so `Trainer` cannot shard
a model across CPU processes. This worker runs the steps the Trainer path relies on with the engines
themselves, over gloo:

- fsdp1: `FullyShardedDataParallel` with the decoder layers and the indexers as wrapping units;
- fsdp2: `fully_shard` on each indexer, then each decoder layer, then the model (bottom-up, as
  accelerate applies it);
- deepspeed CONFIG: the base model built under `zero.Init` (as `from_pretrained` does when a ZeRO-3
  config is active), the indexers attached afterwards, then `deepspeed.initialize`.

- reference: one process without any engine, each step on the rows both ranks would read. The
  sharded runs must end with the same indexer weights, because their gradients are averaged over ranks.

Each trains the indexers with the warm-up KL, gathers them with `indexer_state_dict` on every rank and
saves the adapter from rank 0. The indexers must be wrapping units of their own: their loss reaches their
weights without passing through the decoder layer's output, where FSDP would gather the weights back.

Usage: torchrun --nproc_per_node 2 tests/training/distributed_worker.py ENGINE CHECKPOINT TEXT_FILE OUTPUT_DIR [CONFIG]
       python tests/training/distributed_worker.py reference CHECKPOINT TEXT_FILE OUTPUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsa
from dsa.config import DSAConfig
from dsa.integrations.hf.serialization import indexer_state_dict
from dsa.modules import LightningIndexer
from dsa.training.data import build_dataset

WORLD = 2
STEPS = 12
MICRO_BATCH = 2
LEARNING_RATE = 1e-2
SMALL_INDEXER = DSAConfig(indexer_heads=2, indexer_head_dim=16, rope_dim=8, top_k=16)


def deepspeed_config(path: str, world: int) -> dict:
    """Return the shipped config with its "auto" entries filled as the Trainer fills them, in fp32."""
    config = json.loads(Path(path).read_text(encoding="utf-8"))
    values = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "train_batch_size": MICRO_BATCH * world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # none, to match the reference run
        "reduce_bucket_size": 64 * 64,
        "stage3_prefetch_bucket_size": 64 * 64,
        "stage3_param_persistence_threshold": 0,
    }
    config = {key: values.get(key, value) if value == "auto" else value for key, value in config.items()}
    zero = {key: values.get(key, value) if value == "auto" else value for key, value in config["zero_optimization"].items()}
    # The CPU has no fast bf16, and pinned memory needs an accelerator. So: same ZeRO stage and offload, in fp32.
    for offload in ("offload_optimizer", "offload_param"):
        if offload in zero:
            zero[offload] = {**zero[offload], "pin_memory": False}
    config["zero_optimization"] = zero
    config["bf16"] = {"enabled": False}
    config["optimizer"] = {"type": "AdamW", "params": {"lr": LEARNING_RATE, "torch_adam": True}}
    config["zero_force_ds_cpu_optimizer"] = False
    return config


def load_converted(checkpoint: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    torch.manual_seed(0)  # the same initial indexer in every run
    dsa.convert(model, SMALL_INDEXER, mode="warmup")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".indexer." in f".{name}")
    return model


def main(engine_name: str, checkpoint: str, text_file: str, output_dir: str, config_path: str | None = None) -> None:
    hf_deepspeed = None
    if engine_name == "deepspeed":
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="gloo")
        config = deepspeed_config(config_path, torch.distributed.get_world_size())
        # While this object lives, from_pretrained builds the model under zero.Init when the stage is 3.
        hf_deepspeed = HfDeepSpeedConfig(config)
    elif engine_name != "reference":
        torch.distributed.init_process_group("gloo")
    distributed = torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    # The reference reads, in one process, the rows of every rank of a two-process run.
    ranks_read = [rank] if distributed else list(range(WORLD))

    model = load_converted(checkpoint)
    indexers = [layer.self_attn.indexer for layer in model.model.layers]
    base_sharded = all(hasattr(p, "ds_id") for p in model.parameters() if not p.requires_grad)
    initial = indexer_state_dict(model)
    initial_checksum = float(sum(t.double().sum() for t in initial.values()))

    if engine_name == "deepspeed":
        trainable = [p for p in model.parameters() if p.requires_grad]
        wrapped, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
        indexer_sharded = all(hasattr(p, "ds_id") for indexer in indexers for p in indexer.parameters())
    else:
        if engine_name == "reference":
            wrapped, indexer_sharded = model, False
        elif engine_name == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            layer_class = type(model.model.layers[0])
            wrapped = FullyShardedDataParallel(
                model, auto_wrap_policy=ModuleWrapPolicy({layer_class, LightningIndexer}),
                use_orig_params=True, device_id=torch.device("cpu"),
            )
            indexer_sharded = all(type(layer.self_attn.indexer).__name__ == "FullyShardedDataParallel" for layer in model.model.layers)
        elif engine_name == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import DTensor

            for layer in model.model.layers:
                fully_shard(layer.self_attn.indexer)
                fully_shard(layer)
            wrapped = fully_shard(model)
            indexer_sharded = all(isinstance(p, DTensor) for indexer in indexers for p in indexer.parameters())
        else:
            raise ValueError(f"unknown engine {engine_name!r}; expected fsdp1, fsdp2, deepspeed or reference.")
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LEARNING_RATE)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    dataset = build_dataset(text_file, tokenizer, 128)
    kls = []
    wrapped.train()
    for step in range(STEPS):
        rows = [dataset[(step * WORLD + r) * MICRO_BATCH + i]["input_ids"] for r in ranks_read for i in range(MICRO_BATCH)]
        input_ids = torch.tensor(rows)
        outputs = wrapped(input_ids=input_ids, labels=input_ids)
        loss = outputs["indexer_loss"]
        if engine_name == "deepspeed":
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        kls.append(float(loss.detach()))

    state = indexer_state_dict(model)  # collective: every rank gathers the full weights
    checksum = torch.tensor([float(sum(t.double().sum() for t in state.values()))], dtype=torch.float64)
    checksums = [torch.zeros_like(checksum) for _ in range(world)]
    if distributed:
        torch.distributed.all_gather(checksums, checksum)
    else:
        checksums = [checksum]
    if rank == 0:
        dsa.get_runtime(model).indexer_trained = True
        dsa.save_indexer(model, Path(output_dir) / "adapter", tensors=state)
        summary = {
            "engine": engine_name,
            "world_size": world,
            "base_sharded_at_load": base_sharded,
            "indexer_sharded": indexer_sharded,
            "kl": kls,
            "initial_checksum": initial_checksum,
            "checksums": [float(c) for c in checksums],
            "gathered_shapes": {key: list(t.shape) for key, t in state.items()},
            "initial_shapes": {key: list(t.shape) for key, t in initial.items()},
        }
        (Path(output_dir) / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if distributed:
        torch.distributed.barrier()
    del hf_deepspeed


if __name__ == "__main__":
    main(*sys.argv[1:])
