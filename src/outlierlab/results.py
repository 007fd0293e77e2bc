"""Result records: one JSON per run at results/<exp>/<model>/<run_tag>.json, written atomically.

Non-finite numbers (a pruned model's PPL can be inf or NaN) are stored as the strings "inf", "-inf", "nan" so the
files stay standard JSON; `read_result` turns them back into floats.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "datasets", "lm_eval", "hydra-core", "omegaconf", "wandb", "gguf",
             "accelerate", "tokenizers", "numpy")


def library_versions() -> dict:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(directory: str | Path = ".") -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {"commit": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": commit.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def to_jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _from_json(value):
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def result_path(results_dir: str | Path, exp: str, model: str, run_tag: str) -> Path:
    return Path(results_dir) / exp / model / f"{run_tag}.json"


def write_result(record: dict, path: Path) -> Path:
    """Write atomically: a reader (or a crash) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(to_jsonable(record), out, indent=1, allow_nan=False)
            out.write("\n")
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def read_result(path: str | Path) -> dict:
    with open(path) as handle:
        return _from_json(json.load(handle))
