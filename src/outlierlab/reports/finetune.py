"""Outlier-guided fine-tuning (issue 17): one table and one figure per (model, task) from results/finetune alone.

    results/finetune/<model>/<task>_<method>.json -> tables/finetune_<model>_<task>   (one row per method)
                                                  -> figures/finetune_<model>_<task> (metric, W8A8, survival, loss)
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from outlierlab.figures import plt, save_figure
from outlierlab.reports import register, table_of
from outlierlab.results import read_result
from outlierlab.tables import Column, Table, write_table

ORDER = ("full", "lora", "norm_only", "lisa", "owl_lisa", "outlier_guided", "outlier_protected")


def _groups(results_dir: Path) -> dict[str, list[dict]]:
    """"<model>_<task>" -> records, methods in ORDER (then any other, by name)."""
    groups = defaultdict(list)
    for path in sorted(Path(results_dir).glob("finetune/*/*.json")):
        record = read_result(path)
        groups[f"{path.parent.name}_{record['finetune']['task']['name']}"].append(record)
    def rank(record):
        name = record["finetune"]["method"]["name"]
        return (ORDER.index(name) if name in ORDER else len(ORDER), name)
    return {key: sorted(records, key=rank) for key, records in sorted(groups.items())}


def tables(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for stem, records in _groups(results_dir).items():
        stored = [table_of(record) for record in records]
        rows = [{**table.rows[0], "wall_s": record["wall_time_s"]} for table, record in zip(stored, records)]
        columns = list({c.key: c for table in stored for c in [*table.columns, Column("wall_s", "wall s")]}.values())
        first = records[0]
        settings, task = first["finetune"]["settings"], first["finetune"]["task"]
        caption = (f"Fine-tuning {first['model']['name']} ({first['model'].get('kind')} weights), task {task['name']}: "
                   f"{settings['steps']} steps x {settings['batch_size']} x <= {task['seqlen']} tokens, AdamW "
                   f"(warm-up {settings['warmup_steps']} + cosine), the same batches for every method; PPL = "
                   f"WikiText-2 ({first['eval']}), W8A8 = {first['config']['exp']['w8a8']}. "
                   f"Learning rate per method: "
                   + ", ".join(f"{r['finetune']['method']['name']} {r['finetune']['method']['lr']}" for r in records)
                   + ". trainable = elements trained over the run (LISA: union of sampled blocks), at once = in one "
                     "step; SW kept = super weights still detected afterwards; MA kept = the massive activation "
                     "still massive in the same channel; outliers kept = before's outliers still found after.")
        written += write_table(Table(columns, rows, index="method", caption=caption), Path(out_dir) / f"finetune_{stem}")
    return written


def _metric(record: dict) -> tuple[str, float | None, float | None]:
    row = table_of(record).rows[0]
    if "acc" in row:
        return "held-out BoolQ acc (%)", row.get("acc_before"), row.get("acc")
    return "WikiText-2 PPL", row.get("ppl_before"), row.get("ppl")


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else float("nan")


def figures(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for stem, records in _groups(results_dir).items():
        names = [r["finetune"]["method"]["name"] for r in records]
        label, before, _ = _metric(records[0])
        figure, axes = plt.subplots(1, 4, figsize=(17, 4))
        x = range(len(records))
        # 1. task metric vs trainable parameters
        axis = axes[0]
        for record, name in zip(records, names):
            _, _, after = _metric(record)
            axis.scatter(record["finetune"]["trainable"]["total"], _finite(after), s=30)
            axis.annotate(name, (record["finetune"]["trainable"]["total"], _finite(after)), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
        if before is not None:
            axis.axhline(before, color="grey", linestyle=":", label="before fine-tuning")
            axis.legend(fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel("trainable elements (log)")
        axis.set_ylabel(label)
        axis.set_title("task metric after fine-tuning", fontsize=9)
        axis.grid(alpha=0.3, which="both")
        # 2. W8A8 PPL after, vs before
        axis = axes[1]
        axis.bar(x, [_finite(table_of(r).rows[0]["w8a8"]) for r in records], color="tab:orange")
        axis.axhline(_finite(table_of(records[0]).rows[0]["w8a8_before"]), color="grey", linestyle=":",
                     label="before fine-tuning")
        axis.set_yscale("log")
        axis.set_xticks(list(x), names, rotation=40, ha="right", fontsize=7)
        axis.set_ylabel("W8A8 PPL (WikiText-2, log)")
        axis.set_title("simulated W8A8 after fine-tuning", fontsize=9)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3, which="both", axis="y")
        # 3. survival: super weight value and MA magnitude, relative to before
        axis = axes[2]
        sw_ratio, ma_ratio = [], []
        for record in records:
            kept = record["survival"]
            weights = list(kept["super_weights"].values())
            sw_ratio.append(sum(w["value_after"] / w["value_before"] for w in weights) / len(weights)
                            if weights else float("nan"))
            ma_ratio.append(abs(kept["ma_after"]) / abs(kept["ma_before"]) if kept["ma_before"] else float("nan"))
        width = 0.38
        axis.bar([i - width / 2 for i in x], sw_ratio, width, label="super weight value (mean ratio)")
        axis.bar([i + width / 2 for i in x], ma_ratio, width, label="|massive activation| (ratio)")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(list(x), names, rotation=40, ha="right", fontsize=7)
        axis.set_ylabel("after / before")
        axis.set_title("do the outliers survive?", fontsize=9)
        axis.legend(fontsize=7)
        values = [v for v in sw_ratio + ma_ratio if math.isfinite(v)]
        if values:
            spread = max(abs(v - 1) for v in values)
            axis.set_ylim(1 - 1.5 * spread - 1e-4, 1 + 1.5 * spread + 1e-4)
        # 4. training loss
        axis = axes[3]
        for record, name in zip(records, names):
            history = record["history"]
            axis.plot([h["step"] for h in history], [h["loss"] for h in history], label=name, linewidth=1)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_title("training loss (same batches for every method)", fontsize=9)
        axis.legend(fontsize=6)
        axis.grid(alpha=0.3)
        first = records[0]
        figure.suptitle(f"Fine-tuning {first['model']['name']}, task {first['finetune']['task']['name']}: "
                        f"{first['finetune']['settings']['steps']} steps x {first['finetune']['settings']['batch_size']}"
                        f" x <= {first['finetune']['task']['seqlen']} tokens", fontsize=10)
        figure.tight_layout()
        written += save_figure(figure, Path(out_dir) / f"finetune_{stem}")
    return written


register("finetune", tables=tables, figures=figures)
