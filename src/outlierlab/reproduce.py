"""A record reproduces itself: run its recorded command again into a scratch results folder and say, value by value,
whether the new numbers agree with the record within its recorded uncertainty.

    python -m outlierlab.reproduce results/prune_sw/smollm2_135m/quick.json
    python -m outlierlab.reproduce --all                      # every record under results/
    python -m outlierlab.reproduce 'results/sw_index/*/*.json' --keep /tmp/rerun
    python -m outlierlab.reproduce results/x.json --against /tmp/rerun/x.json   # compare two records, no rerun
    python -m outlierlab.reproduce results/x.json --here      # rerun with this checkout's code, not the record's
    python -m outlierlab.reproduce --all --status          # which records are dirty / stale, and their cost

The command is the record's own: `python run.py <record["overrides"]>`, with the results written to a scratch folder
(paths.results_dir), no logger, and this machine's data, cache and checkpoints (paths.*). The code is the record's
own too: when the record's commit is not this checkout's and the code differs (results.CODE: src/, conf/,
experiments/, run.py, scripts/, requirements/, pyproject.toml), the rerun runs in a temporary git worktree at the
record's commit, so a record stays reproducible after the code moves on; `--here` reruns it with this checkout's code
instead (does today's code still give the recorded numbers?). Refused, with the reason: a record from a dirty tree
(its code cannot be named; --allow-dirty tries anyway), a commit this repository does not have, a dirty checkout when
the rerun would use this checkout's code, or a model checkpoint that is not here.

Agreement, per number (every numeric leaf the record holds, timings and host details aside):
    equal              |new - old| <= rtol |old| (+ atol): float rounding of the same computation
    within uncertainty |new - old| is within the record's uncertainty of that value: half the width of its interval
                       `<key>_ci` = [low, high], or Z_STDERR x `<key>_stderr` / `<key>_se` (lm-eval's acc_stderr)
    differs            anything else; so does a string (a hash, a coordinate) that changed or a value the rerun lacks
Exit 0 when every value agrees, 1 (with the table of values that do not) when one does not, 2 when refused.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from outlierlab.results import CODE, REPO, git_state, read_result
from outlierlab.runner import RECORD_FORMAT

Z_STDERR = 1.96
# Leaves that say when, where or how fast, not what was measured.
VOLATILE = {"started_at", "created", "wall_time_s", "eval_seconds", "tokens_per_s", "seconds", "environment", "git",
            "overrides", "file", "converted_cache", "directory", "device", "torch_dtype", "run_dir", "paths", "logger"}
# The sweep's cell key hashes the config less a list of keys that is itself code: the config is compared leaf by leaf.
VOLATILE_PATHS = {"cell.key", "cell.ignored"}
UNCERTAINTY = ("_ci", "_stderr", "_se")


class Refused(Exception):
    """The record cannot be compared with this code (why, in one line)."""


@dataclass
class Comparison:
    path: str
    recorded: object
    reproduced: object
    verdict: str  # "equal" | "within uncertainty" | "differs" | "missing"
    tolerance: str = ""

    @property
    def agrees(self) -> bool:
        return self.verdict in ("equal", "within uncertainty")


# ------------------------------------------------------------------------------------------------ provenance

def _code_changes(commit: str) -> list[str] | None:
    """Files under CODE that differ between `commit` and HEAD (None: this repository does not have the commit)."""
    done = subprocess.run(["git", "diff", "--name-only", commit, "HEAD", "--", *CODE], cwd=REPO,
                          capture_output=True, text=True)
    return None if done.returncode != 0 else done.stdout.split()


def check_provenance(record: dict, allow_dirty: bool = False, here_code: bool = False,
                     here: dict | None = None) -> tuple[str | None, list[str]]:
    """Which code reruns the record: (None = this checkout's, or the commit to check out), and the warnings of what
    was allowed. Raise Refused when the record's code cannot be named or is not here. `here_code`: use this checkout's
    code even when the record's commit has other code; `here` is this checkout's git_state (default: read it)."""
    made, here = record.get("git") or {}, here if here is not None else git_state(REPO, diff=False)
    warnings = []
    if made.get("dirty"):
        if not allow_dirty:
            raise Refused(f"made from a dirty tree at {str(made.get('commit'))[:10]}: the code that made it cannot be "
                          f"named (rerun it at a clean commit, or --allow-dirty to compare anyway)")
        warnings.append("the record was made from a dirty tree")
    source = str((record.get("model") or {}).get("source") or "")
    if source and "://" not in source and source != "tiny" and not (REPO / source).expanduser().exists():
        raise Refused(f"its model, {source}, is not here (a checkpoint: make it first with the command that made "
                      f"it, e.g. +exp=pretrain)")
    commit = made.get("commit")
    if commit is None:
        raise Refused("the record names no commit")
    checkout = None
    if commit != here.get("commit"):
        changed = _code_changes(commit)
        if changed is None and not here_code:
            raise Refused(f"made at commit {commit[:10]}, which this repository does not have (fetch it, or --here "
                          f"to rerun with this checkout's code)")
        if changed is None or changed:
            reason = ("its commit is not in this repository" if changed is None
                      else f"{len(changed)} code files changed since ({', '.join(changed[:3])}...)")
            if here_code:
                warnings.append(f"made at {commit[:10]}, rerun with this checkout's code: {reason}")
            elif not made.get("dirty"):
                checkout = commit
    if checkout is None and here.get("dirty"):
        if not allow_dirty:
            raise Refused("this working tree has uncommitted changes to its code: the rerun's code would not be the "
                          "record's (commit first, or --allow-dirty)")
        warnings.append("this working tree is dirty")
    return checkout, warnings


# ------------------------------------------------------------------------------------------------ the rerun

def _this_machine_paths() -> dict[str, str]:
    """paths.data_dir / cache_dir / checkpoints_dir as this checkout resolves them, absolute (a worktree elsewhere
    must read the same data and write no checkpoint into this repository's outputs/ by accident: it reads them)."""
    paths = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "config.yaml").paths, resolve=True)
    return {f"OUTLIERLAB_{key.upper()}": str((REPO / Path(value).expanduser()).resolve())
            for key, value in paths.items() if key != "results_dir" and value is not None}


