#!/usr/bin/env bash
# Drift check: a throwaway virtualenv with the newest release of every dependency that pyproject.toml's ranges
# admit (what `pip install outlierlab` gives a library user today, torch aside), then the whole test suite.
# Run it before refreshing the lock (bash scripts/lock.sh --upgrade) and whenever a dependency has a new release;
# it prints every package whose version differs from requirements/lock.txt.
#
#   bash scripts/check_latest.sh [pytest args]      # e.g. -k cached_generation
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -r requirements/torch.txt
"${pip[@]}" --upgrade-strategy eager -e ".[test,bench]" -r requirements/models.in
"${pip[@]}" --no-deps -r requirements/no-deps.txt
echo "== versions that differ from requirements/lock.txt"
"$venv/bin/python" -m outlierlab.environment --diff || true
echo "== tests"
# CI=true: nothing may skip. The one test left out asserts that the environment equals the lock, which here it
# deliberately does not.
CI="${CI:-true}" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  --deselect tests/test_install.py::test_this_environment_is_the_lock "$@"
