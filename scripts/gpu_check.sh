#!/usr/bin/env bash
# The one command on a lent GPU (see src/outlierlab/gpu_check.py and README "On a GPU"):
#   python -m outlierlab.gpu_check --prepare      # first, HERE: token shard + wheels into .gpu_check/ (git-ignored)
#   bash scripts/gpu_check.sh [--archive $OUT/gpu_check.tar.gz]   # THERE, with .gpu_check carried
# The device image has torch and transformers but not hydra-core, omegaconf or nnsight: when they are missing, the
# wheels carried in .gpu_check/wheels are installed (no index, no network) into .gpu_check/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import hydra, omegaconf, nnsight" 2>/dev/null; then
  if ! ls .gpu_check/wheels/*.whl >/dev/null 2>&1; then
    echo "error: hydra-core/omegaconf/nnsight missing and no wheels in .gpu_check/wheels:" \
         "run python -m outlierlab.gpu_check --prepare where PyPI is reachable, and carry .gpu_check" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .gpu_check/site \
    .gpu_check/wheels/*.whl
  export PYTHONPATH="$PWD/.gpu_check/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m outlierlab.gpu_check "$@"
