"""The outlier atlas: every outlier kind of one model, from one pass over the data.

1. One forward per window of exp.data.corpus with every probe hooked: massive activations (ResidualStats, paper MA
   criterion, by token role), outlier tokens (PrefixQuant), channel-wise outliers (LLM.int8) and attention sinks
   (Gu et al. 2024). The BOS policy is the model's (model.bos, `auto` = as its tokenizer does).
2. Super weights: data-free detection on one prompt (conf/probe/sw_detection.yaml), every candidate (detected, in the
   model YAML's registry, or where detection stopped) with value, z-score, spikes, and importance (PPL with it alone
   zeroed). Detected is not important: both are reported.
3. Where each consistent MA comes from: the block's step at (position, channel) against its down_proj output; a
   step down_proj does not make is traced to the gains of the block's norms (measured from the modules, so a
   (1 + w) gain is read right). An MA not made by down_proj gets no super weight.
4. The model YAML's registry (super_weights, massive_activations) beside what was found.
5. A mixture of experts: its super experts (Su et al.; probes/super_experts.py, in the same pass) and the super
   weights inside its experts (probes/expert_super_weights.py); the dense probes skip its MoE layers' down_proj.
"""
from __future__ import annotations

import contextlib

import torch
from omegaconf import OmegaConf

from outlierlab.errors import ConfigError
from outlierlab.evals.ppl import ratio_interval
from outlierlab.models import massive
from outlierlab.models.coords import SuperWeight
from outlierlab.probes.layer_major import observe_windows
from outlierlab.probes.massive_activations import (
    MACriterion,
    delimiter_mask,
    find_massive_activations,
    locations,
    position_roles,
)
from outlierlab.probes.outliers import (
    ChannelCriterion,
    ChannelOutliers,
    OutlierTokens,
    SinkCriterion,
    SinkRate,
    TokenCriterion,
    gains_at,
    massive_activation_origin,
    norm_gains,
)
from outlierlab.probes.expert_super_weights import detect_expert_super_weights
from outlierlab.probes.stats import ResidualStats
from outlierlab.probes.super_experts import ExpertProfile, SuperExpertCriterion, find_super_experts
from outlierlab.probes.super_weight import (
    describe_weights,
    detect_super_weights,
    massive_activation,
)
from outlierlab.studies.atlas import atlas_row, columns_for
from outlierlab.tables import Table


def _criterion(kind, spec):
    return kind(**{key: value for key, value in spec.items() if key != "provenance"})


def check(cfg, plan) -> None:
    exp = cfg.exp
    if "corpus" not in (exp.get("data") or {}):
        raise ConfigError("exp.data.corpus is missing (the windows the atlas is computed on)")
    for key, kind in (("outlier_tokens", TokenCriterion), ("channel_outliers", ChannelCriterion),
                      ("attention_sinks", SinkCriterion)):
        try:
            _criterion(kind, exp[key])
        except TypeError as error:
            raise ConfigError(f"exp.{key}: {error}") from None
    if not 0 < exp.consistent_share <= 1:
        raise ConfigError(f"exp.consistent_share={exp.consistent_share} must be in (0, 1]")
    unknown = [key for key in exp.importance if key not in (cfg.eval.get("ppl") or {})]
    if unknown:
        raise ConfigError(f"exp.importance: {', '.join(unknown)} is not a PPL protocol of eval={cfg.eval.name} "
                          f"(it has: {', '.join(cfg.eval.get('ppl') or {}) or 'none'})")


def _one_pass(ctx, windows, bos: str) -> tuple:
    exp, loaded = ctx.cfg.exp, ctx.loaded
    criterion = MACriterion(min_abs=exp.massive_activation.min_abs, median_ratio=exp.massive_activation.min_ratio)
    is_delimiter = delimiter_mask(loaded.tokenizer, list(exp.delimiters))
    residual = ResidualStats(loaded.sites, k=1, exceedance=criterion.exceedance())
    tokens = OutlierTokens(loaded.sites, _criterion(TokenCriterion, exp.outlier_tokens))
    channels = ChannelOutliers(loaded.sites, _criterion(ChannelCriterion, exp.channel_outliers))
    # A model whose attention cannot be observed (Falcon) still gets the rest of its atlas; the sinks say why not.
    sinks = SinkRate(loaded.sites, _criterion(SinkCriterion, exp.attention_sinks)) \
        if loaded.sites.attention_observable else None
    experts = ExpertProfile(loaded.sites) if loaded.sites.moe_layers else None

    def observe(batch):  # before each batch goes through (each block of it, when the pass is layer-major)
        residual.observe(batch, position_roles(batch, is_delimiter, bos))
        tokens.observe(batch)

    with torch.no_grad(), residual, tokens, channels, sinks or contextlib.nullcontext(), \
            experts or contextlib.nullcontext():
        observe_windows(loaded, windows.ids, exp.data.corpus.batch_size, desc="atlas: one pass", before=observe)
    found = find_massive_activations(residual.summary(), residual.sequences, criterion,
                                     lambda token: loaded.tokenizer.decode([token]))
    return (residual, found, tokens.summary(), channels.summary(), sinks.summary() if sinks else _no_sinks(loaded),
            experts.summary() if experts else None)


