#!/usr/bin/env bash
# Regenerates requirements/lock.txt: the exact version of every package (direct and transitive) that
# scripts/setup.sh installs, except torch (requirements/torch.txt), resolved for Python 3.11 on Linux x86_64.
#
#   bash scripts/lock.sh                 # resolve again within pyproject's ranges, keeping locked versions that still fit
#   bash scripts/lock.sh --upgrade       # move every package to its newest release (run check_latest.sh first)
#
# uv (`uv pip compile`): a standard resolver whose output is a plain requirements file that pip installs, so users
# need nothing but pip; it resolves in seconds where pip-compile takes minutes. Torch's own dependencies are locked
# against the CPU wheel (the local wheel directory, where there is one), so no CUDA runtime enters the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "uv>=0.5"
find_links=()
[[ -d "${TORCH_WHEELS:-/opt/wheels}" ]] && find_links=(--find-links "${TORCH_WHEELS:-/opt/wheels}")
python -m uv pip compile pyproject.toml requirements/models.in --all-extras \
  --constraint requirements/torch.txt --no-emit-package torch \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 "${find_links[@]}" \
  --index-strategy unsafe-best-match --custom-compile-command "bash scripts/lock.sh" \
  --output-file requirements/lock.txt "$@"
