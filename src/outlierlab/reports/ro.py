"""Paper RO (Zhang, Raman, Sharma 2025): tables and figures from results/ alone.

Reads results/ro_locate|ro_gamma|ro_smooth/<model>/<tag>.json; writes
    tables/ro_locate_<model>_<tag>.md|tex    the block points of each MA's birth layer (where it is born)
    tables/ro_gamma_<model>_<tag>.md|tex     channel outliers, PPL, zero-shot and W8A8 PPL per gamma reset
    tables/ro_smooth_<model>_<tag>.md|tex    PPL when the MA is smoothed at birth vs on the skip path
    figures/ro_locate_<model>_<tag>          max |x| per (layer, block point), MA sites marked; the MA channel
                                             through every point of the residual's width
    figures/ro_gamma_<model>_<tag>           outlier channels per layer per variant; the norms' gains per layer
    figures/ro_smooth_<model>_<tag>          PPL per variant; the MA at every block output per variant
    tables/ro_encoder_<model>_<tag>.md|tex   the encoder case (BERT Busters): embedding fidelity per LayerNorm reset
    figures/ro_encoder_<model>_<tag>         LayerNorm gain z-scores per channel and layer, outlier dims marked;
                                             1 - cosine of the sentence embeddings per reset vs random channels
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from outlierlab.figures import plt, save_figure
from outlierlab.probes.channel_outliers import decode_channels
from outlierlab.reports import register, table_of
from outlierlab.results import read_result
from outlierlab.tables import write_table

EXPS = ("ro_locate", "ro_gamma", "ro_smooth", "ro_encoder")


def _records(results_dir: Path, exp: str):
    for path in sorted((Path(results_dir) / exp).glob("*/*.json")):
        yield path.parent.name, path.stem, read_result(path)


def build_tables(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for exp in EXPS:
        for model, tag, record in _records(results_dir, exp):
            written += write_table(table_of(record), Path(out_dir) / f"{exp}_{model}_{tag}")
    return written


def _locate_figure(record: dict, model: str):
    points = record["points"]
    kinds = list(dict.fromkeys(row["kind"] for row in points))
    layers = sorted({row["layer"] for row in points})
    grid = np.full((len(layers), len(kinds)), np.nan)
    share = record["criterion"]["min_share"]
    figure, (heat, trace) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.1, 1]})
    for row in points:
        grid[layers.index(row["layer"]), kinds.index(row["kind"])] = np.log10(max(row["mean_peak"], 1e-6))
    image = heat.imshow(grid, aspect="auto", origin="lower", cmap="magma")
    figure.colorbar(image, ax=heat, label="log10 mean over sequences of max |x|")
    hits = [(kinds.index(r["kind"]), layers.index(r["layer"])) for r in points if r["hit_share"] >= share]
    if hits:
        heat.scatter(*zip(*hits), marker="o", s=14, facecolors="none", edgecolors="cyan",
                     label=f"massive in >= {share:.0%} of sequences")
    for entry in record["birth"]["channels"]:
        if entry["born_at"]:
            born = next(r for r in points if r["point"] == entry["born_at"])
            heat.scatter([kinds.index(born["kind"])], [layers.index(born["layer"])], marker="*", s=160,
                         color="lime", edgecolors="black", label=f"ch {entry['channel']} born")
    labels = []
    for kind in kinds:
        label = next((r["label"] for r in points if r["kind"] == kind and r["label"]), None)
        labels.append(f"{kind} ({label})" if label else kind)
    heat.set_xticks(range(len(kinds)), labels, rotation=60, ha="right", fontsize=7)
    heat.yaxis.set_major_locator(MaxNLocator(integer=True))
    heat.set_yticks(heat.get_yticks()[(heat.get_yticks() >= 0) & (heat.get_yticks() < len(layers))])
    heat.set_yticklabels([str(layers[int(t)]) for t in heat.get_yticks()])
    heat.set_ylabel("layer")
    heat.set_title("max |x| at every block point (forward order, left to right)", fontsize=9)
    if hits or record["birth"]["channels"]:
        heat.legend(fontsize=7, loc="upper left")
    styles = {"out": "-", "mlp.out": "--", "attn.out": ":", "mlp.in": "-."}
    for number, (channel, values) in enumerate(record["traces"].items()):
        by_kind: dict[str, list] = {}
        for point, value in values:
            layer, kind = point.split(".", 2)[1:]
            by_kind.setdefault(kind, []).append((int(layer), max(value, 1e-6)))
        for kind, style in styles.items():
            if kind in by_kind:
                xs, ys = zip(*by_kind[kind])
                trace.plot(xs, ys, linestyle=style, color=f"C{number}", marker="." if kind == "out" else None,
                           label=f"ch {channel} at {kind}")
    if not record["traces"]:  # no MA: say so, with the largest block output, instead of an empty panel
        outs = [r for r in points if r["kind"] == "out"]
        top = max(outs, key=lambda r: r["peak"]["abs"], default=None)
        note = "no residual channel meets the MA criterion"
        if top:
            note += (f"\nlargest block output: |x| = {top['peak']['abs']:.4g} (channel {top['peak']['channel']}, "
                     f"layer {top['layer']}),\n{top['mean_peak'] / max(top['mean_median'], 1e-12):.3g} x its median "
                     f"(criterion: > {record['criterion']['min_abs']:g} and > {record['criterion']['median_ratio']:g} x)")
        trace.text(0.5, 0.88, note, transform=trace.transAxes, ha="center", va="top", fontsize=9)
        if outs:
            trace.plot([r["layer"] for r in outs], [max(r["mean_peak"], 1e-6) for r in outs], color="grey",
                       marker=".", label="largest |x| at each block output (any channel)")
    trace.xaxis.set_major_locator(MaxNLocator(integer=True))
    trace.axhline(record["criterion"]["min_abs"], color="grey", linestyle=":", linewidth=1,
                  label=f"|x| = {record['criterion']['min_abs']:g}")
    trace.set_yscale("log")
    trace.set_xlabel("layer")
    trace.set_ylabel("max |x| of the MA channel")
    trace.set_title("each residual MA channel through the network", fontsize=9)
    trace.legend(fontsize=7)
    data = record["probe_data"]
    figure.suptitle(f"{model}: where the massive activations are born ({data['windows']} x {data['seqlen']} tokens "
                    f"of {data['dataset']} {data['split']})", fontsize=10)
    figure.tight_layout()
    return figure


def _outliers_per_layer(summary: dict, which: str = "absolute") -> tuple[list[int], list[int]]:
    """Per layer: the number of distinct outlier channels over the points of the residual's width."""
    widths = {}
    for point, row in summary.items():
        if ".norm" in point:
            widths[row["channels"]] = widths.get(row["channels"], 0) + 1
    hidden = max(widths, key=widths.get)
    per_layer: dict[int, set] = {}
    for point, row in summary.items():
        if point.startswith("layers.") and row["channels"] == hidden:
            per_layer.setdefault(int(point.split(".")[1]), set()).update(decode_channels(row[which]["channels"]))
    layers = sorted(per_layer)
    return layers, [len(per_layer[layer]) for layer in layers]