@contextmanager
def checkout_at(commit: str | None):
    """This repository's root (commit None), or a temporary git worktree at `commit` (removed afterwards) where the
    model sources the record names relative to the repository (outputs/...) are linked to this checkout's."""
    if commit is None:
        yield REPO
        return
    root = Path(tempfile.mkdtemp(prefix=f"outlierlab-at-{commit[:10]}-")) / "checkout"
    subprocess.run(["git", "worktree", "add", "--detach", str(root), commit], cwd=REPO, check=True,
                   capture_output=True)
    try:
        if (REPO / "outputs").exists():
            (root / "outputs").symlink_to(REPO / "outputs")
        print(f"rerun at the record's commit {commit[:10]} (a temporary worktree)", flush=True)
        yield root
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(root)], cwd=REPO, capture_output=True)


def rerun(record: dict, scratch: Path, root: Path = REPO) -> Path:
    """Run the record's command again with the code at `root`, results in `scratch`; the path of the new record."""
    # Where data, cache and results lie is this machine's (the record holds them portably; the data is checked by
    # its sha256 in the comparison).
    overrides = [o for o in record["overrides"] if not o.lstrip("+~").startswith("paths.")]
    command = [sys.executable, "run.py", *overrides, f"paths.results_dir={scratch / 'results'}",
               "logger=none", f"hydra.run.dir={scratch / 'hydra'}"]
    environment = {**os.environ, **({} if root == REPO else _this_machine_paths()),
                   "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    print("rerun:", " ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=root, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"the rerun exited with {done.returncode}")
    produced = list((scratch / "results").rglob("*.json"))
    if len(produced) != 1:
        raise RuntimeError(f"the rerun wrote {len(produced)} records under {scratch / 'results'}, expected one")
    return produced[0]


# ------------------------------------------------------------------------------------------------ comparison

