"""Paper MA Sec. 2, Figs. 1-2: massive activations in the residual stream.

1. Stream N windows of T tokens (exp.data.corpus) through the model; per layer fold the top-k and median |h| of
   each sequence, every activation that meets the MA criterion (grouped by channel and token role), and the
   per-(position, channel) mean and variance across sequences.
2. List the massive activations (layer, channel, role, positions, tokens, value, ratio to the median), mark the
   input-agnostic ones (std across sequences vs the layer's top-10% and median coordinates), and summarise them
   per (channel, role): first layer, value there, peak. Cross-check the channels with the super-weight rows.
3. Keep the |activation| surface of the paper's Fig. 1 prompt at a few layers for the 3-D figure.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from outlierlab.errors import ConfigError
from outlierlab.probes.layer_major import observe_windows
from outlierlab.probes.massive_activations import (
    MACriterion,
    activation_slices,
    coordinate_reference,
    delimiter_mask,
    find_massive_activations,
    fixed_position_trajectories,
    locations,
    mark_input_agnostic,
    position_roles,
    super_weight_rows,
)
from outlierlab.probes.stats import ResidualStats
from outlierlab.tables import Table, columns

LAYER_KEYWORDS = ("first_ma", "peak")


def check(cfg, plan) -> None:
    """Input checks before any weights load (called by the runner)."""
    exp = cfg.exp
    if "corpus" not in (exp.get("data") or {}):
        raise ConfigError("exp.data.corpus is missing (the windows the statistics are computed on)")
    try:
        MACriterion(**exp.criterion)
    except TypeError as error:
        raise ConfigError(f"exp.criterion: {error}") from None
    for key in ("min_abs", "median_ratio"):
        if not exp.criterion[key] > 0:
            raise ConfigError(f"exp.criterion.{key}={exp.criterion[key]} must be > 0")
    if not 0 <= exp.criterion.min_share <= 1:
        raise ConfigError(f"exp.criterion.min_share={exp.criterion.min_share} must be in [0, 1]")
    if not 0 < exp.consistent_share <= 1:
        raise ConfigError(f"exp.consistent_share={exp.consistent_share} must be in (0, 1]")
    if not isinstance(exp.k, int) or exp.k < 1:
        raise ConfigError(f"exp.k={exp.k} must be a positive integer")
    for layer in exp.prompt.layers:
        if not (layer in LAYER_KEYWORDS or (isinstance(layer, int) and layer >= 0)):
            raise ConfigError(f"exp.prompt.layers: {layer} is not a layer index or one of {', '.join(LAYER_KEYWORDS)}")


def resolve_layers(requested, first_ma: int | None, peak: int, num_layers: int) -> list[int]:
    layers = []
    for layer in requested:
        value = {"first_ma": first_ma, "peak": peak}.get(layer, layer)
        if value is None:
            continue  # no massive activation: "first_ma" names no layer
        if not 0 <= value < num_layers:
            raise ConfigError(f"exp.prompt.layers: layer {value} does not exist (model has {num_layers} layers)")
        if value not in layers:
            layers.append(value)
    return sorted(layers)


@torch.no_grad()
def stream(ctx, windows, criterion: MACriterion, bos: str) -> ResidualStats:
    """Fold every window into per-layer statistics (top-k, median, MA hits by channel and role, moments)."""
    cfg, loaded = ctx.cfg.exp, ctx.loaded
    is_delimiter = delimiter_mask(loaded.tokenizer, list(cfg.delimiters))
    stats = ResidualStats(loaded.sites, k=cfg.k, exceedance=criterion.exceedance(), moments=True)
    with stats:
        observe_windows(loaded, windows.ids, cfg.data.corpus.batch_size, desc="ma_stats",
                        before=lambda batch: stats.observe(batch, position_roles(batch, is_delimiter, bos)))
    return stats


def classify(found: list[dict], stats: ResidualStats, cfg) -> tuple[list[dict], list[dict]]:
    """Mark the input-agnostic MAs; group them per (channel, role) as consistent or sporadic. Returns (all groups,
    consistent groups)."""
    agnostic = cfg.input_agnostic
    references = {layer: coordinate_reference(*stats.coordinate_moments(layer), agnostic.top_fraction,
                                              agnostic.median_band)
                  for layer in sorted({entry["layer"] for entry in found})}
    mark_input_agnostic(found, references, agnostic.max_relative_std)
    consistent = locations(found, cfg.consistent_share)
    sporadic = locations([entry for entry in found if entry["share"] < cfg.consistent_share])
    for kind, group in (("consistent", consistent), ("sporadic", sporadic)):
        for record in group:
            record["kind"] = kind
    return consistent + sporadic, consistent


def layer_rows(summary: list[dict], found: list[dict], k: int, decode) -> list[dict]:
    layers = [{"layer": row["layer"], "top1": row["mean_topk"][0], "top2": row["mean_topk"][min(1, k - 1)],
               "top3": row["mean_topk"][min(2, k - 1)], "median": row["mean_median"],
               "top1_over_median": row["mean_topk"][0] / row["mean_median"] if row["mean_median"] > 0 else None,
               "massive": sum(1 for e in found if e["layer"] == row["layer"]), "top": row["top"]}
              for row in summary]
    for row in layers:
        for entry in row["top"]:
            entry["decoded"] = decode(entry["token"])
    return layers


def table_row(record: dict, found: list[dict], known_channels: set[int]) -> dict:
    reference = next((e.get("reference") for e in found
                      if (e["layer"], e["channel"], e["role"]) == (record["peak_layer"], record["channel"],
                                                                    record["role"])), None) or {}
    return {
        "kind": record["kind"], "channel": record["channel"], "role": record["role"],
        "tokens": ", ".join(repr(text) for text, _ in record["tokens"][:3]),
        "first_layer": record["first_layer"], "value_at_first": record["value_at_first_layer"],
        "peak_layer": record["peak_layer"], "peak_mean": record["peak_mean"], "peak_std": record["peak_std"],
        "x_median": record["peak_ratio_to_median"], "share": record["peak_share"],
        "rel_std": record["peak_relative_std"],
        "rel_std_top10pct": reference.get("top", {}).get("relative_std"),
        "rel_std_median": reference.get("median", {}).get("relative_std"),
        "input_agnostic": record["peak_input_agnostic"],
        "sw_same_row": " ".join(record["super_weights_same_row"]),
        "in_registry": record["channel"] in known_channels}


COLUMNS = columns("kind", "channel", "role", "tokens", ("first_layer", "first layer"), ("value_at_first", "value at first"),
                  ("peak_layer", "peak layer"), ("peak_mean", "peak mean"), ("peak_std", "peak std"),
                  ("x_median", "x median"), "share", ("rel_std", "rel std"), ("rel_std_top10pct", "rel std top10%"),
                  ("rel_std_median", "rel std median"), ("input_agnostic", "input-agnostic"),
                  ("sw_same_row", "SW same row"), ("in_registry", "in registry"))


def run(ctx) -> dict:
    cfg, loaded = ctx.cfg.exp, ctx.loaded
    windows = ctx.data_windows("corpus")
    bos = windows.meta["bos"]
    criterion = MACriterion(**cfg.criterion)
    stats = stream(ctx, windows, criterion, bos)
    summary = stats.summary()

    def decode(token: int) -> str:
        return loaded.tokenizer.decode([token])
    found = find_massive_activations(summary, stats.sequences, criterion, decode)
    records, consistent = classify(found, stats, cfg)
    super_weight_rows(records, ctx.registry_super_weights)
    trajectories = fixed_position_trajectories(stats, sorted({r["channel"] for r in consistent}), bos)
    layers = layer_rows(summary, found, cfg.k, decode)
    first_ma = min((record["first_layer"] for record in consistent), default=None)
    peak = max(layers, key=lambda row: row["top1"])["layer"]

    prompt_ids = loaded.encode(cfg.prompt.text)
    surface_layers = resolve_layers(cfg.prompt.layers, first_ma, peak, loaded.sites.num_layers)
    prompt = {"text": cfg.prompt.text, "bos": loaded.bos, "ids": prompt_ids,
              "tokens": [decode(t) for t in prompt_ids], "layers": surface_layers,
              "abs_activation": activation_slices(loaded, prompt_ids, surface_layers)}

    known = ctx.cfg.model.get("massive_activations")
    registry = OmegaConf.to_container(known, resolve=True) if known else []
    known_channels = {channel for entry in registry for channel in entry.get("channels", [])}
    protocol = windows.meta
    caption = (f"Massive activations (|h| > {criterion.min_abs:g} and > {criterion.median_ratio:g}x the median) "
               f"over {stats.sequences} x {protocol['seqlen']} tokens of {protocol['dataset']}, BOS {bos}; "
               f"layer = output of layers[i]; consistent = massive in >= {cfg.consistent_share:g} of the sequences "
               f"(first layer counted from there), sporadic = the rest; rel std = std / RMS across sequences")
    return {
        "criterion": {**OmegaConf.to_container(cfg.criterion), "provenance": "MA paper Sec. 2"},
        "bos": bos, "sequences": stats.sequences, "seqlen": protocol["seqlen"],
        "layers": layers, "massive_activations": found, "locations": records, "consistent_share": cfg.consistent_share,
        "trajectories": trajectories,
        "first_massive_layer": first_ma, "peak_layer": peak,
        "registry": {"known": registry, "super_weights": [str(w) for w in ctx.registry_super_weights]},
        "prompt": prompt,
        "table": Table(COLUMNS, [table_row(r, found, known_channels) for r in records],
                       index=["kind", "channel", "role"], caption=caption).to_dict(),
    }
