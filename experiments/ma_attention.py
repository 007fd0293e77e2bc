"""Paper MA Sec. 4: massive activations and attention sinks.

1. Where the MAs are (model YAML registry or exp.massive_activations); their token positions are the sink keys.
2. For each variant (original, MAs set to zero / to their calibration mean at the first MA layer): stream the
   attention data through the model with `AttentionSinks` observing every layer's attention logits, values and
   probabilities (eager attention through transformers' AttentionInterface).
3. Per layer and head: sink share, logits toward sink vs other keys, sink-part vs rest decomposition of the output.
   The table averages them over heads and over the layers before / from the first MA layer; the per-layer, per-head
   numbers are in the result for the figures.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from outlierlab.interventions.base import StudyContext
from outlierlab.probes.attention import AttentionSinks
from outlierlab.studies.massive_activations import calibrate, locations
from outlierlab.tables import Table, columns


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(layers: list[dict], first_layer: int) -> dict:
    """Head- and layer-averaged numbers for the table: before the MAs appear vs. from their first layer on."""
    def head_mean(row, key):
        return _mean(row[key]) if isinstance(row.get(key), list) else row.get(key)
    before = [row for row in layers if row["layer"] < first_layer and row["queries"]]
    after = [row for row in layers if row["layer"] >= first_layer and row["queries"]]
    return {
        "sink_share_before_ma": _mean([head_mean(r, "sink_share") for r in before]),
        "sink_share_ma_layers": _mean([head_mean(r, "sink_share") for r in after]),
        "logit_gap_ma_layers": _mean([head_mean(r, "logit_gap") for r in after]),
        "sink_argmax_ma_layers": _mean([head_mean(r, "sink_argmax") for r in after]),
        "sink_part_rel_var": _mean([r["sink_relvar_layer"] for r in after]),
        "rest_rel_var": _mean([r["rest_relvar_layer"] for r in after]),
        "sink_part_dir_var": _mean([head_mean(r, "sink_dirvar") for r in after]),
        "rest_dir_var": _mean([head_mean(r, "rest_dirvar") for r in after]),
    }


COLUMNS = columns("variant", ("sink_share_before_ma", "sink share (before MA)"),
                  ("sink_share_ma_layers", "sink share (MA layers)"), ("logit_gap_ma_layers", "logit gap (MA layers)"),
                  ("sink_argmax_ma_layers", "sink argmax (MA layers)"), ("sink_part_rel_var", "sink part rel. var"),
                  ("rest_rel_var", "rest rel. var"), ("sink_part_dir_var", "sink part dir. var"),
                  ("rest_dir_var", "rest dir. var"))


@torch.no_grad()
def attention_pass(ctx, windows, sinks: list[int], label: str) -> list[dict]:
    batch_size = ctx.cfg.exp.attention_data.batch_size
    with AttentionSinks(ctx.loaded.sites, sinks) as probe:
        for batch in tqdm(windows.ids.split(batch_size), desc=f"{label} attention", leave=False):
            ctx.loaded.model(batch.to(ctx.loaded.device))
    return probe.summary()


def run(ctx) -> dict:
    cfg = ctx.cfg.exp
    found, notes, origin = locations(ctx.cfg, ctx.loaded.bos)
    if not found:
        note = "skipped: no massive activation with a fixed token position"
        return {"massive_activations": {"used": [], "origin": origin, "notes": notes},
                "table": Table(columns("variant", "note"), [{"variant": v, "note": note} for v in cfg.variants],
                               index="variant", caption=note).to_dict()}
    sinks = sorted({p for location in found for p in location.positions})
    first_layer = min(location.first_layer for location in found)
    means, _ = calibrate(ctx, found)
    context = StudyContext(massive_activations=found, ma_means=means)
    protocol = cfg.attention_data
    windows = ctx.protocol_windows("exp.attention_data")

    rows, details = [], {}
    for variant, names in cfg.variants.items():
        with ctx.edit(list(names), context) as session:
            layers = attention_pass(ctx, windows, sinks, variant)
            edits = list(session.log)
        rows.append({"variant": variant, **summarize(layers, first_layer)})
        details[variant] = {"interventions": list(names), "edits": edits, "layers": layers}

    caption = (f"Attention toward the MA tokens (positions {sinks}; first MA layer {first_layer}) over "
               f"{windows.meta['windows']} windows of {windows.meta['seqlen']} tokens ({protocol.dataset} "
               f"{protocol.split}); means over heads and layers; queries after the last sink position only; "
               "logit gap = mean logit to sink keys minus mean logit to the other visible keys; rel. var = "
               "E||x - Ex||^2 / E||x||^2 of each head's output part across queries and sequences; dir. var = "
               "1 - ||E x/||x|| ||^2, the same for its direction alone")
    return {
        "massive_activations": {"used": [m.describe() for m in found], "origin": origin, "notes": notes},
        "sink_positions": sinks, "first_ma_layer": first_layer,
        "attention_data": windows.meta, "ma_means": means,
        "variants": details,
        "table": Table(COLUMNS, rows, index="variant", caption=caption).to_dict(),
    }
