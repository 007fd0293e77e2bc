"""Zero-shot accuracy through lm-eval, on the model as the interventions left it.

lm-eval's own task definitions (prompt templates, targets, metrics) are used unchanged; offline, only where the data
comes from is overridden, per task, from the local data directory. Tasks without local data are reported as skipped;
tasks whose local data is not the original are marked with their data status, never silently mixed in.

Each task records lm-eval's accuracy and stderr and every example's 0/1 accuracy (`correct`, by `doc_ids`), so two
variants evaluated on the same examples compare paired (`paired_accuracy_change`): far tighter than two stderrs.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from outlierlab.evals.bootstrap import BOOTSTRAP, percentile_interval
from outlierlab.evals.data import DataError


def _piqa_rows(files: list[Path]) -> list[dict]:
    """piqa ships its labels in a separate file, one per line."""
    rows = files[0].read_text(encoding="utf-8").splitlines()
    labels = files[1].read_text().split()
    if len(rows) != len(labels):
        raise DataError(f"{files[0]}: {len(rows)} rows but {len(labels)} labels in {files[1]}")
    return [{**json.loads(row), "label": int(label)} for row, label in zip(rows, labels)]


def _openbookqa_rows(files: list[Path]) -> list[dict]:
    """Original OpenBookQA layout (question.stem, question.choices) -> the HF layout lm-eval's task reads."""
    rows = []
    for line in files[0].read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        choices = doc["question"]["choices"]
        rows.append({"id": doc["id"], "question_stem": doc["question"]["stem"], "answerKey": doc["answerKey"],
                     "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}})
    return rows


def _rte_rows(files: list[Path]) -> list[dict]:
    """GLUE RTE validation TSV (sentence1, sentence2, label, idx) -> rows."""
    with open(files[0], encoding="utf-8", newline="") as handle:
        return [{**row, "label": int(row["label"]), "idx": int(row["idx"])}
                for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _hellaswag_rows(files: list[Path]) -> list[dict]:
    """llama.cpp's preprocessed text (6 lines a task: "activity_label: ctx", gold, 4 endings) -> the fields lm-eval's
    process_docs reads. The whole context goes to ctx_a: the original ctx_b capitalisation is lost (approximate)."""
    with bz2.open(files[0], "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    rows = []
    for start in range(0, len(lines) - 5, 6):
        label, _, context = lines[start].partition(": ")
        rows.append({"activity_label": label, "ctx_a": context, "ctx_b": "", "label": lines[start + 1].strip(),
                     "endings": lines[start + 2:start + 6]})
    return rows


def _copa_rows(files: list[Path]) -> list[dict]:
    """llm-foundry's COPA (query = premise without its period + " because"/" therefore") -> SuperGLUE fields."""
    rows = []
    for index, line in enumerate(files[0].read_text(encoding="utf-8").splitlines()):
        doc = json.loads(line)
        premise, _, connector = doc["query"].rpartition(" ")
        rows.append({"premise": premise + ".", "question": {"because": "cause", "therefore": "effect"}[connector],
                     "choice1": doc["choices"][0], "choice2": doc["choices"][1], "label": doc["gold"], "idx": index})
    return rows


@dataclass(frozen=True)
class LocalTask:
    """Where a task's evaluation split lives under the data directory, and how faithful that copy is."""
    split: str  # the lm-eval split the file stands for: "validation" or "test"
    files: tuple[str, ...]
    status: str  # verbatim | reconstructed | derived | rebuilt (see each data folder's README)
    convert: Callable[[list[Path]], list[dict]] | None = None  # when the file is not in the layout lm-eval reads


LOCAL_TASKS = {
    "arc_easy": LocalTask("test", ("arc/ARC-Easy-Test.reconstructed.jsonl",), "reconstructed"),
    "arc_challenge": LocalTask("test", ("arc/ARC-Challenge-Test.reconstructed.jsonl",), "reconstructed"),
    "winogrande": LocalTask("validation", ("winogrande/dev.jsonl",), "verbatim"),
    "piqa": LocalTask("validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "verbatim", _piqa_rows),
    "boolq": LocalTask("validation", ("boolq/val.superglue_format.jsonl",), "derived (SuperGLUE layout of dev)"),
    "lambada_openai": LocalTask("test", ("lambada_openai/lambada_test_en.jsonl",), "rebuilt"),
    "openbookqa": LocalTask("test", ("openbookqa/test.jsonl",), "verbatim", _openbookqa_rows),
    "rte": LocalTask("validation", ("rte/validation.tsv",), "verbatim", _rte_rows),
    "hellaswag": LocalTask("validation", ("hellaswag/hellaswag_val_full.txt.bz2",), "approximate (preprocessed text)",
                           _hellaswag_rows),
    "copa": LocalTask("validation", ("copa/copa_validation.llmfoundry_icl.jsonl",), "derived (llm-foundry layout)",
                      _copa_rows),
}


def _converted(data_dir: Path, task: LocalTask, cache_dir: Path) -> Path:
    """Run the task's converter once; the jsonl is cached under a name keyed by its content."""
    rows = task.convert([data_dir / relative for relative in task.files])
    text = "".join(json.dumps(row) + "\n" for row in rows)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    target = cache_dir / "zeroshot" / f"{Path(task.files[0]).parent.name}-{digest}.jsonl"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_suffix(".tmp")
        staging.write_text(text, encoding="utf-8")
        staging.replace(target)
    return target


def local_overrides(name: str, data_dir: str | Path, cache_dir: str | Path) -> tuple[dict, str] | None:
    """The task-config keys that point `name` at its local file (None if there is no local data), and its status."""
    local = LOCAL_TASKS.get(name)
    if local is None:
        return None
    path = (_converted(Path(data_dir), local, Path(cache_dir).expanduser()) if local.convert
            else Path(data_dir) / local.files[0])
    overrides = {"task": name, "dataset_path": "json", "dataset_name": None,
                 "dataset_kwargs": {"data_files": {local.split: str(Path(path).resolve())}},
                 "training_split": None, "validation_split": None, "test_split": None,
                 f"{local.split}_split": local.split}
    return overrides, local.status


def check_tasks(names, data_dir: str | None) -> None:
    """Pre-flight: every task is known to lm-eval's naming here and its local files exist (when offline)."""
    if data_dir is None:
        return
    for name in names:
        local = LOCAL_TASKS.get(name)
        for relative in local.files if local else ():
            if not (Path(data_dir) / relative).is_file():
                raise DataError(f"zero-shot task '{name}': data file {Path(data_dir) / relative} not found")


def build_tasks(names, data_dir: str | None, cache_dir: str | Path):
    """-> (lm-eval TaskManager, {name: Task}, {name: status or skip reason})."""
    from lm_eval.tasks import TaskManager
    manager = TaskManager()
    tasks, status = {}, {}
    for name in names:
        entry = manager._entry(name)
        if entry is None:
            raise DataError(f"zero-shot task '{name}' is not an lm-eval task")
        if data_dir is None:  # online: the official task as it is
            tasks[name] = manager._load_spec(name)
            status[name] = "hub"
            continue
        local = local_overrides(name, data_dir, cache_dir)
        if local is None:
            status[name] = "skipped: no local data"
            continue
        # Only the data source changes; templates, targets and metrics stay the official ones. lm-eval merges
        # overrides onto the registered task only through its factory (a bare dict spec would replace it).
        tasks[name] = manager._factory.build(entry, overrides=local[0], registry=manager._index)
        status[name] = local[1]
    return manager, tasks, status


@contextmanager
def _as_edited(model):
    """Keep the model as the edits left it while lm-eval wraps it: HFLM calls `model.tie_weights()`, which ties the
    LM head back to the input embedding, silently undoing an edit that gave a tied head its own weights (rotation)."""
    model.tie_weights = lambda *args, **kwargs: None  # an instance attribute shadows the method ...
    try:
        yield
    finally:
        del model.tie_weights  # ... and deleting it restores the method


def evaluate_zeroshot(loaded, suite, tasks_and_status, label: str = "zero-shot") -> dict:
    """Accuracy of every task of the suite with lm-eval's stderr (`acc_stderr`); `mean` averages acc over the tasks
    that ran, `mean_stderr` is its standard error."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    manager, tasks, status = tasks_and_status
    results = {"tasks": {}, "limit": suite.limit, "num_fewshot": 0}
    if tasks:
        with _as_edited(loaded.model):
            model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=suite.batch_size,
                         add_bos_token=loaded.bos == "prepend")
        # HFLM sends inputs to model.device, the first parameter's: `meta` when that one is offloaded to disk.
        model._device = loaded.device
        print(f"{label}: lm-eval on {', '.join(tasks)} (limit {suite.limit})")
        output = evaluator.simple_evaluate(model=model, tasks=list(tasks.values()), num_fewshot=0,
                                           limit=suite.limit, task_manager=manager, random_seed=0,
                                           numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                                           log_samples=True)
        for name in tasks:
            metrics = output["results"][name]
            results["tasks"][name] = {
                "acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"),
                "acc_stderr": metrics.get("acc_stderr,none"), "data": status[name],
                "task_version": output["versions"].get(name), "samples": output["n-samples"][name],
                **_per_example(output.get("samples", {}).get(name) or [])}
        results["lm_eval_version"] = output.get("lm_eval_version") or _lm_eval_version()
    for name, reason in status.items():
        if name not in tasks:
            results["tasks"][name] = {"acc": None, "data": reason}
    ran = [t for t in results["tasks"].values() if t["acc"] is not None]
    results["mean"] = sum(t["acc"] for t in ran) / len(ran) if ran else None
    results["mean_stderr"] = mean_stderr([t.get("acc_stderr") for t in ran])
    results["mean_over"] = [n for n, t in results["tasks"].items() if t["acc"] is not None]
    return results


def _per_example(samples: list[dict]) -> dict:
    """Each example's accuracy (0/1) in doc_id order, and the doc_ids: what a paired comparison of two variants
    evaluated on the same examples needs."""
    scored = sorted((sample["doc_id"], float(sample["acc"])) for sample in samples if "acc" in sample)
    return {"doc_ids": [doc for doc, _ in scored], "correct": [acc for _, acc in scored]} if scored else {}


PAIRED = {**BOOTSTRAP, "method": "paired percentile bootstrap over examples, within each task"}


def paired_accuracy_change(results: dict, baseline: dict, method: dict = PAIRED) -> dict | None:
    """Mean accuracy over tasks minus the baseline's, with its paired bootstrap interval: each task's examples are
    resampled (the same examples for both variants, so what the examples share cancels), and the change is the mean
    over tasks of the per-task accuracy changes. None when the two share no task evaluated on the same examples."""
    tasks = [name for name, task in results.get("tasks", {}).items()
             if task.get("doc_ids") and task["doc_ids"] == baseline.get("tasks", {}).get(name, {}).get("doc_ids")]
    if not tasks:
        return None
    rng = np.random.default_rng(method["seed"])
    change, samples = 0.0, np.zeros(method["resamples"])
    for name in tasks:
        differences = (np.asarray(results["tasks"][name]["correct"]) - np.asarray(baseline["tasks"][name]["correct"]))
        change += differences.mean() / len(tasks)
        indices = rng.integers(0, len(differences), size=(method["resamples"], len(differences)))
        samples += differences[indices].mean(axis=1) / len(tasks)
    enough = all(len(results["tasks"][name]["correct"]) >= 2 for name in tasks)  # one example: no interval
    return {"change": float(change), "change_ci": percentile_interval(samples, method) if enough else
            [math.nan, math.nan], "tasks": tasks, "ci_method": method}


def mean_stderr(stderrs: list[float | None]) -> float | None:
    """The standard error of the mean accuracy over tasks from lm-eval's per-task stderrs (tasks independent):
    sqrt(sum se_i^2) / k; None if a task has none."""
    if not stderrs or any(se is None for se in stderrs):
        return None
    return sum(se * se for se in stderrs) ** 0.5 / len(stderrs)


def _lm_eval_version() -> str:
    from importlib import metadata
    return metadata.version("lm_eval")
