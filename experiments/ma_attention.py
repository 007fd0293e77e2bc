"""Paper MA Sec. 4: massive activations and attention sinks.

1. Where the MAs are (model YAML registry or exp.massive_activations); their token positions are the sink keys.
2. For each variant (original, MAs set to zero / to their calibration mean at the first MA layer): stream the
   attention data through the model with `AttentionSinks` observing every layer's attention logits, values and
   probabilities (eager attention through transformers' AttentionInterface).
3. Per layer and head: sink share, logits toward sink vs other keys, sink-part vs rest decomposition of the output.
   The table averages them over heads and over the layers before / from the first MA layer, each with its
   bootstrap interval over the windows, and the changes from the original with paired intervals; the per-layer,
   per-head numbers are in the result for the figures.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from outlierlab.evals.bootstrap import BOOTSTRAP, percentile_interval, resample_weights
from outlierlab.interventions.base import StudyContext
from outlierlab.probes.attention import AttentionSinks
from outlierlab.studies.massive_activations import calibrate, locations
from outlierlab.tables import Table, columns, interval_key


def _mean(values):
    """Mean of numbers, or elementwise of [R] tensors (bootstrap resamples); None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return torch.stack(values).mean(0) if torch.is_tensor(values[0]) else sum(values) / len(values)


def _observed(row: dict) -> bool:
    queries = row.get("queries")
    return queries is not None and (torch.is_tensor(queries) or queries > 0)


def summarize(layers: list[dict], first_layer: int) -> dict:
    """Head- and layer-averaged numbers for the table: before the MAs appear vs. from their first layer on. `layers`
    are AttentionSinks rows: the summary's (numbers, per-head lists) or `resampled`'s (the same with a leading [R])."""
    def head_mean(row, key):
        value = row.get(key)
        if isinstance(value, list):
            return _mean(value)
        return value.mean(-1) if torch.is_tensor(value) and value.dim() == 2 else value
    before = [row for row in layers if row["layer"] < first_layer and _observed(row)]
    after = [row for row in layers if row["layer"] >= first_layer and _observed(row)]
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
# the comparisons the study is about, each as a paired change from the original (same windows resampled)
CHANGES = columns(("sink_share_ma_layers_change", "sink share (MA layers) - original"),
                  ("logit_gap_ma_layers_change", "logit gap (MA layers) - original"))


@torch.no_grad()
def attention_pass(ctx, windows, sinks: list[int], label: str) -> AttentionSinks:
    batch_size = ctx.cfg.exp.attention_data.batch_size
    with AttentionSinks(ctx.loaded.sites, sinks) as probe:
        for batch in tqdm(windows.ids.split(batch_size), desc=f"{label} attention", leave=False):
            ctx.loaded.model(batch.to(ctx.loaded.device))
    return probe


def with_intervals(probe: AttentionSinks, layers: list[dict], first_layer: int, weights: torch.Tensor
                   ) -> tuple[dict, dict]:
    """The table's numbers over every window (from `layers`, the probe's summary), each with its bootstrap interval
    over windows (`<key>_ci`), and the resampled values ({key: [R]}) for paired comparisons."""
    point = summarize(layers, first_layer)
    samples = summarize(probe.resampled(weights), first_layer)
    intervals = {interval_key(key): percentile_interval(value.numpy()) if value is not None else None
                 for key, value in samples.items()}
    return {**point, **intervals}, samples


def paired_changes(rows: list[dict], samples: dict, baseline: str = "original") -> dict:
    """{variant: {key: {change: variant's value - baseline's, change_ci: its paired bootstrap interval}}} for every
    number of the table."""
    base = next((row for row in rows if row["variant"] == baseline), None)
    if base is None:
        return {}
    changes = {}
    for row in rows:
        if row["variant"] == baseline:
            continue
        changes[row["variant"]] = {}
        for key in (column.key for column in COLUMNS[1:]):
            if row.get(key) is None or base.get(key) is None:
                continue
            resampled = samples.get(row["variant"]), samples.get(baseline)
            ci = (percentile_interval((resampled[0][key] - resampled[1][key]).numpy())
                  if all(r is not None and r[key] is not None for r in resampled) else [math.nan, math.nan])
            changes[row["variant"]][key] = {"change": row[key] - base[key], "change_ci": ci}
    return changes


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

    rows, details, samples, weights = [], {}, {}, None
    for variant, names in cfg.variants.items():
        with ctx.edit(list(names), context) as session:
            probe = attention_pass(ctx, windows, sinks, variant)
            edits = list(session.log)
        if weights is None and probe.bootstrap_units() >= 2:  # drawn once: every variant at the same windows (paired)
            weights = torch.from_numpy(resample_weights(probe.bootstrap_units()))
        layers = probe.summary()
        if weights is None:
            numbers, samples[variant] = summarize(layers, first_layer), None
        else:
            numbers, samples[variant] = with_intervals(probe, layers, first_layer, weights)
        rows.append({"variant": variant, **numbers})
        details[variant] = {"interventions": list(names), "edits": edits, "layers": layers}
    paired = paired_changes(rows, samples)
    for row in rows:
        for column in CHANGES:
            key = column.key.removesuffix("_change")
            if key in paired.get(row["variant"], {}):
                change = paired[row["variant"]][key]
                row[column.key], row[interval_key(column.key)] = change["change"], change["change_ci"]

    caption = (f"Attention toward the MA tokens (positions {sinks}; first MA layer {first_layer}) over "
               f"{windows.meta['windows']} windows of {windows.meta['seqlen']} tokens ({protocol.dataset} "
               f"{protocol.split}); means over heads and layers; queries after the last sink position only; "
               "logit gap = mean logit to sink keys minus mean logit to the other visible keys; rel. var = "
               "E||x - Ex||^2 / E||x||^2 of each head's output part across queries and sequences; dir. var = "
               "1 - ||E x/||x|| ||^2, the same for its direction alone; intervals: percentile bootstrap over the "
               "windows, changes paired (the same resampled windows for both variants)")
    return {
        "massive_activations": {"used": [m.describe() for m in found], "origin": origin, "notes": notes},
        "sink_positions": sinks, "first_ma_layer": first_layer,
        "attention_data": windows.meta, "ma_means": means,
        "variants": details, "paired_changes": paired, "ci_method": BOOTSTRAP,
        "table": Table(COLUMNS + CHANGES, rows, index="variant", caption=caption).to_dict(),
    }
