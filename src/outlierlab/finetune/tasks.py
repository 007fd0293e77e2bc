"""The two fine-tuning tasks: their training batches and their held-out evaluation.

    cpt    continued pretraining on the local Wikipedia sample (the first `max_chars` characters, the model's own
           tokenizer, documents joined by EOS); random windows seeded by (seed, step). Evaluated by the run's
           WikiText-2 PPL protocol (a different corpus: no training text is scored).
    boolq  BoolQ dev (the only labelled BoolQ split here) split by passage title with a fixed seed: every passage,
           and every question about it, lands in exactly one side, so no held-out passage is seen in training.
           Training examples are lm-eval's own boolq prompt ("{passage}\\nQuestion: {question}?\\nAnswer:") with
           the target " yes"/" no"; the loss is on the answer token only. The held-out side is scored by lm-eval's
           boolq task through the zero-shot bridge, its data file pointed at the held-out rows.
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from outlierlab.evals.data import DataError
from outlierlab.evals.zeroshot import LocalTask, _converted
from outlierlab.models.source import file_sha256
from outlierlab.train.data import sample_batch

TASKS = ("cpt", "boolq")
BOOLQ_FILE = "boolq/val.superglue_format.jsonl"  # the layout lm-eval reads (passage = "title -- passage")


def check(task_cfg, data_dir: str | None) -> None:
    if task_cfg.kind not in TASKS:
        raise DataError(f"finetune.task.kind={task_cfg.kind} is not one of: {', '.join(TASKS)}")
    if data_dir is None:
        raise DataError("finetune tasks read local data: paths.data_dir is null")
    relative = task_cfg.path if task_cfg.kind == "cpt" else BOOLQ_FILE
    if not (Path(data_dir) / relative).is_file():
        raise DataError(f"finetune.task: data file {Path(data_dir) / relative} not found (paths.data_dir={data_dir})")
    if task_cfg.kind == "boolq" and not 0 < task_cfg.test_fraction < 1:
        raise ValueError(f"finetune.task.test_fraction={task_cfg.test_fraction} must be in (0, 1)")


# ----------------------------------------------------------------------------------------- continued pretraining

def wikipedia_stream(path: Path, max_chars: int, tokenizer) -> tuple[torch.Tensor, dict]:
    documents, total = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if total >= max_chars:
                break
            if line.strip():
                documents.append(json.loads(line)["text"])
                total += len(documents[-1])
    eos = tokenizer.eos_token_id
    ids = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids += [*encoded, *([eos] if eos is not None else [])]
    return torch.tensor(ids, dtype=torch.long), {"file": str(path), "sha256": file_sha256(path),
                                                 "documents": len(documents), "chars": total, "tokens": len(ids)}


CALIBRATION_SEED = 7919  # = the former seed + 7919 at seed 0: seed 0's atlas windows are unchanged


class PretrainingBatches:
    def __init__(self, stream: torch.Tensor, batch_size: int, seqlen: int, seed: int, prefix: int | None):
        self.stream, self.batch_size, self.seqlen, self.seed, self.prefix = stream, batch_size, seqlen, seed, prefix

    def __call__(self, step: int):
        ids = sample_batch(self.stream, self.batch_size, self.seqlen, self.seed, step, self.prefix)
        ones = torch.ones_like(ids, dtype=torch.bool)
        return ids, ones.long(), ones

    def windows(self, count: int) -> torch.Tensor:
        """`count` calibration windows for the atlas, the same for every training seed (so the cached "before" is
        shared across seeds and before/after compare on one set); a seed no training step of seed 0 uses."""
        return sample_batch(self.stream, count, self.seqlen, CALIBRATION_SEED, 0, self.prefix)


# ------------------------------------------------------------------------------------------------------- BoolQ

def boolq_split(path: Path, test_fraction: float, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(train rows, test rows, provenance): whole passages (by title) go to one side."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    titles = sorted({row["passage"].split(" -- ", 1)[0] for row in rows})
    random.Random(seed).shuffle(titles)
    test_titles = set(titles[: round(test_fraction * len(titles))])
    train = [r for r in rows if r["passage"].split(" -- ", 1)[0] not in test_titles]
    test = [r for r in rows if r["passage"].split(" -- ", 1)[0] in test_titles]
    random.Random(seed + 1).shuffle(test)  # lm-eval's `limit` takes the first rows: make them a random sample
    meta = {"file": str(path), "sha256": file_sha256(path), "seed": seed, "test_fraction": test_fraction,
            "titles": len(titles), "test_titles": len(test_titles), "train_rows": len(train), "test_rows": len(test),
            "train_yes_share": sum(r["label"] for r in train) / len(train),
            "test_yes_share": sum(r["label"] for r in test) / len(test)}
    return train, test, meta


def write_rows(rows: list[dict], data_dir: str | Path, cache_dir: str | Path) -> Path:
    """The held-out rows as a jsonl under cache_dir/zeroshot/, named by its content (the bridge's converted files)."""
    held_out = LocalTask("validation", (BOOLQ_FILE,), "held-out", lambda _files: rows)
    return _converted(Path(data_dir), held_out, Path(cache_dir).expanduser())


class BoolQBatches:
    """lm-eval boolq's prompt + " yes"/" no"; left-truncated to seqlen, right-padded; loss on the answer only."""

    def __init__(self, rows: list[dict], loaded, batch_size: int, seqlen: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        tokenizer = loaded.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.examples = []
        for row in tqdm(rows, desc="tokenize boolq train", leave=False):
            context = loaded.encode(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:")
            answer = tokenizer(" yes" if row["label"] else " no", add_special_tokens=False)["input_ids"]
            self.examples.append(([*context, *answer][-seqlen:], len(answer)))

    def __call__(self, step: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picked = torch.randint(0, len(self.examples), (self.batch_size,), generator=generator).tolist()
        length = max(len(self.examples[i][0]) for i in picked)
        ids = torch.full((self.batch_size, length), self.pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        loss_mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, index in enumerate(picked):
            tokens, answer = self.examples[index]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            attention[row, :len(tokens)] = 1
            loss_mask[row, len(tokens) - answer:len(tokens)] = True
        return ids, attention, loss_mask

    def windows(self, count: int) -> torch.Tensor:
        """Calibration windows for the atlas: the first `count` training examples cut to a common length."""
        length = min(len(tokens) for tokens, _a in self.examples[:count])
        return torch.tensor([tokens[:length] for tokens, _a in self.examples[:count]])


def boolq_heldout_tasks(test_file: Path):
    """(TaskManager, {"boolq": Task}, {"boolq": status}) for evaluate_zeroshot: lm-eval's own boolq task with its
    validation data replaced by the held-out rows (the bridge's per-task override, to a different file)."""
    from lm_eval.tasks import TaskManager
    manager = TaskManager()
    overrides = {"task": "boolq", "dataset_path": "json", "dataset_name": None,
                 "dataset_kwargs": {"data_files": {"validation": str(Path(test_file).resolve())}},
                 "training_split": None, "validation_split": "validation", "test_split": None}
    task = manager._factory.build(manager._entry("boolq"), overrides=overrides, registry=manager._index)
    return manager, {"boolq": task}, {"boolq": "held-out part of BoolQ dev (split by passage title)"}
