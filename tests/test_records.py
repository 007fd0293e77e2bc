"""Zero dirty records: every committed record names the clean commit that made it, is of the current format, made
with the lock, and holds no host path."""
import json
import os
import subprocess

from conftest import ROOT

from outlierlab import reproduce


def _commit_here(commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True).returncode == 0


def _host_paths(record: dict, text: str) -> list[str]:
    home = os.path.expanduser("~") + "/"
    found = [marker for marker in (str(ROOT), home, "site-packages") if marker in text]
    named = [str((record.get("model") or {}).get("source") or ""),
             *(o.split("=", 1)[-1] for o in record.get("overrides") or [])]
    return found + [value for value in named if value.startswith("/")]


def test_every_committed_record_is_clean_current_and_portable():
    """Zero dirty records: every record under results/ was made from a clean commit this repository has, in the
    current record format, with the lock, and names no host path (not in its overrides, not as its model source).
    `python -m outlierlab.reproduce --all --status` lists what to regenerate when this fails."""
    problems = {}
    for path in sorted((ROOT / "results").glob("*/*/*.json")):
        text = path.read_text()
        record = json.loads(text)
        found = reproduce.status(record) + [f"host path {p}" for p in _host_paths(record, text)]
        commit = (record.get("git") or {}).get("commit")
        if not commit or not _commit_here(commit):
            found.append(f"commit {commit} is not in this repository")
        if found:
            problems[str(path.relative_to(ROOT))] = found
    assert not problems, "\n".join(f"{path}: {', '.join(found)}" for path, found in problems.items())
