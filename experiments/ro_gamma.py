"""Paper RO: channel-wise outliers come from the norms' gain gamma; reset the outlier gains and see what is left.

1. Gain outliers of every norm (BERT Busters' rule in the family's gain convention) and, on the original model,
   the channel-wise activation outliers at every norm output and linear input (LLM.int8's rule and a relative one);
   whether the gain-outlier channels are the activation-outlier channels.
2. Per variant (exp.variants: gamma resets and their random-channel controls, each applied to the original model):
   the channel outliers again, PPL on the eval suite (zero-shot when it has tasks) and W8A8 PPL (exp.w8a8 applied on
   top). Every edit is undone; the runner checks the weights hash.
"""
from __future__ import annotations

from outlierlab.errors import ConfigError
from outlierlab.evals.ppl import ratio_interval
from outlierlab.probes.channel_outliers import (
    ChannelStats,
    GammaCriterion,
    OutlierCriterion,
    channel_outliers,
    channel_points,
    coincidence,
    criteria_from_config,
    forward_windows,
    gamma_outliers,
    gamma_outliers_record,
)
from outlierlab.studies.variants import ZERO_SHOT, ratios_with_intervals, scores, window_nll
from outlierlab.tables import Column, Table, columns, interval_key


def criteria(cfg) -> tuple[OutlierCriterion, GammaCriterion]:
    return criteria_from_config(cfg.exp)


def check(cfg, plan) -> None:
    criteria(cfg)
    for name in cfg.exp.w8a8:
        if name not in plan.interventions:
            raise ConfigError(f"exp.w8a8: unknown intervention '{name}' (this exp defines: "
                              f"{', '.join(plan.interventions)})")
    unknown = sorted(set(cfg.exp.w8a8_protocols) - set(cfg.eval.ppl))
    if unknown:
        raise ConfigError(f"exp.w8a8_protocols: {', '.join(unknown)} not in the eval suite ({', '.join(cfg.eval.ppl)})")


def measure_channels(ctx, criterion: OutlierCriterion) -> dict:
    """Channel statistics on the probe windows for the model as it is now, and the outlier features they give."""
    windows = ctx.data_windows("probe")
    with ChannelStats(ctx.loaded.sites, channel_points(ctx.loaded.sites), criterion) as stats:
        forward_windows(ctx.loaded, windows.ids, ctx.cfg.exp.data.probe.batch_size, desc="channel stats")
    summary = stats.summary()
    return {"summary": summary,
            "features": {which: channel_outliers(summary, criterion, which) for which in ("absolute", "relative")}}


def _hidden_points(summary: dict, hidden_size: int) -> list[str]:
    return [p for p, row in summary.items() if row["channels"] == hidden_size and p.startswith("layers.")]


def row_for(variant: str, detail: dict, protocols: list[str], hidden_size: int) -> dict:
    channels = detail["channels"]
    summary = channels["summary"]
    hidden = _hidden_points(summary, hidden_size)
    row = {"variant": variant,
           "channels_reset": sum(e.get("channels_reset", 0) for e in detail["edits"]
                                 if e.get("edit") == "reset_norm_gamma"),
           "int8_features": len(channels["features"]["absolute"]["hidden"]["features"]),
           "relative_features": len(channels["features"]["relative"]["hidden"]["features"]),
           "outlier_channels_per_site": sum(summary[p]["absolute"]["count"] for p in hidden) / max(len(hidden), 1),
           "max_abs_x_norm_out": max((summary[p]["max_abs"] for p in summary if ".norm" in p or p == "final_norm.out"),
                                   default=None)}
    scored = scores(detail, protocols)  # PPL per protocol (and the zero-shot mean, last in the row)
    zero_shot = {ZERO_SHOT.key: scored.pop(ZERO_SHOT.key)} if ZERO_SHOT.key in scored else {}
    w8a8 = {}
    for key, value in detail["w8a8"].items():  # W8A8 PPL with its interval over the same windows
        w8a8[f"w8a8_{key}"] = value["ppl"]
        if value.get("ppl_ci"):
            w8a8[interval_key(f"w8a8_{key}")] = value["ppl_ci"]
        float_ppl = detail["ppl"].get(key, {})
        if float_ppl.get("ppl"):  # what W8A8 costs this variant: paired over the same windows
            w8a8[f"w8a8_{key}_x_fp"] = value["ppl"] / float_ppl["ppl"]
            if value.get("window_nll") and float_ppl.get("window_nll"):
                w8a8[interval_key(f"w8a8_{key}_x_fp")] = ratio_interval(value["window_nll"], float_ppl["window_nll"])
    return {**row, **scored, **w8a8, **zero_shot}