def _gamma_figure(record: dict, model: str):
    figure, (absolute, relative, gains) = plt.subplots(1, 3, figsize=(17, 4.6))
    criterion = record["criterion"]
    for axis, which, title in (
            (absolute, "absolute", (f"LLM.int8 rule: >= {criterion['position_share']:.0%} of positions with |x| >= "
                                    f"{criterion['min_abs']:g}")),
            (relative, "relative", (f"relative rule: >= {criterion['position_share']:.0%} of positions with |x| >= "
                                    f"{criterion['median_ratio']:g} x token median"))):
        for variant, detail in record["variants"].items():
            channels = detail.get("channels")
            if not channels:
                continue
            layers, counts = _outliers_per_layer(channels["summary"], which)
            style = "--" if variant.startswith("random") else "-"
            axis.plot(layers, counts, linestyle=style, marker="o", markersize=3, label=variant)
        axis.set_xlabel("layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("outlier channels (union over residual-width sites)")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7)
    offset = record["gamma_outliers"]["gain_offset"]
    for number, (role, found) in enumerate(record["gamma_outliers"]["roles"].items()):
        layers = sorted(int(k) for k in found["per_layer"])
        entries = [found["per_layer"][str(k)] for k in layers]
        color = f"C{number}"
        gains.plot(layers, [e["gain_max"] for e in entries], color=color, marker="o", markersize=3,
                   label=f"{role}: max |gain|")
        gains.plot(layers, [e["gain_mean"] for e in entries], color=color, linestyle=":", label=f"{role}: mean gain")
    gains.axhline(1.0, color="black", linewidth=0.6)
    gains.set_yscale("log")
    gains.set_xlabel("layer")
    gains.xaxis.set_major_locator(MaxNLocator(integer=True))
    gains.set_ylabel(f"gain = {offset:g} + w")
    gains.set_title("the norms' gains (reset to 1 means the black line)", fontsize=9)
    gains.legend(fontsize=7, ncol=2)
    figure.suptitle(f"{model}: paper RO, channel-wise outliers per layer under each gamma reset", fontsize=10)
    figure.tight_layout()
    return figure


def _smooth_figure(record: dict, model: str):
    figure, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.6))
    table = table_of(record)
    rows = [row for row in table.rows if "note" not in row]
    protocols = [c.key for c in table.columns if c.key in ("wikitext2", "c4") and not c.reference]
    x = np.arange(len(rows))
    for number, key in enumerate(protocols):
        values = [row.get(key) if isinstance(row.get(key), (int, float)) else np.nan for row in rows]
        bars.bar(x + 0.4 * number, values, width=0.4, label=key)
    bars.set_xticks(x + 0.2 * (len(protocols) - 1), [row["variant"] for row in rows], rotation=30, ha="right",
                    fontsize=8)
    bars.set_yscale("log")
    bars.set_ylabel("PPL (log)")
    bars.set_title("PPL when the MA is smoothed", fontsize=9)
    bars.legend(fontsize=8)
    for variant, detail in record["variants"].items():
        trace = detail.get("ma_trace")
        if not trace:
            continue
        per_layer = [max(abs(v) for location in trace["mean"] for r in location[layer] for v in r)
                     for layer in range(len(trace["median_abs"]))]
        lines.plot(range(len(per_layer)), per_layer, marker="o", markersize=3, label=variant,
                   linestyle="--" if "skip" in variant else "-")
    lines.set_yscale("symlog", linthresh=1.0)
    lines.set_xlabel("layer (block output)")
    lines.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not any(detail.get("ma_trace") for detail in record["variants"].values()):
        lines.text(0.5, 0.5, "no massive activation detected: nothing to smooth", transform=lines.transAxes,
                   ha="center", va="center", fontsize=9)
    else:
        lines.legend(fontsize=7)
    lines.set_ylabel("largest |mean MA value| (symlog)")
    lines.set_title("the MA at every block output, edit in place", fontsize=9)
    used = "; ".join(f"layer {m['first_layer']}, ch {m['channels']}, pos {m['positions']}"
                     for m in record["massive_activations"]["used"]) or "none detected"
    figure.suptitle(f"{model}: smoothing the massive activation at birth vs on the skip path ({used})", fontsize=10)
    figure.tight_layout()
    return figure


