"""Massive-activation statistics (paper MA Figs. 1-2 and BOS on/off), rebuilt from results/ma_stats/<model>/*.json.

Tables: ma_locations (every massive activation by channel and token role, all models and BOS settings) and
ma_layers_<model> (layer-wise top-1/2/3 and median |h| per BOS setting). Figures: ma_surface_<model>_<run>_layer<L>
(Fig. 1: |activation| over tokens x channels for the paper's prompt), ma_layers_<model> (Fig. 2: top-1/2/3 and
median per layer) and ma_bos_<model> (top-1/median per layer and each consistent MA channel's value at the BOS /
first token in every layer, BOS prepended vs none).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from outlierlab.figures import plt, save_figure
from outlierlab.reports import register, results, table_of
from outlierlab.tables import Column, Table, write_table

EXP = "ma_stats"
ROLE_STYLE = {"bos": "-", "first": "--", "first_delimiter": ":", "delimiter": "-.", "other": (0, (1, 3))}


def _records(results_dir: Path) -> dict[str, dict[str, dict]]:
    """model -> run_tag -> record."""
    runs: dict[str, dict[str, dict]] = {}
    for _, record in results(results_dir, EXP):
        runs.setdefault(record["model"]["name"], {})[record["run_tag"]] = record
    return runs


def build_tables(results_dir: Path, out_dir: Path) -> list[Path]:
    runs = _records(results_dir)
    if not runs:
        return []
    written, rows = [], []
    for model, by_tag in sorted(runs.items()):
        for tag, record in sorted(by_tag.items()):
            for row in table_of(record).rows:
                rows.append({"model": model, "bos": record["bos"], **row})
    first = next(iter(next(iter(runs.values())).values()))
    columns = [Column("model", "model"), Column("bos", "BOS"), *table_of(first).columns]
    criterion = first["criterion"]
    caption = (f"Massive activations per (channel, token role): |h| > {criterion['min_abs']:g} and "
               f"> {criterion['median_ratio']:g}x the layer's median ({criterion['provenance']}); layer = output of "
               f"layers[i]; value = mean signed value over sequences; share = fraction of sequences where it is "
               f"massive; rel std = std/RMS across sequences (input-agnostic when <= the run's threshold), beside "
               f"the same for the layer's top-10% and median coordinates. Paper (LLaMA2-7B): channels 1415, 2533 at "
               f"the start token and the first '.' or newline from layers[1], about 1e4x the median.")
    written += write_table(Table(columns, rows, caption=caption), Path(out_dir) / "ma_locations")

    for model, by_tag in sorted(runs.items()):
        tags = sorted(by_tag)
        layers = len(by_tag[tags[0]]["layers"])
        layer_rows = []
        for layer in range(layers):
            row = {"layer": layer}
            for tag in tags:
                stats = by_tag[tag]["layers"][layer]
                bos = by_tag[tag]["bos"]
                for key in ("top1", "top2", "top3", "median"):
                    row[f"{key}_bos_{bos}"] = stats[key]
            layer_rows.append(row)
        columns = [Column("layer", "layer")] + [Column(f"{key}_bos_{by_tag[tag]['bos']}", f"{key} (BOS {by_tag[tag]['bos']})")
                                                for tag in tags for key in ("top1", "top2", "top3", "median")]
        sizes = ", ".join(f"BOS {by_tag[t]['bos']}: {by_tag[t]['sequences']} x {by_tag[t]['seqlen']} tokens"
                          for t in tags)
        caption = (f"{model}: mean over sequences of the per-sequence top-1/2/3 and median |h| after layers[i] "
                   f"(paper MA Fig. 2); {sizes}")
        written += write_table(Table(columns, layer_rows, index="layer", caption=caption),
                               Path(out_dir) / f"ma_layers_{model}")
    return written


def _surface(record: dict, layer: int, model: str):
    prompt = record["prompt"]
    values = np.array(prompt["abs_activation"][str(layer)] if str(layer) in prompt["abs_activation"]
                      else prompt["abs_activation"][layer])
    tokens, channels = values.shape
    figure = plt.figure(figsize=(8, 5.5))
    axis = figure.add_subplot(projection="3d")
    x, y = np.meshgrid(np.arange(channels), np.arange(tokens))
    axis.plot_wireframe(x, y, values, rstride=1, cstride=0, color="tab:blue", linewidth=0.8)
    peaks = np.argwhere(values > 0.5 * values.max())
    for token, channel in peaks[:6]:
        axis.text(channel, token, values[token, channel], f" {channel}", color="tab:red", fontsize=8)
    labels = [repr(t)[1:-1] or "''" for t in prompt["tokens"]]
    axis.set_yticks(range(tokens))
    axis.set_yticklabels(labels, fontsize=7)
    axis.set_xlabel("channel")
    axis.set_zlabel("|activation|")
    axis.view_init(elev=25, azim=-60)
    axis.set_title(f"{model}, BOS {record['bos']}: |h| after layers[{layer}]\n\"{prompt['text']}\"", fontsize=10)
    return figure


def _layers(by_tag: dict[str, dict], model: str):
    tags = sorted(by_tag)
    figure, axes = plt.subplots(1, len(tags), figsize=(5.5 * len(tags), 4), squeeze=False, sharey=True)
    for axis, tag in zip(axes[0], tags):
        record = by_tag[tag]
        layers = [row["layer"] for row in record["layers"]]
        for key, color in (("top1", "tab:red"), ("top2", "tab:orange"), ("top3", "tab:olive"),
                           ("median", "tab:blue")):
            axis.plot(layers, [row[key] for row in record["layers"]], marker="o", markersize=3, color=color,
                      label=key)
        axis.set_xlabel("layer (output of layers[i])")
        axis.set_title(f"{model}, BOS {record['bos']} ({record['sequences']} x {record['seqlen']} tokens)",
                       fontsize=10)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean |activation| (per-sequence top-k, median)")
    axes[0][0].legend()
    figure.tight_layout()
    return figure


def _bos(by_tag: dict[str, dict], model: str):
    tags = sorted(by_tag)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, tag in enumerate(tags):
        record = by_tag[tag]
        layers = [row["layer"] for row in record["layers"]]
        color = colors[index % len(colors)]
        axes[0].plot(layers, [row["top1"] for row in record["layers"]], color=color, marker="o", markersize=3,
                     label=f"top-1, BOS {record['bos']}")
        axes[0].plot(layers, [row["median"] for row in record["layers"]], color=color, linestyle=":",
                     label=f"median, BOS {record['bos']}")
        for path in record.get("trajectories", {}).values():
            axes[1].plot(layers, np.abs(path["mean"]), color=color, marker=".", linestyle=ROLE_STYLE.get(path["role"], "-"),
                         label=f"ch {path['channel']} @ {path['role']} (pos {path['position']}), BOS {record['bos']}")
    criterion = by_tag[tags[0]]["criterion"]
    axes[1].axhline(criterion["min_abs"], color="grey", linewidth=0.8, linestyle="--", label="|h| = 100")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean |activation|")
    axes[0].set_title(f"{model}: top-1 and median per layer", fontsize=10)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("|mean over sequences|")
    axes[1].set_title("consistent MA channels at the first token / BOS, every layer", fontsize=10)
    for axis in axes:
        axis.set_xlabel("layer (output of layers[i])")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def build_figures(results_dir: Path, out_dir: Path) -> list[Path]:
    runs = _records(results_dir)
    written = []
    for model, by_tag in sorted(runs.items()):
        for tag, record in sorted(by_tag.items()):
            for layer in record["prompt"]["layers"]:
                written += save_figure(_surface(record, layer, model),
                                       Path(out_dir) / f"ma_surface_{model}_{tag}_layer{layer}")
        written += save_figure(_layers(by_tag, model), Path(out_dir) / f"ma_layers_{model}")
        written += save_figure(_bos(by_tag, model), Path(out_dir) / f"ma_bos_{model}")
    return written


register("ma", tables=build_tables, figures=build_figures)
