"""Paper MA Table 3 (set massive activations to zero / mean) and the attention-sink figures, from results/ alone.

Reads results/ma_intervene/<model>/<tag>.json and results/ma_attention/<model>/<tag>.json; writes
    tables/ma_table3_<model>_<tag>.md|tex        our rows, with paper MA Table 3 (LLaMA2-7B) beside them
    tables/ma_attention_<model>_<tag>.md|tex     head/layer-averaged sink statistics per variant
    figures/ma_attention_sinks_<model>_<tag>     sink share per layer x head (original) and per layer per variant
    figures/ma_attention_logits_<model>_<tag>    logits toward sink keys vs other keys per layer
    figures/ma_attention_decomposition_<model>_<tag>   sink part vs rest of each head's output: variance and norm
    figures/ma_intervene_trace_<model>_<tag>     the MA's value at every layer under each intervention
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from outlierlab.figures import plt, save_figure
from outlierlab.reports import register, results, table_of
from outlierlab.tables import write_table


def build_tables(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for path, record in results(results_dir, "ma_intervene"):
        model, tag = path.parent.name, path.stem
        table = table_of(record)
        reference = table.reference
        if reference and not record.get("reference"):  # another model's numbers, after ours
            table = table.with_caption(f"{table.caption}; paper {reference.model}: {reference.source} (another "
                                       f"model, for the pattern, not the values)")
        written += write_table(table, Path(out_dir) / f"ma_table3_{model}_{tag}")
    for path, record in results(results_dir, "ma_attention"):
        written += write_table(table_of(record), Path(out_dir) / f"ma_attention_{path.parent.name}_{path.stem}")
    return written


def _per_layer(layers: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(layer indices, [layers, heads] array) of a per-head statistic, skipping layers without queries."""
    kept = [row for row in layers if row.get("queries")]
    return np.array([row["layer"] for row in kept]), np.array([row[key] for row in kept], dtype=float)


