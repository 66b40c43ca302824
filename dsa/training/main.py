"""`dsa train` / `python -m dsa.train`: indexer warm-up and sparse fine-tuning on top of transformers' Trainer.

Launch one process, or many with `torchrun` (DDP, FSDP through `--fsdp`, DeepSpeed through
`--deepspeed configs/zero3_offload_bf16.json`); distribution, mixed precision, checkpoints and logging
come from `Trainer`. The model and data options come first below. The stage options (--stage,
--indexer_learning_rate, --indexer_loss_weight, --use_lora and the --lora_* options) come last, after
the Trainer's own options.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

import dsa
from dsa.config import DSAConfig
from dsa.modules import LightningIndexer
from dsa.training.arguments import DataArguments, DSATrainingArguments, ModelArguments
from dsa.training.data import PaddingCollator, build_dataset
from dsa.training.trainer import ADAPTER_FOLDER, AdapterCheckpointCallback, DSATrainer, StepLogCallback, save_final_adapter

logger = logging.getLogger("dsa.train")

SHAPE_OPTIONS = ("indexer_heads", "indexer_head_dim", "rope_dim", "q_lora_rank")
RUN_OPTIONS = ("top_k", "dense_layers")
INDEXER_CLASS = LightningIndexer.__name__


def parse_arguments(argv: list[str] | None) -> tuple[ModelArguments, DataArguments, DSATrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, DSATrainingArguments), prog="dsa train", description=__doc__)
    return parser.parse_args_into_dataclasses(args=argv)


def _resolve_model_path(name_or_path: str) -> str:
    return str(dsa.default_model_path()) if name_or_path == "default" else name_or_path


def _dsa_config(model_args: ModelArguments, model: torch.nn.Module) -> DSAConfig:
    """Start from the preset or the model-sized default, then apply the command-line overrides."""
    base = DSAConfig.preset(model_args.dsa_preset) if model_args.dsa_preset else dsa.default_config(model)
    overrides = {name: getattr(model_args, name) for name in (*SHAPE_OPTIONS, *RUN_OPTIONS) if getattr(model_args, name) is not None}
    return dataclasses.replace(base, **overrides)


def attach_indexer(model: torch.nn.Module, model_args: ModelArguments) -> None:
    """Convert the model, from an adapter when `--indexer_path` is given."""
    if model_args.indexer_path:
        dsa.load_indexer(model, model_args.indexer_path)
        shape_overrides = [name for name in SHAPE_OPTIONS if getattr(model_args, name) is not None]
        if shape_overrides:
            raise ValueError(f"--indexer_path fixes the indexer shape; drop the options {shape_overrides}.")
        run_overrides = {name: getattr(model_args, name) for name in RUN_OPTIONS if getattr(model_args, name) is not None}
        if run_overrides:
            dsa.update_config(model, **run_overrides)
        return
    dsa.convert(model, _dsa_config(model_args, model), allow_untested=model_args.allow_untested)


def prepare_stage(model: torch.nn.Module, args: DSATrainingArguments) -> torch.nn.Module:
    """Set the DSA mode and which parameters train; wrap with LoRA when asked. Returns the model to train."""
    runtime = dsa.get_runtime(model)
    runtime.indexer_loss_weight = args.indexer_loss_weight
    if args.stage == "warmup":
        dsa.set_mode(model, "warmup")
        return model
    dsa.set_mode(model, "sparse")
    if not args.use_lora:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
    peft_model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets, task_type="CAUSAL_LM"))
    # PEFT freezes everything but the LoRA weights; the indexer keeps training on its own KL.
    for parameter in dsa.indexer_parameters(model):
        parameter.requires_grad_(True)
    return peft_model


def _check_output_dir(args: DSATrainingArguments) -> None:
    adapter = Path(args.output_dir) / ADAPTER_FOLDER
    if adapter.exists() and not args.resume_from_checkpoint:
        raise FileExistsError(
            f"{adapter} already contains a trained adapter; choose another --output_dir, remove it, or pass "
            "--resume_from_checkpoint to continue that run."
        )


def _check_ranks_agree(model: torch.nn.Module) -> None:
    """Raise if the processes of a distributed run ended with different indexer weights."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from dsa.integrations.hf.serialization import indexer_state_dict

    state = indexer_state_dict(model)
    checksum = torch.tensor([float(sum(t.double().sum() for t in state.values()))], dtype=torch.float64)
    gathered = [torch.zeros_like(checksum) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, checksum)
    values = [float(t) for t in gathered]
    if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
        raise RuntimeError(f"the processes ended with different indexer weights (checksums {values}).")
    logger.info("All %d processes hold the same indexer weights (checksum %.6f)", len(values), values[0])


