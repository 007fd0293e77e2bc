"""Paper SW (Yu et al. 2024, "The Super Weight in Large Language Models"): tables and figures from results/ alone.

    Table 1  results/prune_sw/*/*.json        -> tables/sw_table1_<model>_<tag>   (paper's Llama-7B numbers beside)
    Table 2  results/sw_index/*/*.json         -> tables/sw_table2                 (one row block per model)
    Fig. 3   results/sw_activations/*/*.json   -> figures/sw_fig3_<model>_<tag>    (down_proj input/output spikes)
    Fig. 4   results/sw_activations/*/*.json   -> figures/sw_fig4_<model>_<tag>    (max |residual| per layer)
    Fig. 5   results/sw_stopwords/*/*.json     -> figures/sw_fig5_<model>_<tag>    (tokens gaining probability)
    Fig. 6   results/sw_scale/*/*.json         -> figures/sw_fig6_<model>_<tag>    (PPL and accuracy vs SW scale)
The experiments' own tables are written as tables/<exp>_<model>_<tag> (exp = sw_activations, sw_stopwords, sw_scale).
Every builder returns [] when its results are absent.
"""
from __future__ import annotations

import math
from pathlib import Path

from outlierlab.figures import plt, save_figure
from outlierlab.reports import register, results, table_of
from outlierlab.tables import Column, Table, write_table


def _by_stem(results_dir: Path, exp: str) -> list[tuple[str, dict]]:
    return [(result.stem, result.record) for result in results(results_dir, exp)]


def _title(record: dict) -> str:
    model = record["model"]
    note = " (dequantized GGUF weights)" if model.get("kind") == "gguf" else ""
    return f"{model['name']}{note}"


# ---------------------------------------------------------------------------------------------------------- tables

def table1(results_dir: Path, out_dir: Path) -> list[Path]:
    """Paper SW Table 1 per prune_sw result, with the paper's Llama-7B numbers from its table's reference block."""
    written = []
    for stem, record in _by_stem(results_dir, "prune_sw"):
        table = table_of(record)
        caption = f"Paper SW Table 1 on {_title(record)}: {table.caption}"
        if table.reference and table.reference.values:
            caption += f". Paper columns: {table.reference.source} (not this model)"
        written += write_table(table.with_caption(caption), Path(out_dir) / f"sw_table1_{stem}")
    return written


TABLE2 = [Column("model", "model"), Column("candidate", "candidate"), Column("value", "value"), Column("rank", "rank"),
          Column("z_score", "z-score"), Column("input_spike", "input spike"), Column("output_spike", "output spike"),
          Column("detected", "detected"), Column("registry", "registry"), Column("ma_channel", "MA channel"),
          Column("row_is_ma_channel", "row = MA channel"), Column("ppl_zeroed", "PPL zeroed"),
          Column("x_original", "x original")]


def table2(results_dir: Path, out_dir: Path) -> list[Path]:
    """Paper SW Table 2 (the super-weight index), every sw_index result in one table, one row block per model."""
    records = _by_stem(results_dir, "sw_index")
    if not records:
        return []
    rows, notes = [], []
    for stem, record in records:
        activation = record["massive_activation"]
        ma = activation["channel"] if activation["massive"] else "none"
        table = table_of(record)
        protocol = next((c.key for c in table.columns if c.key in record["importance"]["original"]), None)
        copied = ["candidate", "value", "rank", "z_score", "input_spike", "output_spike", "detected", "registry"]
        for index, row in enumerate(table.rows or [{"candidate": "none"}]):
            match = row.get("row_is_ma_channel")
            rows.append({"model": stem if index == 0 else "", **{c: row.get(c) for c in copied},
                         "ma_channel": ma if index == 0 else None,
                         "row_is_ma_channel": {True: "yes", False: "no"}.get(match, match),
                         "ppl_zeroed": row.get(protocol) if protocol else None, "x_original": row.get("x_original")})
        notes.append(f"{stem}: {record['detection']['stop_reason']}"
                     + (f"; PPL = {protocol} ({record['eval']})" if protocol else ""))
    caption = ("Paper SW Table 2: super-weight candidates (layer, row, col) of down_proj per model; value, magnitude "
               "rank and z-score in its matrix, down_proj input/output at the token where the output peaks on the "
               "detection prompt; detection and importance (PPL with that weight alone zeroed) are separate columns. "
               "Values of GGUF models are dequantized block-quantized values. " + " | ".join(notes))
    return write_table(Table(TABLE2, rows, caption=caption), Path(out_dir) / "sw_table2")


