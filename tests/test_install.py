"""The lock is what a fresh machine gets: pyproject's ranges admit it, and (under CI=true, where .ci/run installed
a fresh virtualenv from it) the environment equals it."""
from __future__ import annotations

import os
import re
import tomllib

import pytest
from packaging.requirements import Requirement

from outlierlab.environment import REQUIREMENTS, canonical, lock_differences, locked_versions

from conftest import ROOT


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    return [Requirement(spec) for spec in specs]


def test_every_declared_dependency_is_locked_inside_its_range():
    locked = locked_versions()
    torch_pin = re.search(r"^torch==(\S+)", (REQUIREMENTS / "torch.txt").read_text(), re.M).group(1)
    for requirement in _pyproject_requirements():
        version = torch_pin if requirement.name == "torch" else locked.get(canonical(requirement.name))
        assert version is not None, f"{requirement.name} is in pyproject.toml but not in the lock: bash scripts/lock.sh"
        assert requirement.specifier.contains(version, prereleases=True), \
            f"locked {requirement.name}=={version} is outside pyproject's {requirement}: bash scripts/lock.sh"


def test_lock_differences_names_what_is_missing_different_and_unlocked(tmp_path):
    (tmp_path / "lock.txt").write_text("pytest==0.0.1\n    # via outlierlab\nno-such-package-xyz==1.0\n")
    (tmp_path / "no-deps.txt").write_text("# nothing\n")
    found = lock_differences(tmp_path)
    assert found["missing"] == ["no-such-package-xyz==1.0"]
    assert [entry.split(":")[0] for entry in found["different"]] == ["pytest"]
    assert any(entry.startswith("transformers==") for entry in found["unlocked"])


def test_this_environment_is_the_lock():
    differences = {kind: entries for kind, entries in lock_differences().items() if entries}
    if differences and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("this environment was not installed from the lock (bash scripts/setup.sh in a fresh virtualenv)")
    assert not differences, f"the environment differs from requirements/lock.txt: {differences}"
