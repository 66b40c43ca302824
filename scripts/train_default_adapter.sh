#!/usr/bin/env bash
# Reproduce adapters/smollm2-135m: indexer warm-up of the embedded SmolLM2-135M-Instruct on War and Peace,
# one CPU process, in five runs:
#   1. 200 steps of one 2048-token sequence from a fresh indexer (peak learning rate 1e-3), then a bf16
#      copy of the adapter with the five dense layers chosen by `dsa layers`;
#   2-3. 40, then 60 more steps of one 4096-token sequence (peak learning rate 3e-4, seeds 1 and 2);
#   4-5. 40, then 20 more steps of one 8192-token sequence (peak learning rate 3e-4, seeds 4 and 5; run 4
#      started from the bf16 copy of run 3's adapter);
# each run starting from the adapter of the one before, then a bf16 copy of the last adapter, with the
# Trainer logs of all five runs.
# On an idle 2-core CPU: about 45 minutes for run 1 (13 s per step), 42 for runs 2-3 (25 s per step) and
# 70 for runs 4-5 (65 s per step).
# Extra arguments go to every `dsa train` run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/war_and_peace.txt}
RUNS=${RUNS:-runs/smollm2-default}
ADAPTER=${ADAPTER:-runs/smollm2-135m-bf16}

common=(--stage warmup --model_name_or_path default --dataset_name_or_path "$DATA"
        --per_device_train_batch_size 1 --logging_steps 5 --save_total_limit 1 --use_cpu --report_to none)

python -m dsa.train "${common[@]}" \
    --dsa_preset smollm2-135m --indexer_heads 4 --indexer_head_dim 32 --rope_dim 16 \
    --output_dir "$RUNS/2048" --model_max_length 2048 \
    --max_steps 200 --learning_rate 1e-3 --warmup_steps 10 --save_steps 50 --seed 0 "$@"

# Writes a bf16 copy of adapter $1 to $2 with the dense layers below. The run-time config is otherwise unchanged.
bf16_copy() {
    python - "$1" "$2" <<'PY'
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
}

bf16_copy "$RUNS/2048/adapter" "$RUNS/2048-bf16"
previous="$RUNS/2048-bf16"
for stage in "1 40" "2 60"; do
    read -r seed steps <<<"$stage"
    python -m dsa.train "${common[@]}" --indexer_path "$previous" \
        --output_dir "$RUNS/4096-$seed" --model_max_length 4096 \
        --max_steps "$steps" --learning_rate 3e-4 --warmup_steps 4 --save_steps "$steps" --seed "$seed" "$@"
    previous="$RUNS/4096-$seed/adapter"
done

# Run 4 started from the bf16 adapter that runs 1-3 shipped.
bf16_copy "$previous" "$RUNS/4096-bf16"
previous="$RUNS/4096-bf16"
for stage in "4 40 4" "5 20 2"; do
    read -r seed steps warmup <<<"$stage"
    python -m dsa.train "${common[@]}" --indexer_path "$previous" \
        --output_dir "$RUNS/8192-$seed" --model_max_length 8192 --logging_steps 10 \
        --max_steps "$steps" --learning_rate 3e-4 --warmup_steps "$warmup" --save_steps "$steps" --seed "$seed" "$@"
    previous="$RUNS/8192-$seed/adapter"
done

bf16_copy "$previous" "$ADAPTER"
cp "$RUNS/2048/trainer_state.json" "$ADAPTER/trainer_state-2048.json"
for seed in 1 2; do
    cp "$RUNS/4096-$seed/trainer_state.json" "$ADAPTER/trainer_state-4096-$seed.json"
done
for seed in 4 5; do
    cp "$RUNS/8192-$seed/trainer_state.json" "$ADAPTER/trainer_state-8192-$seed.json"
done
