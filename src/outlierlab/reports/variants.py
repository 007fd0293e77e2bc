"""Attention-variant study: the variants table (paper QT Table 2 beside ours) and figures, from results/ alone.

    results/variants_table/<size>/table.json  ->  tables/variants_table_<size>.{md,tex}
                                                  figures/variants_layers_<size>.{png,pdf}  (paper MA Fig. 2 style:
                                                  layer-wise top-1/2/3 and median |h| per variant)
    results/pretrain/<size>_<variant>/train.json -> figures/variants_training_<size>.{png,pdf}
                                                  (validation loss and max |h| during training)
"""
from __future__ import annotations

import math
from pathlib import Path

from outlierlab.figures import plt, save_figure
from outlierlab.reports import register, results, table_of
from outlierlab.tables import write_table


def _tables(results_dir: Path) -> list[tuple[str, dict]]:
    return [(result.model, result.record) for result in results(results_dir, "variants_table", "table.json")]


def build_tables(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for size, record in _tables(results_dir):
        written += write_table(table_of(record), out_dir / f"variants_table_{size}")
    return written


def _layers_figure(size: str, record: dict, out_dir: Path) -> list[Path]:
    variants = record["variants"]
    columns = min(3, len(variants))
    rows = math.ceil(len(variants) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False, sharey=True)
    for axis, (name, detail) in zip(axes.flat, variants.items()):
        residual = detail["residual"]
        layers = [entry["layer"] for entry in residual]
        for rank, style in zip(range(3), ("-o", "--s", ":^")):
            axis.plot(layers, [entry["mean_topk"][rank] for entry in residual], style, label=f"top {rank + 1}")
        axis.plot(layers, [entry["mean_median"] for entry in residual], "-x", color="grey", label="median")
        massive = detail["massive"]
        axis.set_title(f"{name}: {massive['kind']}\nval loss {detail['val_loss']:.2f}", fontsize=9)
        axis.set_yscale("log")
        axis.set_xlabel("layer (output of layers[i])")
        axis.set_xticks(layers)
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(variants):]:
        axis.set_visible(False)
    axes[0][0].set_ylabel("|h| (mean over sequences)")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"Layer-wise largest residual activations per variant ({size} preset)", fontsize=11)
    figure.tight_layout()
    return save_figure(figure, out_dir / f"variants_layers_{size}")


def _training_figure(size: str, results_dir: Path, out_dir: Path) -> list[Path]:
    runs = {}
    for result in results(results_dir, "pretrain", "train.json"):
        record = result.record
        if result.model.startswith(f"{size}_") and record.get("model", {}).get("size") == size:
            runs[record["model"]["variant"]] = [e for e in record["history"] if "val_loss" in e]
    if not runs:
        return []
    figure, (loss_axis, peak_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for variant, evaluations in runs.items():
        steps = [e["step"] for e in evaluations]
        loss_axis.plot(steps, [e["val_loss"] for e in evaluations], "-o", markersize=3, label=variant)
        peak_axis.plot(steps, [e["peak"]["abs"] for e in evaluations], "-o", markersize=3, label=variant)
    loss_axis.set(xlabel="step", ylabel="validation loss", title="Validation loss")
    peak_axis.set(xlabel="step", ylabel="max |h| over layers", title="Largest residual activation", yscale="log")
    for axis in (loss_axis, peak_axis):
        axis.grid(alpha=0.3)
    peak_axis.legend(fontsize=8)
    figure.suptitle(f"Pretraining, {size} preset", fontsize=11)
    figure.tight_layout()
    return save_figure(figure, out_dir / f"variants_training_{size}")


def build_figures(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    sizes = set()
    for size, record in _tables(results_dir):
        written += _layers_figure(size, record, out_dir)
        sizes.add(size)
    for _, record in results(results_dir, "pretrain", "train.json"):
        sizes.add(record.get("model", {}).get("size"))
    for size in sorted(s for s in sizes if s):
        written += _training_figure(size, results_dir, out_dir)
    return written


register("variants", tables=build_tables, figures=build_figures)
