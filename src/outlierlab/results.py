"""Result records: one JSON per run at results/<exp>/<model>/<run_tag>.json, written atomically.

Non-finite numbers (a pruned model's PPL can be inf or NaN) are stored as the strings "inf", "-inf", "nan" so the
files stay standard JSON; `read_result` turns them back into floats.

A record names the code that made it (`git_state`: commit, dirty flag and, from a dirty tree, the diff of the
tracked code files, size-capped) and holds no host path: `portable_paths` writes the data directory as `data://`,
the cache as `cache://`, an installed package's file as `pkg://<package>/...`, the repository as a relative path and
the home directory as `~`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import site
import subprocess
import sysconfig
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


REPO = Path(__file__).resolve().parents[2]
# What makes a record: a change elsewhere (README, tests, results/ itself, which every run writes) leaves it clean.
CODE = ("src", "conf", "experiments", "run.py", "scripts", "requirements", "pyproject.toml")
DIFF_LIMIT = 200_000  # characters of `git diff HEAD` a dirty record keeps (its sha256 covers the whole diff)


def git_state(directory: str | Path = ".", diff: bool = True) -> dict:
    """{commit, dirty} of the checkout at `directory`; dirty = uncommitted changes to tracked files under CODE. When
    dirty, also the changed files and their diff against HEAD (capped at DIFF_LIMIT characters, `diff_truncated` says
    so; `diff_sha256` is of all of it), so the code that made a record can still be named."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=30)
    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {"commit": None}
        changed = git("status", "--porcelain", "--untracked-files=no", "--", *CODE).stdout.splitlines()
        state = {"commit": commit.stdout.strip(), "dirty": bool(changed)}
        if changed and diff:
            text = git("diff", "HEAD", "--", *CODE).stdout
            state.update(changed=[line[3:] for line in changed], diff=text[:DIFF_LIMIT],
                         diff_truncated=len(text) > DIFF_LIMIT,
                         diff_sha256=hashlib.sha256(text.encode()).hexdigest())
        return state
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def inside(path: str | Path, directory: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(directory).resolve())


def host_roots(data_dir: str | None = None, cache_dir: str | None = None) -> list[tuple[str, str]]:
    """(absolute prefix, portable prefix) pairs, the most specific first: installed packages, data, cache, the
    repository, home."""
    packages = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    roots = [(str(Path(p).resolve()) + "/", "pkg://") for p in packages]
    for directory, token in ((data_dir, "data://"), (cache_dir, "cache://")):
        if directory:  # as configured ("../shared/data/...") and resolved
            resolved = str(Path(directory).expanduser().resolve())
            roots += [(str(directory).rstrip("/") + "/", token), (resolved + "/", token)]
    roots += [(str(REPO) + "/", ""), (str(Path.home().resolve()) + "/", "~/")]
    unresolved = [(prefix.replace(str(Path.home().resolve()), str(Path.home())), token) for prefix, token in roots]
    return sorted(set(roots + unresolved), key=lambda pair: -len(pair[0]))


def portable_paths(value, roots: list[tuple[str, str]]):
    """`value` with every host path inside one of `roots` (host_roots) made portable, in strings and dict keys."""
    if isinstance(value, str):
        for prefix, token in roots:
            if value == prefix.rstrip("/"):  # the directory itself
                return token or "."
            value = value.replace(prefix, token)
        return value
    if isinstance(value, dict):
        return {portable_paths(k, roots): portable_paths(v, roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v, roots) for v in value]
    return value


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
