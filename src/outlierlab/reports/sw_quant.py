"""Paper SW quantization (Fig. 7, Tables 3/4) regenerated from results/ alone.

    results/sw_quant_weights/<model>/*.json      -> tables/sw_quant_weights_<model>.{md,tex}, figures/sw_fig7_<model>.*
    results/sw_quant_activations/<model>/*.json  -> tables/sw_quant_activations_<model>.{md,tex}

Several weight runs of one model (e.g. run_tag=int4 and run_tag=int3) are merged by (bits, block, method); a later
file (by name) wins on a clash. The paper's Fig. 7 numbers (INT4 zero-shot mean, Llama-7B and Mistral-7B) travel in
each result's `reference` and are printed beside ours in the table and drawn in their own panel.
"""
from __future__ import annotations

from math import isfinite
from pathlib import Path

from outlierlab.evals.ppl import ratio_interval
from outlierlab.figures import plt, save_figure
from outlierlab.reports import by_model, register, results, table_of
from outlierlab.tables import Column, Reference, Table, write_table
from outlierlab.tables.schema import interval_key

WEIGHTS, ACTIVATIONS = "sw_quant_weights", "sw_quant_activations"
METRIC_NAMES = {"wikitext2": "WikiText-2 PPL", "c4": "C4 PPL", "zeroshot_mean": "zero-shot mean (%)"}


def _merge_weight_runs(records: list[tuple[Path, dict]]) -> dict:
    """One view of every weight run of a model: original scores, runs by (bits, block, method), axis orders."""
    runs, bits, blocks, methods, files = {}, [], [], [], []
    original, original_ppl, reference, caption, gguf = {}, {}, None, "", False
    for path, record in records:
        files.append(path.name)
        gguf = gguf or record["model"].get("kind") == "gguf"
        original = {**original, **record["original"]["scores"]}
        original_ppl = {**original_ppl, **(record["original"].get("ppl") or {})}
        reference = reference or record.get("reference")
        caption = table_of(record).caption
        for run in record["runs"]:
            runs[(run["bits"], run["block"], run["method"])] = run
            for values, value in ((bits, run["bits"]), (blocks, run["block"]), (methods, run["method"])):
                if value not in values:
                    values.append(value)
    # Order the x axis by weights per quantization group, finest first: measured (numel / groups) where the result
    # records numel, else read from the label (RxC, flatN; tensor last).
    size = {}
    for (_, block, _), run in runs.items():
        groups = sum(t["groups"] for t in run["tensors"])
        numel = sum(t.get("numel", 0) for t in run["tensors"])
        size.setdefault(block, numel / groups if numel and groups else _nominal_size(block))
    blocks = sorted(blocks, key=lambda block: size[block])
    return {"runs": runs, "bits": bits, "blocks": blocks, "methods": methods, "original": original,
            "float": {"scores": original, "ppl": original_ppl},
            "reference": reference, "caption": caption, "files": files, "gguf": gguf}


def _nominal_size(block: str) -> float:
    rows, _, cols = block.partition("x")
    if rows.isdigit() and cols.isdigit():
        return int(rows) * int(cols)
    if block.startswith("flat") and block[4:].isdigit():
        return int(block[4:])
    return float("inf")


def _paper(reference: dict | None) -> tuple[Reference | None, list[Column]]:
    """The paper's Fig. 7 numbers as a reference block (rows "INT<bits>/<block>") and their columns."""
    if not reference:
        return None, []
    values, columns = {}, []
    for model, methods in reference.get("models", {}).items():
        for method, scores in methods.items():
            key = f"{model}_{method}_zeroshot_mean"
            columns.append(Column(key, f"paper {model} {method} (zs)", reference=True))
            for block, value in zip(reference["blocks"], scores):
                values.setdefault(f"INT{reference['bits']}/{block}", {})[key] = value
    return Reference(source=reference["source"], values=values), columns


def _scores(run: dict, method: str, metrics: list[str]) -> dict:
    """A run's (or the float model's) score per metric, with its interval over windows where the record has one."""
    row = {}
    for metric in metrics:
        row[f"{method}_{metric}"] = run["scores"].get(metric)
        interval = ((run.get("ppl") or {}).get(metric) or {}).get("ppl_ci")
        if interval:
            row[interval_key(f"{method}_{metric}")] = interval
    return row


def _over_rtn(run: dict, rtn: dict | None, method: str, metric: str) -> dict:
    """PPL of `method` / PPL of plain RTN at the same bits and block, with the paired bootstrap interval over the same
    windows (what says whether SW-aware beats RTN, rather than two overlapping intervals)."""
    mine, theirs = ((run.get("ppl") or {}).get(metric) or {}), (((rtn or {}).get("ppl") or {}).get(metric) or {})
    if method == "rtn" or not mine.get("window_nll") or not theirs.get("window_nll"):
        return {}
    return {f"{method}_over_rtn": mine["ppl"] / theirs["ppl"],
            interval_key(f"{method}_over_rtn"): ratio_interval(mine["window_nll"], theirs["window_nll"])}