def _leaves(value, path: str = ""):
    """(dotted path, value, the dict holding it, its key) of every leaf; the data files of a protocol are named by
    file name (a data file is known by its sha256, not by where it lies)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in VOLATILE:
                continue
            name = key.rsplit("/", 1)[-1] if path.endswith(".files") else key
            dotted = f"{path}.{name}" if path else name
            if dotted not in VOLATILE_PATHS:
                yield from _leaves_in(item, dotted, value, key)
    elif isinstance(value, list):
        for position, item in enumerate(value):
            yield from _leaves_in(item, f"{path}[{position}]", value, position)


def _leaves_in(item, path, parent, key):
    if isinstance(item, (dict, list)):
        yield from _leaves(item, path)
    else:
        yield path, item, parent, key


def _uncertainty(parent, key) -> tuple[str, object] | None:
    if not isinstance(parent, dict) or not isinstance(key, str):
        return None
    interval = parent.get(f"{key}_ci")
    if isinstance(interval, list) and len(interval) == 2:
        return "ci", interval
    for suffix in ("_stderr", "_se"):
        if isinstance(parent.get(f"{key}{suffix}"), (int, float)):
            return "se", parent[f"{key}{suffix}"]
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(old: float, new: float, rtol: float, atol: float) -> bool:
    if math.isnan(old) or math.isnan(new):
        return math.isnan(old) and math.isnan(new)
    if math.isinf(old) or math.isinf(new):
        return old == new
    return abs(new - old) <= atol + rtol * abs(old)


def _compare_number(path, old, new, parent, key, rtol, atol) -> Comparison:
    tolerance = f"rtol {rtol:g}"
    if _same(float(old), float(new), rtol, atol):
        return Comparison(path, old, new, "equal", tolerance)
    spread = _uncertainty(parent, key)
    if spread is None:
        return Comparison(path, old, new, "differs", tolerance)
    if spread[0] == "ci":
        low, high = spread[1]
        allowed = (high - low) / 2 if _number(low) and _number(high) else math.nan
        tolerance = f"± {allowed:.4g} (half its interval)"
    else:
        allowed = Z_STDERR * spread[1]
        tolerance = f"± {allowed:.4g} ({Z_STDERR:g} stderr)"
    inside = abs(new - old) <= allowed  # False when the interval is NaN or the difference is
    return Comparison(path, old, new, "within uncertainty" if inside else "differs", tolerance)


def compare(recorded: dict, reproduced: dict, rtol: float = 1e-4, atol: float = 1e-9) -> list[Comparison]:
    """Every leaf of the recorded result against the rerun's. Uncertainty leaves (`*_ci`, `*_stderr`, `*_se`) are
    the tolerance, not compared; leaves the rerun adds (a newer record holds more) are not compared either."""
    new_leaves = {path: value for path, value, _, _ in _leaves(reproduced)}
    out = []
    for path, old, parent, key in _leaves(recorded):
        if isinstance(key, str) and key.endswith(UNCERTAINTY) or ("_ci[" in path):
            continue
        if path not in new_leaves:
            out.append(Comparison(path, old, None, "missing"))
            continue
        new = new_leaves[path]
        if _number(old) and _number(new):
            out.append(_compare_number(path, old, new, parent, key, rtol, atol))
        else:
            out.append(Comparison(path, old, new, "equal" if old == new else "differs", "exact"))
    return out


def _show(value) -> str:
    if _number(value) and isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def diff_table(comparisons: list[Comparison], limit: int = 40) -> str:
    """A markdown table of the values that do not agree (at most `limit` rows; the rest counted)."""
    failing = [c for c in comparisons if not c.agrees]
    lines = ["| value | recorded | reproduced | tolerance | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {c.path} | {_show(c.recorded)} | {_show(c.reproduced)} | {c.tolerance} | {c.verdict} |"
              for c in failing[:limit]]
    if len(failing) > limit:
        lines.append(f"| ... {len(failing) - limit} more | | | | |")
    return "\n".join(lines)


def summary(comparisons: list[Comparison]) -> str:
    counts = {verdict: sum(c.verdict == verdict for c in comparisons)
              for verdict in ("equal", "within uncertainty", "differs", "missing")}
    return ", ".join(f"{count} {verdict}" for verdict, count in counts.items() if count)


# ------------------------------------------------------------------------------------------------ command line

def _scratch(path: Path, keep: str | None) -> Path:
    if keep is None:
        return Path(tempfile.mkdtemp(prefix="outlierlab-reproduce-"))
    return Path(keep) / "-".join(path.with_suffix("").parts[-3:])


def reproduce(path: Path, args) -> int:
    """0 agrees, 1 differs, 2 refused or failed to run."""
    record = read_result(path)
    try:
        commit, warnings = check_provenance(record, args.allow_dirty, args.here)
        for warning in warnings:
            print(f"warning: {path}: {warning}")
    except Refused as refusal:
        print(f"refused: {path}: {refusal}")
        return 2
    try:
        if args.against:
            reproduced = read_result(args.against)
        else:
            with checkout_at(commit) as root:
                reproduced = read_result(rerun(record, _scratch(path, args.keep), root))
        comparisons = compare(record, reproduced, args.rtol)
    except (RuntimeError, subprocess.CalledProcessError) as error:
        print(f"failed: {path}: {error}")
        return 2
    if all(c.agrees for c in comparisons):
        print(f"agrees: {path} ({summary(comparisons)})")
        return 0
    print(f"differs: {path} ({summary(comparisons)})\n{diff_table(comparisons)}")
    return 1


def status(record: dict) -> list[str]:
    """Why a committed record is not yet one this code can stand behind: dirty, older format, not the lock."""
    problems = ["dirty"] if (record.get("git") or {}).get("dirty") else []
    if record.get("record_format", 1) < RECORD_FORMAT:
        problems.append(f"format {record.get('record_format', 1)}")
    lock = (record.get("environment") or {}).get("lock")
    problems += ["no lock status"] if not lock else [] if lock.get("matches") else ["not the lock"]
    return problems


def status_table(paths: list[Path]) -> str:
    """A markdown list of records to regenerate, with their recorded wall time (the cost of doing it)."""
    lines = ["| record | to fix | commit | recorded wall s |", "|---|---|---|---|"]
    stale, seconds = 0, 0.0
    for path in paths:
        record = read_result(path)
        problems = status(record)
        if problems:
            stale, seconds = stale + 1, seconds + (record.get("wall_time_s") or 0)
            commit = str((record.get("git") or {}).get("commit"))[:7]
            lines.append(f"| {os.path.relpath(path)} | {', '.join(problems)} | {commit} | {record.get('wall_time_s')} |")
    return "\n".join(lines + [f"\n{stale} of {len(paths)} records to regenerate, {seconds / 3600:.1f} h recorded"])


def records(patterns: list[str], every: bool) -> list[Path]:
    if every:
        patterns = [str(REPO / "results" / "*" / "*" / "*.json")]
    found = sorted({Path(p) for pattern in patterns for p in (glob.glob(pattern) or [pattern])})
    return [p for p in found if p.parent.parent.parent.name == "results" or not every]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m outlierlab.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="*", help="result JSON files or globs")
    parser.add_argument("--all", action="store_true", help="every record under results/<exp>/<model>/")
    parser.add_argument("--allow-dirty", action="store_true", help="compare a record made from a dirty tree, or "
                        "rerun from one")
    parser.add_argument("--here", action="store_true", help="rerun with this checkout's code, not the record's "
                        "commit's (does today's code still give the recorded numbers?)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of 'equal' (default 1e-4)")
    parser.add_argument("--keep", help="write the reruns here (default: a temporary folder)")
    parser.add_argument("--against", help="compare with this record instead of rerunning (e.g. a kept rerun)")
    parser.add_argument("--status", action="store_true", help="rerun nothing: list the records that are dirty, of "
                        "an older format or not made with the lock, with their recorded wall time")
    args = parser.parse_args(argv)
    paths = records(args.records, args.all)
    if not paths:
        parser.error("name a record (or --all)")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: no such record: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.status:
        print(status_table(paths))
        return 0
    codes = [reproduce(path, args) for path in paths]
    if len(paths) > 1:
        print(f"{codes.count(0)} agree, {codes.count(1)} differ, {codes.count(2)} refused or failed "
              f"(of {len(paths)})")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
