"""Paper SW Table 2: the super-weight index of one model, with detection and importance as separate columns.

1. Detect super weights data-free (one prompt; detect, zero, detect again) and find the massive-activation channel
   on the same prompt (ResidualStats): a super weight's row should be that channel.
2. Candidates = detected super weights, the model YAML's registry, and the spike that stopped detection (it had a
   location but failed the one-weight test). Each gets its value, magnitude rank, z-score and input/output spikes
   on the unedited model.
3. Importance: PPL with each candidate alone zeroed, and with all detected ones zeroed together. A model can show
   the super-weight pattern without a single point of failure when several layers write the same activation.
"""
from __future__ import annotations

from outlierlab.interventions.base import StudyContext
from outlierlab.models.coords import SuperWeight
from outlierlab.probes.super_weight import (
    describe_weights,
    detect_super_weights,
    massive_activation,
)
from outlierlab.studies.variants import ratios_with_intervals, scores
from outlierlab.tables import Table, columns

ORIGINAL = "none (original)"  # the table's row of the unedited model


def _detected_note(weight, detected, rejected) -> str:
    if weight in detected:
        return f"yes (iteration {detected[weight]['iteration']})"
    if rejected and weight == SuperWeight(*rejected["coord"]):
        return f"no: stopped here (share {rejected['contribution_share']:.2f}, z {rejected['weight_zscore']:.1f})"
    return "no"


def _candidate_row(weight, fact, detected, rejected, registry, activation) -> dict:
    return {"candidate": str(weight), "value": fact["value"], "rank": fact["magnitude_rank"],
            "z_score": fact["weight_zscore"], "input_spike": fact["input_spike"],
            "output_spike": fact["output_spike"], "detected": _detected_note(weight, detected, rejected),
            "registry": "yes" if weight in registry else ("no" if registry else "none listed"),
            "row_is_ma_channel": ("yes" if weight.row == activation["channel"] else "no") if activation["massive"]
            else "no MA"}


def _describe_activation(activation: dict) -> str:
    if activation["massive"]:
        return (f"massive activation: channel {activation['channel']}, {activation['value']:.0f} after "
                f"layers[{activation['layer']}] at token {activation['position']} "
                f"({activation['ratio_to_median']:.0f}x the median)")
    return f"no massive activation (largest |h| {activation['abs']:.1f}, {activation['ratio_to_median']:.0f}x median)"


def _importance(ctx, candidates: list[SuperWeight], detected: list[SuperWeight]) -> dict[str, dict]:
    """PPL on every protocol of the original model, with each candidate alone zeroed, and with every detected one
    zeroed ("all detected"): importance is measured, not inferred from detection."""
    importance = {"original": ctx.perplexities(label="original")}
    for weight in candidates:
        with ctx.edit(["zero_sw"], StudyContext(super_weights=[weight])):
            importance[str(weight)] = ctx.perplexities(label=f"zero {weight}")
    if detected:
        with ctx.edit(["zero_sw"], StudyContext(super_weights=detected)):
            importance["all detected"] = ctx.perplexities(label="zero all detected")
    return importance


def _caption(ctx, detection: dict, activation: dict, importance: bool) -> str:
    caption = (f"{ctx.cfg.model.name}: super-weight candidates (layer, row, col) of down_proj; "
               f"{_describe_activation(activation)}; detection stopped: {detection['stop_reason']}; spikes on the "
               f"prompt \"{ctx.cfg.exp.detection.prompt}\"")
    if importance:
        caption += f"; PPL ({ctx.cfg.eval.name}) with that weight alone zeroed"
    if ctx.loaded.info.get("kind") == "gguf":
        caption += "; weight values are dequantized GGUF block-quantized values"
    return caption


def run(ctx) -> dict:
    cfg = ctx.cfg.exp
    detection = detect_super_weights(ctx.loaded, **cfg.detection)
    detected = {SuperWeight(*entry["coord"]): entry for entry in detection["super_weights"]}
    rejected = detection["rejected"]
    registry = list(ctx.registry_super_weights)
    candidates = list(dict.fromkeys([*detected, *registry,
                                     *([SuperWeight(*rejected["coord"])] if rejected else [])]))
    facts = describe_weights(ctx.loaded, candidates, cfg.detection.prompt)
    activation = massive_activation(ctx.loaded, cfg.detection.prompt, **cfg.massive_activation)

    protocols = list(ctx.cfg.eval.get("ppl") or {}) if cfg.importance else []
    importance = _importance(ctx, candidates, list(detected)) if protocols else {"original": {}}

    def ppl(key: str) -> dict:  # PPL per protocol with its interval over windows
        return scores({"ppl": importance[key]}, protocols)
    rows = [{"candidate": ORIGINAL, **ppl("original")}] if protocols else []
    rows += [{**_candidate_row(weight, fact, detected, rejected, registry, activation),
              **(ppl(str(weight)) if protocols else {})} for weight, fact in zip(candidates, facts)]
    if protocols and detected:
        rows.append({"candidate": "all detected", **ppl("all detected")})
    if protocols:  # x original with its paired interval over the same windows
        nll = {(ORIGINAL if key == "original" else key): result[protocols[0]].get("window_nll")
               for key, result in importance.items()}
        ratios_with_intervals(rows, nll, protocols[0], index="candidate", baseline=ORIGINAL)

    shown = columns("candidate", "value", "rank", ("z_score", "z-score"), ("input_spike", "input spike"),
                    ("output_spike", "output spike"), "detected", "registry", ("row_is_ma_channel", "row = MA channel"),
                    *protocols, *([("x_original", "x original")] if protocols else []))
    caption = _caption(ctx, detection, activation, bool(protocols))
    return {
        "super_weights": {"detected": [str(w) for w in detected], "registry": [str(w) for w in registry],
                          "registry_agrees": sorted(detected) == sorted(registry) if registry else None,
                          "rows_equal_ma_channel": [w.row == activation["channel"] for w in detected]
                          if activation["massive"] else None},
        "candidates": [{**fact, "detected": weight in detected, "in_registry": weight in registry,
                        "detection": detected.get(weight) or (rejected if rejected and weight == SuperWeight(
                            *rejected["coord"]) else None)} for weight, fact in zip(candidates, facts)],
        "massive_activation": activation,
        "detection": {k: v for k, v in detection.items() if k != "iterations"},
        "detection_iterations": detection["iterations"],
        "importance": importance,
        "table": Table(shown, rows, index="candidate", caption=caption).to_dict(),
    }
