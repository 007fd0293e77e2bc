#!/usr/bin/env bash
# Installs outlierlab exactly as tested: every package at its version in requirements/lock.txt, torch at the
# version in requirements/torch.txt (unless a torch is already installed: a cluster keeps its CUDA build), the
# models that ship as packages, and outlierlab itself (editable). Idempotent; used by the README's commands and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(python -m pip install --quiet --disable-pip-version-check)
if python -c "import torch" 2>/dev/null; then
  "${pip[@]}" -r requirements/lock.txt
else
  # One resolution for torch and the lock, so torch's own dependencies come at their locked versions.
  "${pip[@]}" -r requirements/lock.txt -r requirements/torch.txt
fi
"${pip[@]}" --no-deps -r requirements/no-deps.txt
# No build isolation: the build backend (setuptools) is in the lock, so the build needs no download either.
"${pip[@]}" --no-deps --no-build-isolation -e .