def _encoder_figure(record: dict, model: str):
    roles = record["gamma_outliers"]["roles"]
    figure, axes = plt.subplots(1, len(roles) + 1, figsize=(6 * len(roles) + 6, 4.6))
    sigma = record["gamma_outliers"]["criterion"]["sigma"]
    for axis, (role, found) in zip(axes, roles.items()):
        norms = sorted((n for n in record["norm_weights"] if n.endswith(f".{role}")), key=lambda n: int(n.split(".")[1]))
        for number, norm in enumerate(norms):
            gain = np.array(record["norm_weights"][norm]["gain"])
            z = (gain - gain.mean()) / gain.std() if gain.std() > 0 else np.zeros_like(gain)
            axis.plot(np.arange(len(z)), z, linestyle="none", marker=".", markersize=3, color=f"C{number}",
                      label=f"layer {norm.split('.')[1]}")
        for channel in found["consistent"]:
            axis.axvline(channel, color="red", linewidth=0.8, alpha=0.6)
            axis.text(channel, axis.get_ylim()[1], f" {channel}", color="red", fontsize=8, va="top")
        for bound in (sigma, -sigma):
            axis.axhline(bound, color="black", linewidth=0.6, linestyle=":")
        axis.set_xlabel("channel")
        axis.set_ylabel("gain z-score within the norm")
        axis.set_title(f"{role}: outlier dims (red, > {sigma:g} sigma in >= half the layers) {found['consistent']}",
                       fontsize=9)
        axis.legend(fontsize=7, ncol=2, markerscale=3)
    bars = axes[-1]
    rows = {row["variant"]: row for row in table_of(record).rows}
    values = [v.removeprefix("reset_") for v in rows if v.startswith("reset_")]
    x = np.arange(len(values))
    for offset, prefix, label in ((-0.2, "reset", "outlier dims"), (0.2, "random", "random channels (mean of seeds)")):
        heights = [1 - rows[f"{prefix}_{v}"]["cos_mean"] for v in values]
        bars.bar(x + offset, heights, width=0.4, label=label, color="C3" if prefix == "reset" else "C7")
        if prefix == "random":
            per_seed = [[1 - d["fidelity"]["cos_mean"] for d in record["variants"][f"random_{v}"]["per_seed"]]
                        for v in values]
            bars.errorbar(x + offset, heights, yerr=[[h - min(s) for h, s in zip(heights, per_seed)],
                                                     [max(s) - h for h, s in zip(heights, per_seed)]],
                          fmt="none", color="black", capsize=3, linewidth=0.8)
    labels = ({"one": "gain 1, beta 0", "mean": "gain, beta = mean", "zero": "gain 0, beta 0"}
              if record.get("reset_bias", True) else
              {"one": "gain 1 (beta kept)", "mean": "gain = mean (beta kept)", "zero": "gain 0 (beta kept)"})
    bars.set_xticks(x, [labels.get(v, v) for v in values], fontsize=8)
    bars.set_yscale("log")
    bars.set_ylabel("1 - cosine to the unedited embedding (mean over sentences)")
    sentences = record["sentences"]
    bars.set_title(f"embedding damage, {sentences['count']} {sentences['dataset']} sentences (bars: seed range)",
                   fontsize=9)
    bars.legend(fontsize=8)
    figure.suptitle(f"{model}: BERT Busters' LayerNorm outlier dimensions and what resetting them costs", fontsize=10)
    figure.tight_layout()
    return figure


def build_figures(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    builders = {"ro_locate": _locate_figure, "ro_gamma": _gamma_figure, "ro_smooth": _smooth_figure,
                "ro_encoder": _encoder_figure}
    for exp, build in builders.items():
        for model, tag, record in _records(results_dir, exp):
            written += save_figure(build(record, model), Path(out_dir) / f"{exp}_{model}_{tag}")
    return written


register("ro", tables=build_tables, figures=build_figures)