def experiment_tables(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for exp in ("sw_activations", "sw_stopwords", "sw_scale"):
        for stem, record in _by_stem(results_dir, exp):
            table = table_of(record)
            written += write_table(table.with_caption(f"{_title(record)}: {table.caption}"),
                                   Path(out_dir) / f"{exp}_{stem}")
    return written


def tables(results_dir: Path, out_dir: Path) -> list[Path]:
    return table1(results_dir, out_dir) + table2(results_dir, out_dir) + experiment_tables(results_dir, out_dir)


# --------------------------------------------------------------------------------------------------------- figures

def fig3(stem: str, record: dict, out_dir: Path) -> list[Path]:
    """Max |input| and |output| of every layer's down_proj on the detection prompt (paper SW Fig. 3)."""
    profile = record["down_proj_profile"]
    layers = [entry["layer"] for entry in profile]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, key, name in ((axes[0], "input_max", "down_proj input"), (axes[1], "output_max", "down_proj output")):
        values = [entry[key]["abs"] for entry in profile]
        axis.plot(layers, values, marker="o", markersize=3)
        peak = max(range(len(values)), key=values.__getitem__)
        entry = profile[peak][key]
        axis.annotate(f"layer {layers[peak]}: {entry['value']:.0f}\n(channel {entry['channel']})",
                      (layers[peak], values[peak]), textcoords="offset points", xytext=(8, -14), fontsize=8)
        axis.set_xlabel("layer")
        axis.set_ylabel(f"max |{name}|")
        axis.set_title(f"{name}")
        axis.grid(alpha=0.3)
    used = ", ".join(record["super_weights"]["used"]) or "none"
    title = f"SW Fig. 3 - {_title(record)}; super weights {used}\nprompt: \"{record['detection']['prompt']}\""
    reference = record.get("paper_reference")
    if reference:
        title += (f"; {reference['source']}: layer {reference['layer']}, input {reference['input_spike']}, "
                  f"output {reference['output_spike']}")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return save_figure(figure, Path(out_dir) / f"sw_fig3_{stem}")


_VARIANT_LABELS = {"original": "original", "prune_sw": "SW removed",
                   "prune_non_sw": "other outlier weights removed (7000 largest)",
                   "prune_all": "all removed (SW + 7000 largest)",
                   "prune_non_sw_scaled": "other outlier weights removed (Llama-7B fraction)",
                   "prune_all_scaled": "all removed (SW + Llama-7B fraction)"}


def fig4(stem: str, record: dict, out_dir: Path) -> list[Path]:
    """Max |residual| after every layer per variant (paper SW Fig. 4)."""
    profiles = record["residual_profile"]
    figure, axis = plt.subplots(figsize=(7.5, 4))
    styles = ["-", "--", "-.", ":", (0, (5, 1)), (0, (1, 1))]
    for number, (variant, profile) in enumerate(profiles.items()):
        axis.plot([e["layer"] for e in profile], [e["max_abs"] for e in profile], marker="o", markersize=2.5,
                  linestyle=styles[number % len(styles)], label=_VARIANT_LABELS.get(variant, variant))
    axis.set_yscale("log")
    axis.set_xlabel("layer (residual stream after layers[i])")
    axis.set_ylabel("max |activation|")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    used = ", ".join(record["super_weights"]["used"]) or "none"
    axis.set_title(f"SW Fig. 4 - {_title(record)}; super weights {used}", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, Path(out_dir) / f"sw_fig4_{stem}")


def _error_bars(points: list[tuple[float, list | None]]):
    """matplotlib's [2, n] below/above distances from each (value, [low, high]); None when no point has a finite
    interval (records made before intervals)."""
    bars = [[value - ci[0], ci[1] - value] if ci and all(map(math.isfinite, ci)) else [0.0, 0.0]
            for value, ci in points]
    return [list(side) for side in zip(*bars)] if any(any(bar) for bar in bars) else None


def fig5(stem: str, record: dict, out_dir: Path, count: int = 20) -> list[Path]:
    """Tokens gaining the most mean next-token probability when the SW is pruned, stopwords marked (Fig. 5)."""
    shift = record.get("shift")
    if not shift:
        return []
    gainers = shift["gainers"][:count]
    figure, (axis, mass) = plt.subplots(1, 2, figsize=(10, 5.2), gridspec_kw={"width_ratios": [3, 1]})
    labels = [repr(g["text"]) for g in gainers][::-1]
    colours = ["tab:red" if g["stopword"] else "tab:grey" for g in gainers][::-1]
    axis.barh(range(len(gainers)), [g["gain"] for g in gainers][::-1], color=colours,
              xerr=_error_bars([(g["gain"], g.get("gain_ci")) for g in gainers][::-1]), error_kw={"linewidth": 0.8})
    axis.set_yticks(range(len(gainers)), labels, fontsize=8)
    def right_end(g: dict) -> float:  # the annotation goes past the interval's bar
        high = (g.get("gain_ci") or [math.nan])[-1]
        return max(g["gain"], high) if math.isfinite(high) else g["gain"]
    for y, g in enumerate(gainers[::-1]):
        ratio = "inf" if not math.isfinite(g["ratio"]) else f"{g['ratio']:.1f}x"
        axis.annotate(f"{g['p_before']:.4f} -> {g['p_after']:.4f} ({ratio})", (right_end(g), y),
                      textcoords="offset points", xytext=(3, -3), fontsize=7)
    axis.set_xlabel("gain in mean next-token probability (pruned - original; lines: 95% interval over windows)")
    axis.set_xlim(0, max(right_end(g) for g in gainers) * 1.45)
    axis.set_title(f"top {len(gainers)} gainers (red: stopword)", fontsize=9)
    mass.bar(["original", "SW pruned"], [shift["stopword_mass_before"], shift["stopword_mass_after"]],
             color=["tab:blue", "tab:red"], yerr=_error_bars([(shift[k], shift.get(f"{k}_ci")) for k in
                                                            ("stopword_mass_before", "stopword_mass_after")]))
    mass.set_ylabel("total probability on stopword tokens")
    gain = shift.get("stopword_mass_gain_ci")
    paired = (f"\npaired gain {shift['stopword_mass_gain']:.3f} [{gain[0]:.3f}, {gain[1]:.3f}]"
              if gain and all(map(math.isfinite, gain)) else "")
    mass.set_title(f"{shift['stopword_tokens']} stopword tokens{paired}", fontsize=9)
    reference = record.get("paper_reference") or {}
    if reference.get("ratios"):
        ours = shift.get("focus") or {}
        def measured(word: str) -> str:
            entry = ours.get(word) or {}
            if not entry.get("tokens") or not math.isfinite(entry["ratio"]):
                return "n/a"
            ci = entry.get("ratio_ci")
            return f"{entry['ratio']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and all(map(math.isfinite, ci))
                                               else "")
        lines = [f"{word!r}: paper {ratio}x, ours {measured(word)}" for word, ratio in reference["ratios"].items()]
        mass.text(0.5, -0.18, f"{reference['source']}\n" + "\n".join(lines), transform=mass.transAxes,
                  ha="center", va="top", fontsize=7)
    used = ", ".join(record["super_weights"]["used"])
    figure.suptitle(f"SW Fig. 5 - {_title(record)}; super weights {used} zeroed", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, Path(out_dir) / f"sw_fig5_{stem}")


