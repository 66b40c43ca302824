"""`DSATrainer`: transformers' `Trainer` with separate indexer learning rates and DSA metrics in the logs."""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from dsa._files import set_default_mode
from dsa.integrations.hf.convert import get_runtime
from dsa.integrations.hf.serialization import indexer_state_dict, save_indexer

logger = logging.getLogger(__name__)

ADAPTER_FOLDER = "adapter"


def peak_memory_mib() -> float:
    """Peak accelerator memory allocated by PyTorch, or the process's peak resident set on the CPU (MiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _split_parameters(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    base, indexer = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (indexer if ".indexer." in f".{name}" else base).append((name, parameter))
    return base, indexer


def _without_lm_head(model: torch.nn.Module, inputs: dict) -> dict:
    """Return the inputs of a frozen warm-up step, without labels and with logits for the last position only.

    Warm-up runs the frozen model with dense attention, so its language-modelling loss does not depend on
    any trained weight. Computing it would cost the LM head over every position and a [B, T, vocab]
    tensor (805 MB for SmolLM2 at 4096 tokens in fp32) in every step.
    """
    inputs = {name: value for name, value in inputs.items() if name != "labels"}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1
    return inputs


class DSATrainer(Trainer):
    """Trainer that optimises LM loss + indexer KL and logs lm_loss, indexer_kl, recall, tokens/s and peak memory.

    The indexer KL is a mean per micro-batch, so the LM loss is computed the same way (the model does
    not get `num_items_in_batch`) and the Trainer divides both by the gradient-accumulation steps.
    In the warm-up stage, with the base model frozen, no LM loss is computed (see `_without_lm_head`).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._metric_sums: dict[str, float] = defaultdict(float)
        self._metric_counts: dict[str, int] = defaultdict(int)
        self._tokens_since_log = 0
        self._last_log_time = time.perf_counter()

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(opt_model))
        base, indexer = _split_parameters(opt_model)
        if not base and not indexer:
            raise ValueError("no parameter requires grad: nothing to train.")
        groups = []
        for named, learning_rate in ((base, self.args.learning_rate), (indexer, self.args.indexer_learning_rate)):
            decay = [p for n, p in named if n in decay_names]
            no_decay = [p for n, p in named if n not in decay_names]
            for params, weight_decay in ((decay, self.args.weight_decay), (no_decay, 0.0)):
                if params:
                    groups.append({"params": params, "weight_decay": weight_decay, "lr": learning_rate})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("params", None)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        logger.info(
            "Optimizer: %d base tensors at lr %g, %d indexer tensors at lr %g",
            len(base), self.args.learning_rate, len(indexer), self.args.indexer_learning_rate,
        )
        return self.optimizer

    def _logging_next_step(self) -> bool:
        every = max(1, int(self.args.logging_steps))
        return self.state.global_step == 0 or (self.state.global_step + 1) % every == 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        runtime = get_runtime(self.accelerator.unwrap_model(model))
        runtime.measure_recall = model.training and self._logging_next_step()
        runtime.recall_rows = self.args.recall_sample_rows
        if runtime.mode == "warmup" and not _split_parameters(model)[0]:
            inputs = _without_lm_head(self.accelerator.unwrap_model(model), inputs)
        try:
            outputs = model(**inputs)
        finally:
            runtime.measure_recall = False
        if "indexer_loss" not in outputs:
            raise RuntimeError("the model returned no indexer_loss; is it converted and in 'warmup' or 'sparse' mode?")
        if model.training:
            self._accumulate(outputs, runtime, inputs)
        loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, outputs, runtime, inputs) -> None:
        values = {"indexer_kl": outputs["indexer_loss"]}
        if outputs.get("lm_loss") is not None:
            values["lm_loss"] = outputs["lm_loss"]
        recalls = [state.recall for state in runtime.layers if state.recall is not None]
        if recalls:
            values["recall"] = torch.stack(recalls).mean()
            for state in runtime.layers:
                state.recall = None
        for name, value in values.items():
            self._metric_sums[name] += float(value.detach())
            self._metric_counts[name] += 1
        mask = inputs.get("attention_mask")
        self._tokens_since_log += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for name, total in self._metric_sums.items():
                logs[name] = round(total / self._metric_counts[name], 6)
            now = time.perf_counter()
            # Tokens of this process only; multiply by the world size for the global rate.
            logs["tokens_per_second"] = round(self._tokens_since_log / max(now - self._last_log_time, 1e-9), 1)
            logs["peak_memory_mib"] = round(peak_memory_mib(), 1)
            self._metric_sums.clear()
            self._metric_counts.clear()
            self._tokens_since_log = 0
            self._last_log_time = now
        super().log(logs, start_time)


class StepLogCallback(TrainerCallback):
    """One `logging` line per logging step, on the main process, with fixed fields."""

    FIELDS = ("loss", "lm_loss", "indexer_kl", "recall", "learning_rate", "tokens_per_second", "peak_memory_mib")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        parts = [f"step={state.global_step}"]
        parts += [f"{name}={logs[name]:.6g}" for name in self.FIELDS if isinstance(logs.get(name), (int, float))]
        logger.info(" ".join(parts))


class AdapterCheckpointCallback(TrainerCallback):
    """Write the indexer adapter into every checkpoint folder (checkpoint-N/adapter)."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        # Every rank takes part in gathering sharded (ZeRO-3) weights; only the main process writes.
        tensors = indexer_state_dict(model)
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTER_FOLDER
            save_indexer(model, folder, overwrite=True, tensors=tensors)


def save_final_adapter(model: torch.nn.Module, output_dir: str | os.PathLike[str], is_main_process: bool) -> Path:
    """Write the adapter to output_dir/adapter atomically: into a temporary folder, then renamed."""
    tensors = indexer_state_dict(model)
    final = Path(output_dir) / ADAPTER_FOLDER
    if not is_main_process:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{ADAPTER_FOLDER}."))
    try:
        save_indexer(model, staging, overwrite=True, tensors=tensors)
        set_default_mode(staging)
        if final.exists():
            previous = final.with_name(f".{ADAPTER_FOLDER}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
            os.replace(staging, final)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Saved the trained indexer adapter to %s", final)
    return final
