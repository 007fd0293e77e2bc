"""A record reproduces itself (python -m outlierlab.reproduce): a tiny run's record agrees with its rerun, an edited
one fails with a table naming the values, and records whose code cannot be named are refused with the reason."""
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import DATA_DIR, ROOT, SMALL_EVAL, compose_cfg

from outlierlab import reproduce
from outlierlab.results import git_state, read_result, write_result
from outlierlab.runner import RECORD_FORMAT

pytestmark = pytest.mark.requires("data")


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    """A record made as a user makes one: run.py in a subprocess (prune_sw on tiny_llama, 2 windows of 64 tokens)."""
    folder = tmp_path_factory.mktemp("record")
    environment = {**os.environ, "OUTLIERLAB_DATA_DIR": str(DATA_DIR), "OUTLIERLAB_CACHE_DIR": str(folder / "cache"),
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}  # this checkout's code
    done = subprocess.run([sys.executable, "run.py", "+exp=prune_sw", "model=tiny_llama", "logger=none", *SMALL_EVAL,
                           f"paths.results_dir={folder / 'results'}", f"hydra.run.dir={folder / 'outputs'}"],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "results" / "prune_sw" / "tiny_llama" / "quick.json"


def test_a_tiny_record_reproduces(tiny_record, tmp_path, capsys):
    # --allow-dirty: this test checks the rerun, not where the code came from (a developer's tree may be dirty)
    assert reproduce.main([str(tiny_record), "--allow-dirty", "--keep", str(tmp_path)]) == 0
    assert f"agrees: {tiny_record}" in capsys.readouterr().out
    rerun, = tmp_path.rglob("quick.json")
    assert read_result(rerun)["variants"]["original"]["ppl"]["wikitext2"]["ppl_ci"]


def test_an_edited_record_fails_with_a_readable_diff(tiny_record, tmp_path, capsys):
    edited = read_result(tiny_record)
    wikitext = edited["variants"]["original"]["ppl"]["wikitext2"]
    wikitext["ppl"] *= 1.5  # further from the rerun's than its interval is wide
    edited["evaluations"]["c4"]["windows_sha256"] = "0" * 64
    write_result(edited, tmp_path / "edited.json")
    assert reproduce.main([str(tmp_path / "edited.json"), "--against", str(tiny_record), "--allow-dirty"]) == 1
    out = capsys.readouterr().out
    assert "differs:" in out and "| value | recorded | reproduced | tolerance | verdict |" in out
    assert "| variants.original.ppl.wikitext2.ppl |" in out and "(half its interval) | differs |" in out
    assert "| evaluations.c4.windows_sha256 | 0000" in out
    # the values that were not edited agree: nothing else is listed
    assert out.count("| differs |") == 2


def test_values_within_their_recorded_uncertainty_agree():
    recorded = {"ppl": 30.0, "ppl_ci": [28.0, 33.0], "acc": 0.5, "acc_stderr": 0.1, "n": 8, "name": "x"}
    moved = {**recorded, "ppl": 31.0, "acc": 0.6}
    verdicts = {c.path: c.verdict for c in reproduce.compare(recorded, moved)}
    assert verdicts == {"ppl": "within uncertainty", "acc": "within uncertainty", "n": "equal", "name": "equal"}
    far = {**recorded, "ppl": 27.4, "acc": 0.8, "n": 9}  # the interval's half width is 2.5
    assert {c.path for c in reproduce.compare(recorded, far) if not c.agrees} == {"ppl", "acc", "n"}
    assert [c.verdict for c in reproduce.compare({"a": {"b": 1}}, {"a": {}})] == ["missing"]


def test_timings_and_host_details_are_not_compared():
    recorded = {"wall_time_s": 1.0, "environment": {"torch": "1"}, "ppl": {"eval_seconds": 3.0, "ppl": 2.0}}
    assert [c.path for c in reproduce.compare(recorded, {"ppl": {"ppl": 2.0}})] == ["ppl.ppl"]


def test_records_whose_code_cannot_be_named_are_refused(monkeypatch):
    here = {"commit": "a" * 40, "dirty": False}
    with pytest.raises(reproduce.Refused, match="dirty tree.*--allow-dirty"):
        reproduce.check_provenance({"git": {"commit": "a" * 40, "dirty": True}}, here=here)
    with pytest.raises(reproduce.Refused, match="uncommitted changes"):
        reproduce.check_provenance({"git": {"commit": "a" * 40, "dirty": False}}, here={**here, "dirty": True})
    with pytest.raises(reproduce.Refused, match="does not have.*--here"):
        reproduce.check_provenance({"git": {"commit": "f" * 40, "dirty": False}}, here=here)
    assert reproduce.check_provenance({"git": {"commit": "a" * 40, "dirty": False}}, here=here) == (None, [])
    checkout, warnings = reproduce.check_provenance({"git": {"commit": "f" * 40, "dirty": True}}, allow_dirty=True,
                                                    here_code=True, here=here)
    assert checkout is None and len(warnings) == 2


def test_a_record_of_other_code_reruns_at_its_own_commit(monkeypatch):
    """The code moved on since the record: the rerun uses the record's commit (a worktree), not this checkout's,
    so this checkout's uncommitted changes do not matter; --here uses this checkout's code and says so."""
    here = {"commit": "a" * 40, "dirty": True}
    monkeypatch.setattr(reproduce, "_code_changes", lambda commit: ["src/outlierlab/runner.py"])
    made = {"git": {"commit": "b" * 40, "dirty": False}}
    assert reproduce.check_provenance(made, here=here) == ("b" * 40, [])
    checkout, (warning, dirty) = reproduce.check_provenance(made, here_code=True, allow_dirty=True, here=here)
    assert checkout is None and "rerun with this checkout's code: 1 code files changed" in warning
    monkeypatch.setattr(reproduce, "_code_changes", lambda commit: [])  # same code: rerun here
    assert reproduce.check_provenance(made, here={**here, "dirty": False}) == (None, [])


def test_the_rerun_worktree_is_the_records_commit_and_is_removed():
    head = git_state(ROOT, diff=False)["commit"]
    with reproduce.checkout_at(head) as root:
        assert root != ROOT and (root / "run.py").is_file()
        assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip() == head
        assert not (root / "outputs").exists() or (root / "outputs").resolve() == (ROOT / "outputs").resolve()
    assert not root.exists()
    assert str(root) not in subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout


def test_a_tiny_record_reproduces_at_its_commit_in_a_worktree(tiny_record, tmp_path, monkeypatch, capsys):
    record = read_result(tiny_record)
    head = git_state(ROOT, diff=False)["commit"]
    record["git"] = {"commit": head, "dirty": False}  # as if made at HEAD from a clean tree
    write_result(record, tmp_path / "at_head.json")
    here = git_state(ROOT, diff=False)
    monkeypatch.setattr(reproduce, "git_state", lambda *a, **k: {**here, "commit": "0" * 40})  # the code moved on
    monkeypatch.setattr(reproduce, "_code_changes", lambda commit: ["src/outlierlab/runner.py"])
    assert reproduce.main([str(tmp_path / "at_head.json"), "--keep", str(tmp_path / "rerun")]) == 0
    out = capsys.readouterr().out
    assert f"rerun at the record's commit {head[:10]}" in out and "agrees:" in out


def test_a_refused_record_exits_2_with_the_reason(tmp_path, capsys):
    write_result({"git": {"commit": "a" * 40, "dirty": True}, "overrides": []}, tmp_path / "r.json")
    assert reproduce.main([str(tmp_path / "r.json")]) == 2
    assert "refused:" in capsys.readouterr().out


CHEAP_S = 120  # recorded wall time (2 shared cores) of a tiny-model record rerun in every CI run
MUST_SHOW = "results/prune_sw/smollm2_135m/quick.json"  # issue 24's example, rerun under slow


def _committed_records():
    """Committed records whose code can be named (clean tree, current format) rerun with today's code: a tiny model's
    cheap record in every CI run, the issue's SmolLM2 example under slow. Every other record:
    python -m outlierlab.reproduce --all (hours)."""
    params = []
    for path in sorted((ROOT / "results").glob("*/*/*.json")):
        record = json.loads(path.read_text())
        if reproduce.status(record):
            continue
        source = str((record.get("model") or {}).get("source"))
        cheap = source == "tiny" and (record.get("wall_time_s") or math.inf) <= CHEAP_S
        if cheap or str(path.relative_to(ROOT)) == MUST_SHOW:
            params.append(pytest.param(path, id=str(path.relative_to(ROOT)), marks=() if cheap else pytest.mark.slow))
    return params


@pytest.mark.parametrize("path", _committed_records())
def test_committed_records_reproduce(path, tmp_path):
    # Today's code still gives the recorded numbers (--here: this checkout's code, whatever commit made the record).
    assert reproduce.main([str(path), "--here", "--allow-dirty", "--keep", str(tmp_path)]) == 0


def test_a_dirty_tree_records_the_diff_of_its_code(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "src").mkdir()
    for name in ("src/code.py", "README.md"):
        (tmp_path / name).write_text("x = 1\n")
    git("add", "src/code.py", "README.md")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert git_state(tmp_path) == {"commit": git_state(tmp_path)["commit"], "dirty": False}
    (tmp_path / "README.md").write_text("prose\n")  # not code: the records it could make are the same
    (tmp_path / "src" / "untracked.py").write_text("")  # untracked files are not the code that ran
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    state = git_state(tmp_path)
    assert state["dirty"] and state["changed"] == ["src/code.py"] and "+x = 2" in state["diff"]
    assert "prose" not in state["diff"] and not state["diff_truncated"] and len(state["diff_sha256"]) == 64


def test_a_dirty_tree_may_not_write_into_the_tracked_results(monkeypatch):
    from outlierlab import runner
    from outlierlab.errors import ConfigError
    monkeypatch.setattr(runner, "git_state", lambda *a, **k: {"commit": "a" * 40, "dirty": True,
                                                              "changed": ["src/outlierlab/runner.py"]})
    cfg = compose_cfg(["+exp=prune_sw", "model=tiny_llama", f"paths.results_dir={ROOT / 'results'}"])
    with pytest.raises(ConfigError, match=r"clean tree.*\(src/outlierlab/runner.py\).*allow_dirty=true"):
        runner.preflight(cfg)
    runner.preflight(compose_cfg(["+exp=prune_sw", "model=tiny_llama", f"paths.results_dir={ROOT / 'results'}",
                                  "allow_dirty=true"]))


def test_records_hold_no_host_paths(tiny_record):
    text = tiny_record.read_text()
    assert str(ROOT) not in text and str(DATA_DIR.resolve()) not in text and os.path.expanduser("~") + "/" not in text


def test_status_lists_the_records_to_regenerate_with_their_cost(tmp_path, capsys):
    clean = {"record_format": RECORD_FORMAT, "git": {"commit": "a" * 40, "dirty": False}, "wall_time_s": 10.0,
             "environment": {"lock": {"matches": True}}}
    stale = {"git": {"commit": "b" * 40, "dirty": True}, "wall_time_s": 3600.0, "environment": {}}
    write_result(clean, tmp_path / "exp" / "m" / "clean.json")
    write_result(stale, tmp_path / "exp" / "m" / "stale.json")
    assert reproduce.main([str(tmp_path / "exp" / "*" / "*.json"), "--status"]) == 0
    out = capsys.readouterr().out
    assert "stale.json | dirty, format 1, no lock status | bbbbbbb | 3600.0 |" in out and "clean.json" not in out
    assert "1 of 2 records to regenerate, 1.0 h recorded" in out
