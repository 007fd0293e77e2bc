"""Paper RO: where each massive activation is born, site by site inside the block, layer by layer.

1. `SiteExtremes` at every block point of every layer (models/sites.py BLOCK_POINTS) over exp.data.probe windows:
   per point the mean largest |x| per sequence, its median, where the peak is, and in how many sequences the MA
   criterion holds.
2. `first_appearance`: the first point with an MA, and for every residual MA channel the point where it is born
   (paper RO's claim: after the activation of the first FFN that makes it, y6 / y4).
3. The MA channel's largest |x| at every point of the residual's width, in forward order (for the figure).
"""
from __future__ import annotations

from outlierlab.probes.channel_outliers import forward_windows
from outlierlab.probes.ma_birth import SiteExtremes, criterion_from, first_appearance
from outlierlab.tables import Table, columns


def check(cfg, plan) -> None:
    criterion_from(cfg.exp.criterion)


def locate(ctx, windows) -> dict:
    """SiteExtremes over `windows` on the model as it is now -> {"points", "birth", "traces"}."""
    criterion, share = criterion_from(ctx.cfg.exp.criterion)
    sites = ctx.loaded.sites
    with SiteExtremes(sites, criterion=criterion) as extremes:
        forward_windows(ctx.loaded, windows.ids, ctx.cfg.exp.data.probe.batch_size, desc="MA birth")
    rows = extremes.summary()
    birth = first_appearance(rows, share)
    hidden = ctx.loaded.model.config.hidden_size
    traces = {str(entry["channel"]): [[row["point"], float(extremes.channel_max(row["point"])[entry["channel"]])]
                                      for row in rows if row["width"] == hidden]
              for entry in birth["channels"]}
    return {"points": rows, "birth": birth, "traces": traces, "criterion": {**vars(criterion), "min_share": share}}


def table(found: dict, model: str, windows_meta: dict) -> dict:
    rows = []
    for entry in found["birth"]["channels"]:
        for row in found["points"]:
            if row["layer"] != entry["layer"]:
                continue
            rows.append({"ma_channel": entry["channel"], "site": row["point"], "paper": row["label"] or "",
                         "mean_max_abs_x": row["mean_peak"], "at_channel": row["peak"]["channel"],
                         "median_abs_x": row["mean_median"], "massive_in": row["hit_share"],
                         "born_here": "<-" if row["point"] == entry["born_at"] else "",
                         "first_in_channel": "<-" if row["point"] == entry["residual_point"] else ""})
    births = "; ".join(f"channel {e['channel']} born at {e['born_at']} ({e['born_label'] or 'no paper label'}, "
                       f"its channel {e['born_channel']}), first in the residual at {e['residual_point']}"
                       for e in found["birth"]["channels"]) or "no massive activation at any block output"
    criterion = found["criterion"]
    caption = (f"{model}: every block point of the birth layer; massive = |x| > {criterion['min_abs']:g} and > "
               f"{criterion['median_ratio']:g} x the median |x| of that site (per sequence), 'massive in' = share of "
               f"the {windows_meta['windows']} x {windows_meta['seqlen']}-token {windows_meta['dataset']} "
               f"{windows_meta['split']} windows; born here = the first massive point of the block that makes the "
               f"channel (inside the MLP, or in that channel); first in channel = the first residual-width point "
               f"where that channel is massive; {births}. Paper RO: born after the first FFN's activation (y6 in "
               f"Llama/Qwen blocks, y4 in GPT blocks; labels are our reading of its figure)")
    shown = columns(("ma_channel", "MA channel"), "site", "paper", ("mean_max_abs_x", "mean max |x|"),
                    ("at_channel", "at channel"), ("median_abs_x", "median |x|"), ("massive_in", "massive in"),
                    ("born_here", "born here"), ("first_in_channel", "first in channel"))
    return Table(shown, rows, index=["ma_channel", "site"], caption=caption).to_dict()


def run(ctx) -> dict:
    windows = ctx.data_windows("probe")
    found = locate(ctx, windows)
    return {**found, "probe_data": windows.meta, "table": table(found, ctx.cfg.model.name, windows.meta)}
