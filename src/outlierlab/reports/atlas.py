"""The outlier atlas (+exp=atlas): one index table over every model's record and one overview figure.

    results/atlas/<model>/<run_tag>.json  ->  results/tables/atlas_index.md|tex, results/figures/atlas_overview.png|pdf
"""
from __future__ import annotations

from pathlib import Path

from outlierlab.figures import plt, save_figure
from outlierlab.reports import register
from outlierlab.results import read_result
from outlierlab.studies.atlas import atlas_row, columns_for
from outlierlab.tables import Column, Table, write_table


def _records(results_dir: Path) -> list[dict]:
    return [read_result(path) for path in sorted((results_dir / "atlas").glob("*/*.json"))]


def build_tables(results_dir: Path, out_dir: Path) -> list[Path]:
    records = _records(results_dir)
    if not records:
        return []
    rows = [{**atlas_row(record), "windows": (f"{record['evaluations']['exp.data.corpus']['windows']} x "
                         f"{record['evaluations']['exp.data.corpus']['seqlen']}")}
            for record in records]
    columns = [*columns_for(rows), Column("windows", "windows")]
    criteria = records[0]["criteria"]
    caption = ("Outlier atlas (+exp=atlas). MA: " + criteria["massive_activation"]["provenance"]
               + "; consistent = in >= half the windows; magnitude = mean |h| at the peak layer; made by = the block's "
               "step at the MA against its down_proj output (a super weight when one weight makes it) or a norm's "
               "effective gain. SW: " + criteria["detection"]["provenance"] + "; PPL x = WikiText-2 PPL with that "
               "weight alone zeroed / original. int8: " + criteria["channel_outliers"]["provenance"]
               + ". Outlier tokens: " + criteria["outlier_tokens"]["provenance"] + ". Norm gain: largest "
               + criteria["norm_gains"].get("reading", "effective gain (parametrisation read from the module)")
               + ". Sink rate: "
               + criteria["attention_sinks"]["provenance"] + ".")
    return write_table(Table(columns, rows, index="model", caption=caption), out_dir / "atlas_index")


PANELS = (("mean_top1", "mean top-1 |h| (solid) and median (dotted)", True),
          ("sink_share", "share of sink heads (Gu et al., eps 0.3)", False),
          ("int8_channels", "LLM.int8 outlier channels", False),
          ("norm_max_gain", "largest norm gain in the block", True))


def build_figures(results_dir: Path, out_dir: Path) -> list[Path]:
    records = _records(results_dir)
    if not records:
        return []
    figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for record in records:
        name, per_layer = record["model"]["name"], record["per_layer"]
        for axis, (key, title, log) in zip(axes, PANELS):
            values = per_layer[key]
            layers = [i for i, v in enumerate(values) if v is not None]
            line, = axis.plot(layers, [values[i] for i in layers], marker=".", label=f"{name} (BOS {record['bos']})")
            if key == "mean_top1":
                axis.plot(range(len(per_layer["mean_median"])), per_layer["mean_median"], ":", color=line.get_color())
            axis.set_title(title, fontsize=9)
            axis.set_xlabel("layer")
            if log:
                axis.set_yscale("log")
    axes[0].legend(fontsize=7)
    figure.suptitle("Outlier atlas: per-layer overview", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, out_dir / "atlas_overview")


register("atlas", tables=build_tables, figures=build_figures)