def _check_deepspeed_device(args: DSATrainingArguments) -> None:
    """Reject --deepspeed where Trainer cannot run it, before anything is loaded."""
    if args.deepspeed and args.device.type == "cpu":
        # accelerate 1.16 starts DeepSpeed only for accelerator process groups. On the CPU, the Trainer and
        # DeepSpeed disagree on the world size, and from_pretrained fails with an assertion about batch sizes.
        raise ValueError(
            f"--deepspeed needs GPUs: this run's device is {args.device}. Drop --deepspeed to train on the CPU "
            "(one process, or DDP with torchrun and --ddp_backend gloo)."
        )


def _wrap_indexers_as_fsdp_units(args: DSATrainingArguments, model: torch.nn.Module) -> None:
    """Make every indexer an FSDP wrapping unit of its own, beside the decoder layers.

    The indexer KL reaches the indexer weights without passing through the decoder layer's output, so
    FSDP would not gather those weights again for the backward pass if they belonged to the layer's unit
    (the backward fails on freed storage). As a unit of their own, the indexers are gathered through their
    own outputs. Without transformer_layer_cls_to_wrap the layers are the model's `_no_split_modules`, as
    accelerate would choose.
    """
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if not args.fsdp or not plugin_args:
        return
    if plugin_args.get("auto_wrap_policy") != "TRANSFORMER_BASED_WRAP":
        raise ValueError(
            f"--fsdp with auto_wrap_policy {plugin_args.get('auto_wrap_policy')!r} is not supported: DSA needs "
            "TRANSFORMER_BASED_WRAP so that each indexer is an FSDP unit of its own (see configs/fsdp_qwen3.json)."
        )
    names = [name for name in (plugin_args.get("transformer_cls_names_to_wrap") or "").split(",") if name]
    names = names or list(getattr(model, "_no_split_modules", None) or [])
    if INDEXER_CLASS not in names:
        names.append(INDEXER_CLASS)
    plugin_args["transformer_cls_names_to_wrap"] = ",".join(names)
    logger.info("FSDP wrapping units: %s", ", ".join(names))


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, args = parse_arguments(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if args.process_index == 0 else logging.WARNING,
    )
    _check_deepspeed_device(args)
    _check_output_dir(args)
    set_seed(args.seed)

    model_path = _resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Data problems surface here, before the model is loaded and before any step runs.
    dataset = build_dataset(
        data_args.dataset_name_or_path,
        tokenizer,
        data_args.model_max_length,
        split=data_args.dataset_split,
        config_name=data_args.dataset_config_name,
        text_column=data_args.text_column,
        max_sequences=data_args.max_train_sequences,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    attach_indexer(model, model_args)
    train_model = prepare_stage(model, args)
    _wrap_indexers_as_fsdp_units(args, model)
    logger.info(
        "Stage %s: %d trainable parameters, %d of them in the indexers; DSA config %s",
        args.stage,
        sum(p.numel() for p in train_model.parameters() if p.requires_grad),
        sum(p.numel() for p in dsa.indexer_parameters(model)),
        dsa.get_runtime(model).config.to_dict(),
    )

    trainer = DSATrainer(
        model=train_model,
        args=args,
        train_dataset=dataset,
        data_collator=PaddingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[StepLogCallback(), AdapterCheckpointCallback()],
    )
    if args.fsdp and not trainer.is_fsdp_enabled:
        # accelerate 1.16 enables FSDP only for accelerator process groups; on the CPU it would train with
        # plain DDP while the user asked for sharding.
        raise ValueError(
            f"--fsdp {args.fsdp} was requested but accelerate did not enable FSDP on device {args.device}; FSDP "
            "through Trainer needs GPUs. On the CPU, drop --fsdp to train with DDP."
        )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    logger.info("Trained as %s on %d process(es)", type(trainer.model_wrapped).__name__, args.world_size)
    _check_ranks_agree(model)
    dsa.get_runtime(model).indexer_trained = True
    trainer.save_state()
    save_final_adapter(model, args.output_dir, trainer.is_world_process_zero())
    if args.stage == "sparse":
        trainer.save_model(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
