#!/usr/bin/env bash
# Sparse fine-tuning on several GPUs with DeepSpeed ZeRO-3, starting from a warmed-up indexer adapter.
# Override any setting through the environment, for example:
#   MODEL=/models/Qwen3-4B INDEXER=runs/warmup/adapter DATA=/data/chat.jsonl GPUS=8 bash scripts/sft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:?set MODEL to a local model folder}
INDEXER=${INDEXER:?set INDEXER to the adapter folder written by the warm-up}
DATA=${DATA:?set DATA to a data file or folder}
OUTPUT=${OUTPUT:-runs/sparse}
GPUS=${GPUS:-8}
SEQ_LEN=${SEQ_LEN:-32768}
STEPS=${STEPS:-2000}

torchrun --nproc_per_node "$GPUS" -m dsa.train \
    --stage sparse \
    --model_name_or_path "$MODEL" \
    --indexer_path "$INDEXER" \
    --dataset_name_or_path "$DATA" \
    --output_dir "$OUTPUT" \
    --model_max_length "$SEQ_LEN" \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 4 \
    --max_steps "$STEPS" \
    --learning_rate 1e-5 \
    --indexer_learning_rate 1e-4 \
    --lr_scheduler_type cosine \
    --warmup_steps 100 \
    --bf16 \
    --gradient_checkpointing \
    --deepspeed configs/zero3_offload_bf16.json \
    --logging_steps 10 \
    --save_steps 500 \
    --report_to tensorboard \
    "$@"