def _observer(ctx, outlier: OutlierCriterion):
    """What ctx.evaluate measures beside PPL for each variant: channel outliers, and PPL with exp.w8a8 on top."""
    def observe(label):
        def measure():
            channels = measure_channels(ctx, outlier)
            with ctx.edit(list(ctx.cfg.exp.w8a8), {}):
                w8a8 = ctx.perplexities(label=f"{label} W8A8", keys=list(ctx.cfg.exp.w8a8_protocols))
            return {"channels": channels, "w8a8": {k: {key: v.get(key) for key in ("ppl", "ppl_ci", "window_nll")}
                                                   for k, v in w8a8.items()}}
        return measure
    return observe


def _columns(ctx) -> list[Column]:
    return columns("variant", ("channels_reset", "channels reset"), ("int8_features", "int8 features"),
                   ("relative_features", "relative features"), ("outlier_channels_per_site", "outlier ch./site"),
                   ("max_abs_x_norm_out", "max |x| norm out"), *ctx.cfg.eval.ppl, ("x_original", "x original"),
                   *(Column(f"w8a8_{k}", f"W8A8 {k}") for k in ctx.cfg.exp.w8a8_protocols),
                   *(Column(f"w8a8_{k}_x_fp", f"W8A8 / FP {k}") for k in ctx.cfg.exp.w8a8_protocols),
                   *([("zero_shot_mean", "zero-shot mean")] if ctx.cfg.eval.get("zeroshot") else []))


def w8a8_protocol(exp) -> str:
    """What exp.w8a8 quantizes, read from its interventions' config (the caption states the protocol that ran)."""
    parts = []
    for name in exp.w8a8:
        step = exp.interventions[name]
        if "granularity" in step:
            parts.append(f"INT{step.bits} activations per {step.granularity}")
        elif "block" in step:
            parts.append(f"INT{step.bits} weights per {'output channel' if step.block == 'channel' else step.block}")
    return " + ".join(parts) or "none"


def _caption(ctx, gammas, details, outlier, gamma_rule, probe) -> str:
    offset = ctx.loaded.sites.family.norm_gain_offset
    consistent = {role: found["consistent"] for role, found in gammas.items()}
    reset_roles = sorted({norm.split(".")[-1] for detail in details.values() for edit in detail["edits"]
                          if edit.get("edit") == "reset_norm_gamma" for norm in edit["norms"]})
    return (f"{ctx.cfg.model.name}: gain outliers (> {gamma_rule.sigma} sigma, 'high' tail for the resets; gain ="
            f" {offset:g} + w) reset per norm and layer, in the norms {', '.join(reset_roles) or 'none'}. int8 / relative features: hidden-size channels that are "
            f"outliers (>= {outlier.position_share:.0%} of positions with |x| >= {outlier.min_abs:g}, or >= "
            f"{outlier.median_ratio:g} x the token's median |x|) in >= {outlier.layer_share:.0%} of the layers, "
            f"over every norm output and linear input; outlier ch./site: mean number of such channels per "
            f"hidden-size site; measured on {probe['windows']} x {probe['seqlen']} tokens of {probe['dataset']} "
            f"{probe['split']}. PPL {ctx.cfg.eval.name}; W8A8 = {w8a8_protocol(ctx.cfg.exp)}. BERT Busters' outlier dims (both tails, >= {gamma_rule.layer_share:.0%} of layers): "
            + "; ".join(f"{role} {chs}" for role, chs in consistent.items()))


def run(ctx) -> dict:
    exp = ctx.cfg.exp
    outlier, gamma_rule = criteria(ctx.cfg)
    sites = ctx.loaded.sites
    gammas = gamma_outliers(sites, gamma_rule)
    protocols, hidden_size = list(ctx.cfg.eval.ppl), ctx.loaded.model.config.hidden_size
    observe = _observer(ctx, outlier)
    details, rows = {}, []
    for variant, names in exp.variants.items():
        details[variant] = ctx.evaluate(list(names), {}, label=variant, observe=observe(variant))
        rows.append(row_for(variant, details[variant], protocols, hidden_size))
    ratios_with_intervals(rows, window_nll(details, protocols[0]), protocols[0])
    original = details.get("original", {}).get("channels")
    overlap = coincidence(gammas, original["summary"]) if original else None
    # the same against the relative rule's outlier channels (for models whose norm outputs are far below |x| = 6)
    overlap_relative = coincidence(gammas, original["summary"], "relative") if original else None
    probe = ctx.data_windows("probe").meta
    caption = _caption(ctx, gammas, details, outlier, gamma_rule, probe)
    return {"gamma_outliers": gamma_outliers_record(gammas, gamma_rule, sites.family.norm_gain_offset),
            "coincidence": overlap, "coincidence_relative": overlap_relative, "criterion": vars(outlier),
            "probe_data": probe, "variants": details,
            "table": Table(_columns(ctx), rows, index="variant", caption=caption).to_dict()}
