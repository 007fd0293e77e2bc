"""+exp=finetune end to end: measure -> select -> train -> merge/save -> measure again -> one table row.

The "before" measurements (atlas, PPL, W8A8 PPL, held-out accuracy) depend only on the weights and the config, not on
the method, so they are cached under paths.cache_dir/finetune/ keyed by the weights' sha256 and every setting they
read (exp.cache_before=false recomputes them).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from outlierlab.evals.zeroshot import evaluate_zeroshot
from outlierlab.finetune import tasks
from outlierlab.finetune.atlas import Atlas, measure, super_weight_values, survival
from outlierlab.finetune.loop import finetune
from outlierlab.finetune.methods import METHODS, SAMPLED, merge_into, select
from outlierlab.models.coords import SuperWeight
from outlierlab.models.hashing import weights_sha256
from outlierlab.results import to_jsonable
from outlierlab.tables import Table, columns
from outlierlab.train.modeling import resume_training

METADATA_FILE = "outlierlab.json"  # as train.modeling: model=trained reads the BOS policy from it


def check(cfg, data_dir: str | None) -> None:
    """Pre-flight: method, task, data file, positive integers."""
    method = cfg.finetune.method
    if method.kind not in METHODS:
        raise ValueError(f"finetune.method.kind={method.kind} is not one of: {', '.join(METHODS)}")
    if method.kind == "outlier_protected" and method.base not in ("full", "lora"):
        raise ValueError(f"finetune.method.base={method.base} is not one of: full, lora")
    if method.kind == "outlier_guided" and method.budget not in ("lora", None):
        raise ValueError(f"finetune.method.budget={method.budget} is not one of: lora, null")
    for key in ("steps", "batch_size", "checkpoint_every"):
        value = cfg.finetune[key]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"finetune.{key}={value} must be a positive integer")
    if not isinstance(cfg.finetune.task.seqlen, int) or cfg.finetune.task.seqlen < 2:
        raise ValueError(f"finetune.task.seqlen={cfg.finetune.task.seqlen} must be an integer >= 2")
    if method.kind in SAMPLED and (method.layers < 1 or method.period < 1):
        raise ValueError(f"finetune.method.layers={method.layers} and .period={method.period} must be >= 1")
    if method.kind == "owlore" and (method.galore.rank < 1 or method.galore.update_gap < 1):
        raise ValueError(f"finetune.method.galore.rank={method.galore.rank} and .update_gap="
                         f"{method.galore.update_gap} must be >= 1")
    tasks.check(cfg.finetune.task, data_dir)


def _atlas(data: dict) -> Atlas:
    return Atlas(super_weights=[SuperWeight.parse(w) for w in data["super_weights"]],
                 super_weight_values=data["super_weight_values"], ma=data["massive_activation"],
                 ma_channels=data["ma_channels"], ma_layers=data["ma_layers"],
                 gamma_outliers=data["gamma_outliers"], channel_outliers=data["channel_outliers"],
                 layer_outlier_ratio=data["layer_outlier_ratio"], detection=data["detection"])


# the table row's columns: key -> label
ROW_LABELS = {"method": "method", "trainable": "trainable", "trainable_at_once": "trainable at once",
              "acc_before": "acc before", "acc": "acc", "ppl_before": "PPL before", "ppl": "PPL",
              "w8a8_before": "W8A8 before", "w8a8": "W8A8", "sw_kept": "SW kept", "ma_kept": "MA kept",
              "ma_after": "MA after", "gamma_outliers_kept": "gamma outliers kept",
              "channel_outliers_kept": "channel outliers kept", "train_s": "train s"}


class Study:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.loaded = ctx.loaded
        task = self.cfg.finetune.task
        seed = int(self.cfg.exp.seed)
        data_dir = Path(ctx.plan.data_dir)
        self.test_file, self.split = None, None
        if task.kind == "cpt":
            stream, self.data_meta = tasks.wikipedia_stream(data_dir / task.path, task.max_chars, self.loaded.tokenizer)
            prefix = self.loaded.tokenizer.bos_token_id if self.loaded.bos == "prepend" else None
            self.batches = tasks.PretrainingBatches(stream, self.cfg.finetune.batch_size, task.seqlen, seed, prefix)
        else:
            train, test, self.data_meta = tasks.boolq_split(data_dir / tasks.BOOLQ_FILE, task.test_fraction,
                                                            task.split_seed)
            self.test_file = tasks.write_rows(test, data_dir, self.cfg.paths.cache_dir)
            self.batches = tasks.BoolQBatches(train, self.loaded, self.cfg.finetune.batch_size, task.seqlen, seed)
        self.windows = self.batches.windows(self.cfg.exp.atlas.windows)

    # ------------------------------------------------------------------------------------------ measurements
    def registry_ma(self):
        entries = self.cfg.model.get("massive_activations")
        return OmegaConf.to_container(entries) if entries else []

    def atlas(self) -> Atlas:
        return measure(self.loaded, self.cfg.exp.atlas, self.windows, self.ctx.registry_super_weights,
                       self.registry_ma(), self.cfg.exp.super_weights)

    def task_accuracy(self, label: str) -> dict | None:
        if self.test_file is None:
            return None
        task = self.cfg.finetune.task
        suite = OmegaConf.create({"limit": task.eval_limit, "batch_size": task.eval_batch_size})
        return evaluate_zeroshot(self.loaded, suite, tasks.boolq_heldout_tasks(self.test_file), label=label)

    def scores(self, label: str) -> dict:
        return {"ppl": self.ctx.perplexities(label=label),
                "w8a8_ppl": self.ctx.evaluate(list(self.cfg.exp.w8a8), {}, label=f"{label} W8A8")["ppl"],
                "task": self.task_accuracy(label)}

    def before(self) -> dict:
        cfg = self.cfg
        exp = {k: OmegaConf.to_container(cfg.exp[k], resolve=True) if OmegaConf.is_config(cfg.exp[k]) else cfg.exp[k]
               for k in ("atlas", "interventions", "w8a8", "super_weights")}
        settings = {"weights": weights_sha256(self.loaded.model), "bos": self.loaded.bos, "exp": exp,
                    "eval": OmegaConf.to_container(cfg.eval, resolve=True),
                    "task": OmegaConf.to_container(cfg.finetune.task, resolve=True), "data": self.data_meta,
                    "windows": hashlib.sha256(self.windows.numpy().tobytes()).hexdigest(),
                    "registry": [str(w) for w in self.ctx.registry_super_weights], "version": 1}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = Path(cfg.paths.cache_dir).expanduser() / "finetune" / f"before-{key}.json"
        if cfg.exp.cache_before and path.is_file():
            return {**json.loads(path.read_text()), "cached": str(path)}
        measured = {"atlas": self.atlas().as_dict(), **self.scores("before")}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_jsonable(measured)))
        return {**measured, "cached": None}

    # ------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        cfg, loaded = self.cfg, self.loaded
        method, task = cfg.finetune.method, cfg.finetune.task
        before = self.before()
        atlas_before = _atlas(before["atlas"])
        selection = select(method, loaded, atlas_before, cfg.finetune.lora, int(cfg.exp.seed), cfg.finetune.steps)
        claimed = selection.claimed()
        output = Path(cfg.exp.output_dir)
        started = time.time()
        resume = resume_training(output, cfg.exp.resume, cfg.get("overwrite", False))
        training = finetune(selection, self.batches, cfg.finetune, output / "checkpoint", resume=resume,
                            desc=f"finetune {method.name} on {task.name}")
        train_seconds = time.time() - started
        if selection.peft:
            selection.model.save_pretrained(output / "adapter")
        merged = merge_into(selection, loaded)
        metadata = {"bos": loaded.bos, "method": method.name, "task": task.name, "base_model": loaded.info,
                    "steps": training["steps"], "seed": int(cfg.exp.seed)}
        loaded.model.save_pretrained(output)
        loaded.tokenizer.save_pretrained(output)
        (output / METADATA_FILE).write_text(json.dumps(to_jsonable(metadata), indent=1) + "\n")

        atlas_after = self.atlas().as_dict()
        after = {"atlas": atlas_after, **self.scores("after")}
        kept = survival(before["atlas"], atlas_after)
        values = super_weight_values(loaded, atlas_before.super_weights)
        for name, entry in kept["super_weights"].items():
            entry["value_after"] = values[name]
        row = self.row(method.name, claimed, selection, before, after, kept, train_seconds)
        tokens = cfg.finetune.steps * cfg.finetune.batch_size * task.seqlen
        caption = (f"{cfg.model.name}, task {task.name}: {cfg.finetune.steps} steps x {cfg.finetune.batch_size} "
                   f"{'windows' if task.kind == 'cpt' else 'examples'} of <= {task.seqlen} tokens (<= {tokens} "
                   f"tokens), AdamW lr {cfg.finetune.lr}; PPL = {cfg.eval.name}; W8A8 = {list(cfg.exp.w8a8)}")
        return {
            "finetune": {"method": OmegaConf.to_container(method), "task": OmegaConf.to_container(task),
                         "seed": int(cfg.exp.seed),  # batches, LoRA init, LISA's schedule: the report's seed axis
                         "settings": {k: v for k, v in OmegaConf.to_container(cfg.finetune, resolve=True).items()
                                      if k not in ("method", "task")},
                         "data": self.data_meta, "test_file": str(self.test_file) if self.test_file else None,
                         "trainable": {"total": sum(claimed.values()), "at_once": selection.trainable_at_once(),
                                       "tensors": len(claimed), "names": claimed},
                         "selection": {k: v for k, v in selection.notes.items()},
                         "merge": merged, "checkpoint": str(output)},
            "training": {k: v for k, v in training.items() if k != "history"},
            "history": training["history"],
            "before": before, "after": after, "survival": kept,
            "table": Table(columns(*((key, ROW_LABELS[key]) for key in row)), [row], index="method",
                           caption=caption).to_dict(),
        }

    @staticmethod
    def row(name, claimed, selection, before, after, kept, train_seconds) -> dict:
        key = next(iter(after["ppl"]), None)
        row = {"method": name, "trainable": sum(claimed.values()), "trainable_at_once": selection.trainable_at_once()}
        if after["task"]:
            row["acc_before"] = 100 * before["task"]["tasks"]["boolq"]["acc"]
            row["acc"] = 100 * after["task"]["tasks"]["boolq"]["acc"]
        if key:
            row["ppl_before"] = before["ppl"][key]["ppl"]
            row["ppl"] = after["ppl"][key]["ppl"]
            row["w8a8_before"] = before["w8a8_ppl"][key]["ppl"]
            row["w8a8"] = after["w8a8_ppl"][key]["ppl"]
        row.update({"sw_kept": f"{kept['sw_kept']}/{kept['sw_total']}", "ma_kept": ("yes" if kept["ma_kept"] else "no") if kept["ma_before"] is not None else "none before",
                    "ma_after": kept["ma_after"], "gamma_outliers_kept": f"{kept['gamma_kept']}/{kept['gamma_total']}",
                    "channel_outliers_kept": f"{kept['channel_kept']}/{kept['channel_total']}",
                    "train_s": round(train_seconds, 1)})
        return row
