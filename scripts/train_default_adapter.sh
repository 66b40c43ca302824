#!/usr/bin/env bash
# Reproduce adapters/smollm2-135m: indexer warm-up of the embedded SmolLM2-135M-Instruct on War and Peace,
# 200 steps of one 2048-token sequence, one CPU process, then a bf16 copy of the adapter with the five
# dense layers chosen by `dsa layers`.
# About 45 minutes on an idle 2-core CPU (13 s per step). Extra arguments go to `dsa train`.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/war_and_peace.txt}
OUTPUT=${OUTPUT:-runs/smollm2-warmup-main}
ADAPTER=${ADAPTER:-runs/smollm2-135m-bf16}

python -m dsa.train \
    --stage warmup \
    --model_name_or_path default \
    --dsa_preset smollm2-135m \
    --indexer_heads 4 --indexer_head_dim 32 --rope_dim 16 \
    --dataset_name_or_path "$DATA" \
    --output_dir "$OUTPUT" \
    --model_max_length 2048 \
    --per_device_train_batch_size 1 \
    --max_steps 200 \
    --learning_rate 1e-3 \
    --warmup_steps 10 \
    --logging_steps 5 \
    --save_steps 50 \
    --save_total_limit 1 \
    --use_cpu \
    --report_to none \
    --seed 0 \
    "$@"

# The shipped copy stores the weights in bf16 (half the size); the run-time config is unchanged.
python - "$OUTPUT/adapter" "$ADAPTER" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM

import dsa

model = AutoModelForCausalLM.from_pretrained(dsa.default_model_path(), dtype=torch.float32)
dsa.load_indexer(model, sys.argv[1])
# The layers whose sparse attention costs the most perplexity on the training text (`dsa layers`,
# docs/results.md) keep dense attention.
dsa.update_config(model, dense_layers=[0, 7, 17, 18, 20])
print(dsa.save_indexer(model, sys.argv[2], dtype=torch.bfloat16))
PY
cp "$OUTPUT/trainer_state.json" "$ADAPTER/"
