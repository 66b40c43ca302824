#!/usr/bin/env bash
# Indexer warm-up on several GPUs with DeepSpeed ZeRO-3 (CPU offload, bf16).
# Override any setting through the environment, for example:
#   MODEL=/models/Qwen3-4B DATA=/data/long-texts GPUS=8 SEQ_LEN=32768 bash scripts/warmup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:?set MODEL to a local model folder}
DATA=${DATA:?set DATA to a data file or folder}
OUTPUT=${OUTPUT:-runs/warmup}
GPUS=${GPUS:-8}
SEQ_LEN=${SEQ_LEN:-32768}
STEPS=${STEPS:-1000}
TOP_K=${TOP_K:-2048}

torchrun --nproc_per_node "$GPUS" -m dsa.train \
    --stage warmup \
    --model_name_or_path "$MODEL" \
    --dataset_name_or_path "$DATA" \
    --output_dir "$OUTPUT" \
    --model_max_length "$SEQ_LEN" \
    --top_k "$TOP_K" \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 2 \
    --max_steps "$STEPS" \
    --learning_rate 1e-3 \
    --lr_scheduler_type cosine \
    --warmup_steps 50 \
    --bf16 \
    --gradient_checkpointing \
    --deepspeed configs/zero3_offload_bf16.json \
    --logging_steps 10 \
    --save_steps 200 \
    --report_to tensorboard \
    "$@"