def fig6(stem: str, record: dict, out_dir: Path) -> list[Path]:
    """PPL and zero-shot accuracy against the super weights' scale (paper SW Fig. 6)."""
    points = record.get("points") or []
    if not points:
        return []
    scales = [p["scale"] for p in points]
    has_zeroshot = any(p.get("zeroshot") for p in points)
    figure, axes = plt.subplots(1, 2 if has_zeroshot else 1, figsize=(10 if has_zeroshot else 5.5, 3.8),
                                squeeze=False)
    ppl_axis = axes[0][0]
    values = []
    for key in points[0]["ppl"]:
        values += [p["ppl"][key]["ppl"] for p in points]
        line = values[-len(points):]
        ppl_axis.plot(scales, line, marker="o", markersize=3, label=key)
        for scale, value in zip(scales, line):  # the paper's question: does s != 1 beat the original?
            if scale == 1.0 or (math.isfinite(value) and value == min(line)):
                ppl_axis.annotate(f"{value:.2f}", (scale, value), textcoords="offset points", xytext=(0, 6),
                                  fontsize=7, ha="center")
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) > 10 * min(finite):
        ppl_axis.set_yscale("log")
    ppl_axis.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ppl_axis.set_xlabel("super weight scale s")
    ppl_axis.set_ylabel("perplexity")
    ppl_axis.legend(fontsize=8)
    ppl_axis.grid(alpha=0.3, which="both")
    if has_zeroshot:
        axis = axes[0][1]
        means = [None if not p.get("zeroshot") or p["zeroshot"]["mean"] is None else 100 * p["zeroshot"]["mean"]
                 for p in points]
        limit = next(p["zeroshot"]["limit"] for p in points if p.get("zeroshot"))
        axis.plot(scales, means, marker="o", markersize=3, label=f"ours, mean of {len(points[0]['zeroshot']['tasks'])}"
                  f" tasks ({limit} examples each)")
        reference = (record.get("reference") or {}).get("zeroshot_mean") or {}
        if reference:
            pairs = sorted((float(s), v) for s, v in reference.items())
            axis.plot([s for s, _ in pairs], [v for _, v in pairs], marker="s", markersize=3, linestyle="--",
                      color="tab:grey", label="paper, Llama-7B (7 tasks)")
        axis.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xlabel("super weight scale s")
        axis.set_ylabel("zero-shot accuracy (%)")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    used = ", ".join(record["super_weights"]["used"]) or "none"
    figure.suptitle(f"SW Fig. 6 - {_title(record)}; super weights {used} scaled by s", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, Path(out_dir) / f"sw_fig6_{stem}")


def figures(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for stem, record in _by_stem(results_dir, "sw_activations"):
        written += fig3(stem, record, out_dir) + fig4(stem, record, out_dir)
    for stem, record in _by_stem(results_dir, "sw_stopwords"):
        written += fig5(stem, record, out_dir)
    for stem, record in _by_stem(results_dir, "sw_scale"):
        written += fig6(stem, record, out_dir)
    return written


register("sw", tables=tables, figures=figures)