def _experts(ctx, profile: list[dict] | None, windows) -> dict | None:
    """A mixture of experts' super experts (from the pass's profile) and super weights inside its experts."""
    if profile is None:
        return None
    exp, loaded = ctx.cfg.exp, ctx.loaded
    found = find_super_experts(profile, loaded.sites.num_layers, _criterion(SuperExpertCriterion, exp.super_experts))
    rule = {key: exp.detection[key] for key in ("spike_layer_ratio", "min_share", "min_weight_zscore")}
    weights = detect_expert_super_weights(loaded, windows.ids[:4], **rule, provenance=exp.detection.provenance)
    return {"super_experts": found, "super_weights": weights, "profile": profile}


def _no_sinks(loaded) -> dict:
    return {"observable": False, "reason": f"{loaded.info['model_type']} attention does not go through transformers' "
            "AttentionInterface, so its attention probabilities cannot be observed",
            "sink_rate": None, "sink_heads": None, "heads": None,
            "per_layer": [{"layer": layer, "share": None} for layer in range(loaded.sites.num_layers)]}


def _origin(ctx, location: dict, first_window: torch.Tensor, gains: list[dict], detected: dict) -> dict:
    """Who makes one consistent MA: down_proj (a super weight if one was detected there) or a norm's gain."""
    layer, channel = location["first_layer"], location["channel"]
    position = int(location["positions"][0][0])
    origin = massive_activation_origin(ctx.loaded, first_window, layer, channel, position)
    norms = sorted(gains_at(gains, channel, layer), key=lambda n: -n["ratio_to_median"])
    origin["norm_gains_at_channel"] = norms
    weights = [w for w in detected if w.layer == layer and w.row == channel]
    if origin["down_proj_share_of_step"] >= ctx.cfg.exp.origin_share:
        origin["made_by"] = (f"super weight {weights[0]}" if weights else
                             f"down_proj of layers[{layer}] (no single weight detected)")
    elif norms and norms[0]["ratio_to_median"] >= 10:
        origin["made_by"] = (f"norm gain: {norms[0]['name']} gain {norms[0]['gain']:.0f} at channel {channel} "
                             f"({norms[0]['ratio_to_median']:.0f}x its median)")
    else:
        origin["made_by"] = (f"not down_proj (it carries {origin['down_proj_share_of_step']:.2f} of the step) "
                             "and no norm-gain outlier at the channel")
    origin["super_weight"] = str(weights[0]) if weights and "super weight" in origin["made_by"] else None
    return origin


def _super_weights(ctx, activation: dict) -> tuple[dict, list[dict], dict]:
    exp = ctx.cfg.exp
    detection = detect_super_weights(ctx.loaded, **exp.detection)
    detected = {SuperWeight(*entry["coord"]): entry for entry in detection["super_weights"]}
    rejected = detection["rejected"]
    registry = list(ctx.registry_super_weights)
    candidates = list(dict.fromkeys([*detected, *registry, *([SuperWeight(*rejected["coord"])] if rejected else [])]))
    facts = describe_weights(ctx.loaded, candidates, exp.detection.prompt)
    keys = list(exp.importance)
    original = ctx.perplexities(label="original", keys=keys) if keys and candidates else {}
    rows = []
    for weight, fact in zip(candidates, facts):
        row = {**fact, "detected": weight in detected, "in_registry": weight in registry,
               "stopped_here": bool(rejected) and weight == SuperWeight(*rejected["coord"]),
               "row_is_ma_channel": (weight.row == activation["channel"]) if activation["massive"] else None}
        if keys:
            with ctx.edit(["zero_sw"], {"super_weights": [weight]}):
                zeroed = ctx.perplexities(label=f"zero {weight}", keys=keys)
            row["ppl_zeroed"] = {key: zeroed[key]["ppl"] for key in keys}
            row["ppl_ratio"] = {key: zeroed[key]["ppl"] / original[key]["ppl"] for key in keys}
            row["ppl_ratio_ci"] = {key: ratio_interval(zeroed[key]["window_nll"], original[key]["window_nll"])
                                   for key in keys}  # paired over the same windows
        rows.append(row)
    return detected, rows, {"detection": {k: v for k, v in detection.items() if k != "iterations"},
                            "ppl_original": {key: original[key]["ppl"] for key in original}}