def build_tables(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for model, records in by_model(results(results_dir, WEIGHTS)).items():
        merged = _merge_weight_runs(records)
        metrics = list(merged["original"])
        methods = merged["methods"]
        reference, paper = _paper(merged["reference"])
        rows = [{"bits": "float", "block": "-", **{key: value for m in methods
                                                    for key, value in _scores(merged["float"], m, metrics).items()}}]
        for bits in merged["bits"]:
            for block in merged["blocks"]:
                row = {"bits": f"INT{bits}", "block": block}
                for method in methods:
                    run = merged["runs"].get((bits, block, method))
                    if run:
                        row.update(_scores(run, method, metrics))
                        row[f"{method}_rel_error"] = run["summary"]["mean_relative_error"]
                        row[f"{method}_clipped"] = run["summary"]["clipped"]
                        row.update(_over_rtn(run, merged["runs"].get((bits, block, "rtn")), method, metrics[0]))
                rows.append(row)
        columns = [Column("bits", "bits"), Column("block", "block"),
                   *[Column(f"{m}_{k}", f"{m} {k}") for k in metrics for m in methods],
                   *[Column(f"{m}_over_rtn", f"{m} / rtn {metrics[0]}") for m in methods if m != "rtn"],
                   *[Column(f"{m}_rel_error", f"{m} rel. error") for m in methods],
                   *[Column(f"{m}_clipped", f"{m} clipped") for m in methods if m != "rtn"],
                   *paper]
        caption = (f"{model}: {merged['caption']}. Files: {', '.join(merged['files'])}."
                   + (f" Paper columns: {merged['reference']['source']} (a different metric from our PPL; their "
                      f"blocks are of 4096-wide matrices)." if paper else ""))
        written += write_table(Table(columns, rows, index=["bits", "block"], reference=reference, caption=caption),
                               out_dir / f"{WEIGHTS}_{model}")
    for model, records in by_model(results(results_dir, ACTIVATIONS)).items():
        for path, record in records:
            suffix = "" if path.stem == "quick" else f"_{path.stem}"
            table = table_of(record)
            written += write_table(table.with_caption(f"{model} ({path.name}): {table.caption}"),
                                   out_dir / f"{ACTIVATIONS}_{model}{suffix}")
    return written


def _fig7(model: str, merged: dict, out_dir: Path) -> list[Path]:
    metrics = [m for m in ("wikitext2", "c4", "zeroshot_mean") if m in merged["original"]]
    paper = merged["reference"]
    n_cols = len(merged["bits"]) + (1 if paper else 0)
    figure, axes = plt.subplots(len(metrics), n_cols, figsize=(4.2 * n_cols, 3.3 * len(metrics)), squeeze=False)
    blocks = merged["blocks"]
    styles = {"rtn": ("tab:red", "o", "RTN"), "sw_aware": ("tab:blue", "s", "SW-aware (clip + restore SW)")}
    for row, metric in enumerate(metrics):
        for col, bits in enumerate(merged["bits"]):
            ax = axes[row][col]
            for method in merged["methods"]:
                extra = ("tab:green", "tab:purple", "tab:orange", "tab:brown")[merged["methods"].index(method) % 4]
                color, marker, label = styles.get(method, (extra, "^", method))
                values = [merged["runs"].get((bits, block, method), {}).get("scores", {}).get(metric)
                          for block in blocks]
                points = [(i, v) for i, v in enumerate(values) if v is not None]
                if points:  # RTN drawn wide underneath, so an identical SW-aware curve still shows both
                    wide = method == "rtn"
                    ax.plot(*zip(*points), marker=marker, color=color, label=label, linewidth=4 if wide else 1.5,
                            markersize=9 if wide else 5, alpha=0.6 if wide else 1.0)
            ax.axhline(merged["original"][metric], color="gray", linestyle="--", label="float (no quantization)")
            drawn = [v for line in ax.get_lines() for v in line.get_ydata() if isfinite(v)]
            if metric != "zeroshot_mean" and drawn and min(drawn) > 0 and max(drawn) / min(drawn) > 5:
                ax.set_yscale("log")  # PPL spans orders of magnitude once the coarse blocks break the model
            ax.set_xticks(range(len(blocks)), blocks, rotation=30, fontsize=8)
            ax.set_title(f"{model}, INT{bits}", fontsize=10)
            ax.set_ylabel(METRIC_NAMES.get(metric, metric))
            ax.set_xlabel("granularity (block: rows x cols of W)")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
        if paper:
            ax = axes[row][-1]
            if row == 0:
                for model_name, methods in paper["models"].items():
                    for method, values in methods.items():
                        color, marker, _ = styles.get(method, (None, "^", method))
                        ax.plot(range(len(values)), values, marker=marker, color=color,
                                linestyle="-" if model_name == "llama7b" else ":",
                                label=f"{model_name} {method}")
                ax.set_xticks(range(len(paper["blocks"])), paper["blocks"], rotation=30, fontsize=8)
                ax.set_title(f"paper Fig. 7, INT{paper['bits']} (zero-shot)", fontsize=10)
                ax.set_ylabel("avg zero-shot acc (%)")
                ax.set_xlabel("block of a 4096-wide matrix")
                ax.legend(fontsize=7)
                ax.grid(alpha=0.3)
            else:
                ax.axis("off")
    figure.suptitle("SW Fig. 7: weight RTN vs SW-aware RTN across block sizes"
                    + (" (float = dequantized GGUF weights)" if merged["gguf"] else ""), fontsize=11)
    figure.tight_layout()
    return save_figure(figure, out_dir / f"sw_fig7_{model}")


def build_figures(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for model, records in by_model(results(results_dir, WEIGHTS)).items():
        written += _fig7(model, _merge_weight_runs(records), out_dir)
    return written


register("sw_quant", tables=build_tables, figures=build_figures)