def _mark_first_layer(axis, first_layer: int) -> None:
    axis.axvline(first_layer, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel(f"layer (dotted line: first MA layer, {first_layer})")


def _sinks_figure(record: dict, title: str):
    first = record["first_ma_layer"]
    layer_ids, share = _per_layer(record["variants"]["original"]["layers"], "sink_share")
    figure, (heat, lines) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    image = heat.imshow(share, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                        extent=(-0.5, share.shape[1] - 0.5, layer_ids[0] - 0.5, layer_ids[-1] + 0.5))
    heat.set_xlabel("head")
    heat.set_ylabel("layer")
    heat.set_title("original: attention share on MA tokens")
    heat.axhline(first - 0.5, color="white", linestyle=":", linewidth=1)
    figure.colorbar(image, ax=heat, label="share of attention probability")
    for variant, detail in record["variants"].items():
        ids, values = _per_layer(detail["layers"], "sink_share")
        lines.plot(ids, values.mean(axis=1), marker="o", markersize=3, label=variant)
    _mark_first_layer(lines, first)
    lines.set_ylim(0, 1.02)
    lines.set_ylabel("mean over heads")
    lines.set_title("attention share on MA tokens, per variant")
    lines.legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def _logits_figure(record: dict, title: str):
    first = record["first_ma_layer"]
    layers = record["variants"]["original"]["layers"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, color in (("logit_sink", "toward MA keys", "C3"), ("logit_other", "toward other keys", "C0")):
        ids, values = _per_layer(layers, key)
        left.plot(ids, values.mean(axis=1), color=color, marker="o", markersize=3, label=f"{label} (mean over heads)")
        left.fill_between(ids, values.min(axis=1), values.max(axis=1), color=color, alpha=0.15,
                          label=f"{label} (head range)")
    left.axhline(0, color="black", linewidth=0.6)
    _mark_first_layer(left, first)
    left.set_ylabel("mean pre-softmax logit q.k/sqrt(d)")
    left.set_title("original: attention logits")
    left.legend(fontsize=7)
    for key, label, color in (("positive_sink", "logits > 0 toward MA keys", "C3"),
                              ("positive_other", "logits > 0 toward other keys", "C0"),
                              ("sink_argmax", "queries whose largest logit is an MA key", "C2")):
        ids, values = _per_layer(layers, key)
        right.plot(ids, values.mean(axis=1), color=color, marker="o", markersize=3, label=label)
    _mark_first_layer(right, first)
    right.set_ylim(-0.02, 1.02)
    right.set_ylabel("fraction (mean over heads)")
    right.set_title("original: sign and argmax of the logits")
    right.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def _decomposition_figure(record: dict, title: str):
    first = record["first_ma_layer"]
    layers = [row for row in record["variants"]["original"]["layers"] if row.get("queries")]
    ids = np.array([row["layer"] for row in layers])
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    for key, label, color in (("sink", "part from MA tokens", "C3"), ("rest", "part from the other tokens", "C0")):
        left.plot(ids, [row[f"{key}_relvar_layer"] for row in layers], color=color, marker="o", markersize=3,
                  label=f"{label}: the vector")
        if all(f"{key}_dirvar" in row for row in layers):
            left.plot(ids, [np.mean(row[f"{key}_dirvar"]) for row in layers], color=color, linestyle="--",
                      label=f"{label}: its direction only")
        norms = np.array([row[f"{key}_norm"] for row in layers], dtype=float)
        right.plot(ids, norms.mean(axis=1), color=color, marker="o", markersize=3, label=label)
    left.set_yscale("log")
    _mark_first_layer(left, first)
    left.set_ylabel("relative variance E||x - E x||^2 / E||x||^2")
    left.set_title("original: variation across queries and sequences")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    _mark_first_layer(right, first)
    right.set_ylabel("mean ||x|| (mean over heads)")
    right.set_title("original: size of each part of a head's output")
    right.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def _trace_figure(record: dict, title: str):
    figure, axis = plt.subplots(figsize=(10, 4.5))
    styles = {"every_layer": "--"}
    for variant, detail in record["variants"].items():
        traced = detail.get("ma_trace")
        if not traced:
            continue
        # per layer: the largest |mean value| over the MA coordinates
        per_layer = np.abs(np.array([[v for location in traced["mean"] for row in location[layer] for v in row]
                                     for layer in range(len(traced["median_abs"]))])).max(axis=1)
        style = next((s for key, s in styles.items() if key in variant), "-")
        axis.plot(range(len(per_layer)), per_layer, linestyle=style, marker="o", markersize=3, label=variant)
    original = record["variants"].get("original", {}).get("ma_trace")
    if original:
        axis.plot(range(len(original["median_abs"])), original["median_abs"], color="black", linestyle=":",
                  label="median |h| (original)")
    axis.set_yscale("symlog", linthresh=1.0)
    axis.set_xlabel("layer (output of the decoder block)")
    axis.set_ylabel("|mean MA value| (symlog)")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return figure


def build_figures(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for path, record in results(results_dir, "ma_intervene"):
        if any(detail.get("ma_trace") for detail in record.get("variants", {}).values()):
            model, tag = path.parent.name, path.stem
            used = "; ".join(f"channels {m['channels']} at positions {m['positions']}, first layer {m['first_layer']}"
                             for m in record["massive_activations"]["used"])
            single = sorted({layer for detail in record["variants"].values() for edit in detail.get("edits") or []
                             if edit.get("where") != "all" for layer in edit.get("layers", [])})
            title = (f"{model}: the massive activation ({used}) per layer under each intervention\n"
                     f"single-layer edits at layer {', '.join(map(str, single))}, *_every_layer from layer "
                     f"{min(m['first_layer'] for m in record['massive_activations']['used'])} on")
            written += save_figure(_trace_figure(record, title), Path(out_dir) / f"ma_intervene_trace_{model}_{tag}")
    for path, record in results(results_dir, "ma_attention"):
        if "original" not in record.get("variants", {}):
            continue
        model, tag = path.parent.name, path.stem
        data = record["attention_data"]
        title = (f"{model}: MA tokens at positions {record['sink_positions']}, {data['windows']} x {data['seqlen']} "
                 f"tokens of {data['dataset']} {data['split']}")
        for name, build in (("sinks", _sinks_figure), ("logits", _logits_figure),
                            ("decomposition", _decomposition_figure)):
            written += save_figure(build(record, title), Path(out_dir) / f"ma_attention_{name}_{model}_{tag}")
    return written


register("ma_intervention", tables=build_tables, figures=build_figures)
