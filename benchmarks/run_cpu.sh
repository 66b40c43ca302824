#!/usr/bin/env bash
# Run every CPU benchmark tier in one go and write raw JSON and PNG plots to $OUT (default bench-results/).
# Run it on an idle machine: bench_ops.py flags cases during which other processes used the CPU, the
# other scripts do not check.
# About 36 to 55 minutes on 2 cores (Intel Xeon and AMD EPYC VMs), the 64k prefills and the 30-layer model
# included. docs/benchmarks.md records each run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
PYTHON=${PYTHON:-python}

# Operators, one attention layer: prefill (one timed call after a warm-up) and decode (median of 20).
"$PYTHON" benchmarks/bench_ops.py --shape smollm2-135m --tiers prefill --prefill-tokens 4096 8192 16384 32768 \
    --repeats 1 --plot --output "$OUT/ops-smollm2-135m-prefill.json"
"$PYTHON" benchmarks/bench_ops.py --shape smollm2-135m --tiers prefill --prefill-tokens 65536 \
    --repeats 1 --output "$OUT/ops-smollm2-135m-prefill-64k.json"
"$PYTHON" benchmarks/bench_ops.py --shape smollm2-135m --tiers decode --repeats 20 --plot --output "$OUT/ops-smollm2-135m-decode.json"
# The same layer on real text: the inputs of layer 1 of SmolLM2-135M-Instruct with the shipped adapter,
# on the held-out text, with the fp32 and the bf16 score product.
for SCORES in float32 bfloat16; do
    "$PYTHON" benchmarks/bench_ops.py --inputs real --score-dtype "$SCORES" --tiers prefill \
        --prefill-tokens 4096 8192 16384 32768 65536 --repeats 1 --plot --output "$OUT/ops-real-prefill-$SCORES.json"
    "$PYTHON" benchmarks/bench_ops.py --inputs real --score-dtype "$SCORES" --tiers decode \
        --decode-tokens 8192 16384 32768 65536 --repeats 20 --plot --output "$OUT/ops-real-decode-$SCORES.json"
done
"$PYTHON" benchmarks/bench_ops.py --shape qwen3-4b --tiers prefill --prefill-tokens 4096 8192 \
    --repeats 1 --plot --output "$OUT/ops-qwen3-4b-prefill.json"
"$PYTHON" benchmarks/bench_ops.py --shape qwen3-4b --tiers decode --repeats 20 --plot --output "$OUT/ops-qwen3-4b-decode.json"

# A converted model: ms per generated token after 8k to 32k tokens of context, and prefill. Then the
# same decode at SmolLM2-135M's full depth of 30 layers (no prefill timing).
"$PYTHON" benchmarks/bench_model.py --shape smollm2-135m --layers 4 --prefill_tokens 4096 8192 16384 \
    --output "$OUT/model-smollm2-135m.json"
# The shipped adapter's indexer (4 heads of 32 dims) instead of the default sizing rule's 4 x 64.
"$PYTHON" benchmarks/bench_model.py --shape smollm2-135m --layers 4 --dsa_preset smollm2-135m --contexts 32768 \
    --prefill_tokens --output "$OUT/model-smollm2-135m-preset.json"
"$PYTHON" benchmarks/bench_model.py --shape smollm2-135m --layers 30 --prefill_tokens \
    --output "$OUT/model-smollm2-135m-30-layers.json"

# Training: peak memory of the warm-up loss against one dense forward, 2k to 16k tokens.
"$PYTHON" benchmarks/bench_training.py --shape smollm2-135m --output "$OUT/training-smollm2-135m.json"