def _registry(ctx, consistent: list[dict], detected) -> dict:
    entries = ctx.cfg.model.get("massive_activations")
    entries = OmegaConf.to_container(entries) if entries else []
    listed, notes = massive.parse(entries, bos=ctx.loaded.bos)
    found_channels = {(r["first_layer"], r["channel"]) for r in consistent}
    registry_sw = [str(w) for w in ctx.registry_super_weights]
    return {"super_weights": registry_sw,
            "super_weights_detected": [w in {str(d) for d in detected} for w in registry_sw],
            "super_weight_provenance": [e.get("provenance") for e in ctx.cfg.model.get("super_weights") or []],
            "massive_activations": [m.describe() for m in listed], "notes": notes,
            "massive_activations_found": [all((m.first_layer, c) in found_channels for c in m.channels)
                                          for m in listed],
            "massive_activation_provenance": [e.get("provenance") for e in entries
                                              if e.get("bos") in (None, ctx.loaded.bos)]}


def _per_channel(consistent: list[dict]) -> list[dict]:
    """One location per MA channel, where it is most regular: the largest share of windows at its first layer,
    then the earliest layer (a fixed position such as BOS or the first token, where there is one)."""
    best: dict[int, dict] = {}
    for location in consistent:
        key = (-location["share_at_first_layer"], location["first_layer"])
        current = best.get(location["channel"])
        if current is None or key < (-current["share_at_first_layer"], current["first_layer"]):
            best[location["channel"]] = location
    return sorted(best.values(), key=lambda r: (r["first_layer"], r["channel"]))


def run(ctx) -> dict:
    exp, loaded = ctx.cfg.exp, ctx.loaded
    windows = ctx.data_windows("corpus")
    bos = windows.meta["bos"]
    residual, found, tokens, channels, sinks, profile = _one_pass(ctx, windows, bos)
    consistent = locations(found, exp.consistent_share)
    sporadic = locations([entry for entry in found if entry["share"] < exp.consistent_share])
    gains = norm_gains(loaded, exp.norm_gains.sigmas, exp.norm_gains.top)
    activation = massive_activation(loaded, exp.detection.prompt, **exp.massive_activation)
    detected, candidates, detection = _super_weights(ctx, activation)
    first_window = windows.ids[:1].to(loaded.device)
    origins = [_origin(ctx, location, first_window, gains, detected) for location in _per_channel(consistent)]
    residual_summary = residual.summary()
    per_layer = {
        "max_abs": [row["top"][0]["abs"] for row in residual_summary],
        "mean_top1": [row["mean_topk"][0] for row in residual_summary],
        "mean_median": [row["mean_median"] for row in residual_summary],
        "outlier_tokens": [row["outlier_tokens"] for row in tokens],
        "int8_channels": channels["count_per_layer"],
        "sink_share": [row["share"] for row in sinks["per_layer"]],
        "norm_max_gain": [max((abs(g["max_gain"]) for g in gains if g["layer"] == layer), default=None)
                          for layer in range(loaded.sites.num_layers)],
    }
    caption = (f"{ctx.cfg.model.name}: outlier atlas over {windows.meta['windows']} x {windows.meta['seqlen']} tokens "
               f"of {windows.meta['dataset']} (BOS {bos}); MA: paper MA criterion, consistent = in >= "
               f"{exp.consistent_share:.0%} of windows; SW: {exp.detection.preset} detection, PPL x = "
               f"{', '.join(exp.importance)} PPL with it zeroed / original; int8: LLM.int8 features; sink rate: "
               f"Gu et al. 2024")
    record = {
        "bos": bos, "bos_config": loaded.info.get("bos_config"),
        "criteria": {key: OmegaConf.to_container(exp[key]) for key in
                     ("massive_activation", "detection", "outlier_tokens", "channel_outliers", "attention_sinks",
                      "norm_gains", "super_experts")},
        "massive_activations": {"consistent": consistent, "sporadic": sporadic, "prompt": activation,
                                "origins": origins},
        "super_weights": {"candidates": candidates, **detection},
        "outlier_tokens": tokens, "channel_outliers": channels, "attention_sinks": sinks,
        "norm_gains": [{k: v for k, v in g.items() if k != "gain"} for g in gains],
        "registry": _registry(ctx, consistent, detected),
        "per_layer": per_layer,
        "experts": _experts(ctx, profile, windows),
    }
    row = atlas_row({**record, "model": {"name": ctx.cfg.model.name}})  # the runner adds "model" (loaded.info)
    record["table"] = Table(columns_for([row]), [row], index="model", caption=caption).to_dict()
    return record
