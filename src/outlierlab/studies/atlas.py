"""The outlier atlas's index row: one record (+exp=atlas) -> one row of the index table. The recipe prints it
(experiments/atlas.py) and reports/atlas.py tables every model's row; both take it from here.
"""
from __future__ import annotations

from outlierlab.tables import Column

# the index table's columns: the row atlas_row() makes, keyed by column key
COLUMNS = [Column("model", "model"), Column("bos", "BOS"), Column("ma_channels", "MA channels"),
           Column("ma_first_layer", "MA first layer"), Column("ma_tokens", "MA tokens"),
           Column("ma_magnitude", "MA magnitude"), Column("ma_x_median", "MA x median"),
           Column("ma_share", "MA share"), Column("ma_made_by", "MA made by"), Column("sw_detected", "SW detected"),
           Column("sw_z_score", "SW z-score"), Column("sw_spikes_in_out", "SW spikes in/out"),
           Column("sw_ppl_x_original", "SW PPL x"), Column("sw_row_is_ma_channel", "SW row = MA channel"),
           Column("int8_features", "int8 features"),
           Column("int8_channels_per_layer_max", "int8 channels per layer (max)"),
           Column("norm_gain_max", "norm gain max"), Column("sink_rate", "sink rate"),
           Column("outlier_tokens", "outlier tokens"), Column("registry", "registry"),
           Column("super_experts", "super experts"), Column("sw_in_experts", "SW in experts")]
# Columns only a mixture of experts fills: a table of dense models leaves them out.
MOE_COLUMNS = ("super_experts", "sw_in_experts")


def columns_for(rows: list[dict]) -> list[Column]:
    """COLUMNS, less the MoE columns when no row fills them (a table of dense models)."""
    filled = {key for row in rows for key in row}
    return [column for column in COLUMNS if column.key not in MOE_COLUMNS or column.key in filled]


def atlas_row(record: dict) -> dict:
    """The index-table row of one atlas record (also what the run prints): MAs one entry per channel."""
    ma = {}
    for location in record["massive_activations"]["consistent"]:
        entry = ma.setdefault(location["channel"], {"first": location["first_layer"], "roles": [], "peak": 0.0,
                                                    "ratio": 0.0, "share": 0.0})
        entry["first"] = min(entry["first"], location["first_layer"])
        entry["roles"].append(location["role"])
        entry["peak"] = max(entry["peak"], abs(location["peak_mean"]))
        entry["ratio"] = max(entry["ratio"], location["peak_ratio_to_median"])
        entry["share"] = max(entry["share"], location["share_at_first_layer"])
    channels = sorted(ma, key=lambda c: (ma[c]["first"], c))
    def each(fmt):
        return ", ".join(fmt(c, ma[c]) for c in channels) or "none"
    candidates = record["super_weights"]["candidates"]
    detected = [c for c in candidates if c["detected"]]
    gains = record["norm_gains"]
    top_gain = max(gains, key=lambda g: g["max_ratio_to_median"]) if gains else None
    channel_outliers = record["channel_outliers"]
    return {
        "model": record["model"]["name"], "bos": record["bos"],
        "ma_channels": each(lambda c, e: str(c)), "ma_first_layer": each(lambda c, e: str(e["first"])),
        "ma_tokens": each(lambda c, e: "/".join(e["roles"])),
        "ma_magnitude": each(lambda c, e: f"{e['peak']:.0f}"), "ma_x_median": each(lambda c, e: f"{e['ratio']:.0f}"),
        "ma_share": each(lambda c, e: f"{e['share']:.2f}"),
        "ma_made_by": "; ".join(f"ch {o['channel']}: {o['made_by']}" for o in record["massive_activations"]["origins"])
        or "no MA",
        "sw_detected": ", ".join(c["label"] for c in detected) or "none",
        "sw_z_score": ", ".join(f"{c['weight_zscore']:.0f}" for c in detected),
        "sw_spikes_in_out": ", ".join(f"{c['input_spike']:.0f}/{c['output_spike']:.0f}" for c in detected),
        "sw_ppl_x_original": ", ".join(_ratio_text(c) for c in detected if c.get("ppl_ratio")),
        "sw_row_is_ma_channel": ", ".join("yes" if c["row_is_ma_channel"] else "no" for c in detected
                                         if c["row_is_ma_channel"] is not None),
        "int8_features": len(channel_outliers["features"]),
        "int8_channels_per_layer_max": max(channel_outliers["count_per_layer"], default=0),
        "norm_gain_max": (f"{top_gain['max_gain']:.3g} = {top_gain['max_ratio_to_median']:.0f}x median "
                          f"({top_gain['name']}, ch {top_gain['max_channel']}, gain {top_gain['parametrisation']})")
        if top_gain else "",
        "sink_rate": record["attention_sinks"]["sink_rate"],
        "outlier_tokens": _outlier_tokens(record["outlier_tokens"]),
        "registry": _registry(record["registry"]),
        **_experts(record.get("experts")),
    }


def _ratio_text(candidate: dict) -> str:
    """x original of zeroing one super weight, with its paired interval over the windows when the record has it."""
    key = next(iter(candidate["ppl_ratio"]))
    interval = (candidate.get("ppl_ratio_ci") or {}).get(key)
    ratio = f"{candidate['ppl_ratio'][key]:.2f}"
    return f"{ratio} [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ratio


def _experts(experts: dict | None) -> dict:
    """A mixture of experts' super experts (layer.expert) and super weights inside experts; nothing for a dense
    model (its row has no MoE columns)."""
    if experts is None:
        return {}
    return {"super_experts": ", ".join(f"{e['layer']}.{e['expert']}" for e in experts["super_experts"]["super_experts"])
            or "none", "sw_in_experts": ", ".join(w["label"] for w in experts["super_weights"]["super_weights"]) or "none"}


def _outlier_tokens(per_layer: list[dict]) -> str:
    """PrefixQuant outlier tokens as 'pos P: layers a, b' for the most common positions."""
    by_position: dict[int, list[int]] = {}
    for row in per_layer:
        for position, _count in row["positions"]:
            by_position.setdefault(position, []).append(row["layer"])
    shown = sorted(by_position.items(), key=lambda item: -len(item[1]))[:2]
    return "; ".join(f"pos {p}: layers {', '.join(map(str, layers))}" for p, layers in shown) or "none"


def _registry(registry: dict) -> str:
    """How much of the model YAML's registry the atlas found again."""
    parts = []
    if registry["super_weights"]:
        parts.append(f"SW {sum(registry['super_weights_detected'])}/{len(registry['super_weights'])} detected")
    if registry["massive_activations"]:
        parts.append(f"MA {sum(registry['massive_activations_found'])}/{len(registry['massive_activations'])} found")
    return ", ".join(parts) or "none listed"
