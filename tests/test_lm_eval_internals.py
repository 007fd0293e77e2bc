"""The zero-shot bridge (evals/zeroshot.py) relies on lm-eval internals that are not public API: TaskManager._entry,
._index, ._load_spec and ._factory.build(entry, overrides=, registry=), which merges overrides onto the registered
task. This pins them, so an lm-eval release that moves them fails here, naming the version, not in a user's run."""
from __future__ import annotations

import inspect
import json
from importlib import metadata

import pytest

from outlierlab.evals.zeroshot import local_overrides

VERSION = metadata.version("lm_eval")
MOVED = f"lm-eval {VERSION} moved an internal the zero-shot bridge uses (evals/zeroshot.py build_tasks)"


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager
    return TaskManager()


def test_task_manager_internals_exist(manager):
    for name in ("_entry", "_index", "_load_spec", "_factory"):
        assert hasattr(manager, name), f"{MOVED}: TaskManager.{name} is gone"
    assert isinstance(manager._index, dict) and "arc_easy" in manager._index, f"{MOVED}: TaskManager._index"
    assert manager._entry("arc_easy") is not None, f"{MOVED}: TaskManager._entry('arc_easy') found nothing"
    assert manager._entry("no_such_task_xyz") is None, f"{MOVED}: TaskManager._entry no longer returns None"
    parameters = inspect.signature(manager._factory.build).parameters
    assert {"overrides", "registry"} <= set(parameters), f"{MOVED}: TaskFactory.build{inspect.signature(manager._factory.build)}"


def test_factory_merges_a_local_data_source_onto_the_official_task(manager, tmp_path):
    """Only the data source changes: the official prompt and target stay (a bare dict spec would replace them)."""
    rows = [{"id": str(i), "question": f"Question {i}?", "answerKey": "A",
             "choices": {"text": ["yes", "no"], "label": ["A", "B"]}} for i in range(3)]
    data_dir = tmp_path / "data"
    (data_dir / "arc").mkdir(parents=True)
    (data_dir / "arc" / "ARC-Easy-Test.reconstructed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides, _ = local_overrides("arc_easy", data_dir, tmp_path / "cache")
    official = manager._entry("arc_easy")
    task = manager._factory.build(official, overrides=overrides, registry=manager._index)
    config = task.config
    assert config.dataset_path == "json", f"{MOVED}: overrides are not applied"
    assert config.doc_to_text == "Question: {{question}}\nAnswer:", f"{MOVED}: the official template was replaced"
    docs = list(task.test_docs())
    assert [doc["id"] for doc in docs] == ["0", "1", "2"], f"{MOVED}: the task does not read the local file"
