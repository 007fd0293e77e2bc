"""+exp=rotation (issue 25) regenerated from results/ alone, and the pieces its recipe records.

    results/rotation/<model>/*.json  -> tables/rotation_<model>_<tag>.{md,tex}   PPL per setting x method, pruning
                                        tables/rotation_survival.{md,tex}        atlas probes, original vs rotated
                                        tables/rotation_reference.{md,tex}       the published numbers, provenance
                                        figures/rotation_ma_channel.{png,pdf}    |h| per channel of the MA token
"""
from __future__ import annotations

from pathlib import Path

from outlierlab.figures import plt, save_figure
from outlierlab.reports import register, results, table_of
from outlierlab.tables import Column, Table, write_table

EXP = "rotation"


def survival_rows(record: dict) -> list[dict]:
    rows = []
    for basis in ("original", "rotated"):
        atlas = record["atlas"][basis]
        token, ma, kurtosis = atlas["ma_token"], atlas["massive_activations"], atlas["kurtosis"]
        largest = max(atlas["super_weights"]["largest_down_proj"], key=lambda w: abs(w["value"]))
        rows.append({"model": record["model"]["name"], "basis": basis, "ma_max_abs": ma["max_abs"],
                     "ma_found": ma["found"], "ma_channels": len(ma["channels"]),
                     "token_norm": token["norm"], "token_max_abs": token["max_abs"],
                     "token_top_share": token["top_share_of_norm"],
                     "int8_features": len(atlas["channel_outliers"]["features"]),
                     "kurtosis_residual": kurtosis["residual"]["mean"],
                     "kurtosis_qkv_in": kurtosis["qkv_input"]["mean"],
                     "kurtosis_down_in": kurtosis["down_proj_input"]["mean"],
                     "sink_rate": atlas["attention_sinks"]["sink_rate"],
                     "sw_detected": len(atlas["super_weights"]["detected"]),
                     "largest_w": abs(largest["value"]), "largest_w_z": largest["zscore"]})
    return rows


SURVIVAL = [Column("model", "model"), Column("basis", "basis"), Column("ma_max_abs", "max |h|"),
            Column("ma_found", "MA (layer, channel)s"), Column("ma_channels", "MA channels"),
            Column("token_norm", "MA token norm"), Column("token_max_abs", "MA token max |h|"),
            Column("token_top_share", "top channel / norm"), Column("int8_features", "int8 features"),
            Column("kurtosis_residual", "kurtosis residual"), Column("kurtosis_qkv_in", "kurtosis q/k/v in"),
            Column("kurtosis_down_in", "kurtosis down_proj in"), Column("sink_rate", "sink rate"),
            Column("sw_detected", "SW detected"), Column("largest_w", "largest down_proj |w|"),
            Column("largest_w_z", "its z-score")]
REFERENCE = [Column("source", "source"), Column("model", "model"), Column("setting", "setting"),
             Column("method", "method"), Column("wikitext2", "WikiText-2 PPL"), Column("ppl", "PPL (as quoted)"),
             Column("zero_shot_mean", "zero-shot mean"), Column("row", "our row")]


def _one_per_model(found: list) -> list:
    """The atlas probes do not depend on the eval suite: one record per model for the survival table and the figure
    (the first by file name: quick before zeroshot_*)."""
    chosen = {}
    for result in found:
        chosen.setdefault(result.model, result)
    return list(chosen.values())


def build_tables(results_dir: Path, out_dir: Path) -> list[Path]:
    found = results(results_dir, EXP)
    if not found:
        return []
    written = []
    for result in found:
        written += write_table(table_of(result.record), out_dir / f"{EXP}_{result.stem}")
    rows = [row for result in _one_per_model(found) for row in survival_rows(result.record)]
    caption = ("+exp=rotation: the atlas probes on the original model and on the rotated one (same function). MA: "
               "paper MA criterion on the residual stream; MA token = the token and layer of the largest |h| on the "
               "detection prompt (original model); int8: LLM.int8 features at the norm outputs; kurtosis: pooled, "
               "mean over layers; sink rate: Gu et al. 2024; SW: data-free detection.")
    survival = Table(SURVIVAL, rows, index=["model", "basis"], caption=caption)
    written += write_table(survival, out_dir / f"{EXP}_survival")
    reference = [{key: entry.get(key) for key in ("source", "model", "setting", "method", "wikitext2", "ppl",
                                                  "zero_shot_mean", "row")} for entry in found[0].record["reference"]]
    written += write_table(Table(REFERENCE, reference, caption="Published numbers beside ours (issue 25's quotes); "
                                 "other models and protocols."), out_dir / f"{EXP}_reference")
    return written


def build_figures(results_dir: Path, out_dir: Path) -> list[Path]:
    found = _one_per_model(results(results_dir, EXP))
    if not found:
        return []
    figure, axes = plt.subplots(len(found), 1, figsize=(9, 2.8 * len(found)), squeeze=False)
    for axis, result in zip(axes[:, 0], found):
        atlas = result.record["atlas"]
        token = atlas["original"]["ma_token"]
        for basis, color in (("original", "tab:red"), ("rotated", "tab:blue")):
            values = atlas[basis]["ma_token"]["abs_per_channel"]
            axis.plot(range(len(values)), values, color=color, linewidth=0.8,
                      label=f"{basis}: max {max(values):.3g}, norm {atlas[basis]['ma_token']['norm']:.3g}")
        axis.set_yscale("log")
        axis.set_xlabel("residual channel")
        axis.set_ylabel("|h|")
        axis.set_title(f"{result.model}: the MA token (position {token['position']}) after layers[{token['layer']}], "
                       "original vs rotated basis", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, out_dir / f"{EXP}_ma_channel")


register(EXP, tables=build_tables, figures=build_figures)
