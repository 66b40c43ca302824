#!/usr/bin/env bash
# Indexer warm-up of the embedded SmolLM2-135M-Instruct on War and Peace, one CPU process.
# About 5 minutes on 2 cores: 60 steps of one 1024-token sequence. Extra arguments go to `dsa train`.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/war_and_peace.txt}
OUTPUT=${OUTPUT:-runs/smollm2-warmup-cpu}

python -m dsa.train \
    --stage warmup \
    --model_name_or_path default \
    --dsa_preset smollm2-135m \
    --dataset_name_or_path "$DATA" \
    --output_dir "$OUTPUT" \
    --model_max_length 1024 \
    --per_device_train_batch_size 1 \
    --max_steps 60 \
    --learning_rate 1e-3 \
    --warmup_steps 5 \
    --logging_steps 10 \
    --save_steps 30 \
    --use_cpu \
    --report_to none \
    "$@"
