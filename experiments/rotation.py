"""Do super weights and massive activations survive QuaRot-style rotation, and what does each method buy (issue 25)?

1. Where the massive activation peaks on the detection prompt (original model): its layer and token.
2. The atlas probes and SW detection on the original and on the rotated model (studies/rotation.py), with the MA
   token's channel profile at that layer and token in both bases.
3. PPL of the original and the rotated float model, of every quantization setting x method (exp.settings x
   exp.methods: weights per output channel, activations per token) and of the pruning variants.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from outlierlab.interventions.base import StudyContext
from outlierlab.interventions.quant import QuantizeActivations, QuantizeWeights
from outlierlab.interventions.rotation import Rotate, rotation_refusal
from outlierlab.interventions.super_weight import NoSuperWeights
from outlierlab.models.coords import SuperWeight
from outlierlab.models.load import model_config
from outlierlab.models.sites import family_for
from outlierlab.probes.super_weight import detect_super_weights, massive_activation
from outlierlab.studies import rotation as study
from outlierlab.studies.rotation import caption, quant_protocol, reference_block
from outlierlab.studies.variants import VariantTable


def quantizers(exp, weight_bits: int, activation_bits: int, sw_aware: bool) -> list:
    """The weight and activation quantizers of one setting (SW-aware: clipped weights with the super weights
    restored, the largest |x| of each token held out)."""
    quant, aware = exp.quant, exp.quant.sw_aware
    return [QuantizeWeights(bits=weight_bits, block=quant.weights.block, zero_point=quant.weights.zero_point,
                            clip_zscore=aware.clip_zscore if sw_aware else None, restore_super_weights=sw_aware),
            QuantizeActivations(bits=activation_bits, granularity=quant.activations.granularity,
                                zero_point=quant.activations.zero_point, holdout=aware.holdout if sw_aware else 0)]


def check(cfg, plan) -> None:
    exp = cfg.exp
    for name, bits in exp.settings.items():
        if len(bits) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in bits):
            raise ValueError(f"exp.settings.{name}={list(bits)} must be [weight bits, activation bits], "
                             "integers from 2 to 8")
    for name, method in exp.methods.items():
        unknown = [n for n in method.before if n not in plan.interventions]
        if unknown:
            raise ValueError(f"exp.methods.{name}.before: unknown intervention {unknown[0]}")
    quantizers(exp, 8, 8, True)  # the quant keys, before any weights load
    if plan.source is not None:
        reason = rotation_refusal(family_for(model_config(cfg.model, plan.source)))
        if reason:
            raise ValueError(f"+exp=rotation on model {cfg.model.name}: {reason}")


def _probe(ctx, names: list, peak: dict) -> dict:
    exp, loaded = ctx.cfg.exp, ctx.loaded
    criteria = {key: OmegaConf.to_container(exp[key]) for key in
                ("massive_activation", "channel_outliers", "attention_sinks")}
    with ctx.edit(names) as session:
        measured = study.measure(loaded, ctx.data_windows("probe"), criteria)
        measured["ma_token"] = study.ma_token(loaded, exp.detection.prompt, peak["layer"], peak["position"])
        measured["super_weights"] = study.super_weights(loaded, OmegaConf.to_container(exp.detection))
        measured["edits"] = [{k: v for k, v in e.items() if k != "tensors"} for e in session.log]
    return measured


def _original_super_weights(ctx) -> list[SuperWeight]:
    if ctx.cfg.exp.super_weights != "detect" and ctx.registry_super_weights:
        return list(ctx.registry_super_weights)
    found = detect_super_weights(ctx.loaded, **OmegaConf.to_container(ctx.cfg.exp.detection))
    return [SuperWeight(*entry["coord"]) for entry in found["super_weights"]]


def _quantized(ctx, table: VariantTable, contexts: dict) -> dict:
    exp, details = ctx.cfg.exp, {}
    for setting, (weight_bits, activation_bits) in exp.settings.items():
        for method, spec in exp.methods.items():
            before = [ctx.plan.interventions[name] for name in spec.before]
            rotated = any(isinstance(intervention, Rotate) for intervention in before)
            names = [*before, *quantizers(exp, weight_bits, activation_bits, spec.sw_aware)]
            details.update(table.evaluate(ctx, {f"{setting}_{method}": names}, contexts[rotated]))
    return details


def run(ctx) -> dict:
    exp = ctx.cfg.exp
    peak = massive_activation(ctx.loaded, exp.detection.prompt, **exp.massive_activation)
    atlas = {"original": _probe(ctx, [], peak), "rotated": _probe(ctx, ["rotate"], peak)}
    original_sw = _original_super_weights(ctx)
    rotated_sw = [SuperWeight(*coord) for coord in atlas["rotated"]["super_weights"]["detected"]]
    calibration = ctx.protocol_windows("exp.calibration")
    reference = OmegaConf.to_container(exp.reference)
    table = VariantTable(list(ctx.cfg.eval.ppl), zeroshot=bool(ctx.cfg.eval.get("zeroshot")),
                         reference=reference_block(reference), beside=False)
    details = table.evaluate(ctx, {"original": [], "rotated": ["rotate"]}, StudyContext())
    contexts = {rotated: StudyContext(super_weights=weights, calibration_ids=calibration.ids)
                for rotated, weights in ((False, original_sw), (True, rotated_sw))}
    details.update(_quantized(ctx, table, contexts))
    details.update(table.evaluate(ctx, {"prune_sw": ["zero_sw"]}, StudyContext(super_weights=original_sw),
                                  skip={NoSuperWeights: "no super weight detected or in the registry"}))
    details.update(table.evaluate(ctx, {"prune_largest": ["prune_largest"],
                                        "rotated_prune_largest": ["rotate", "prune_largest"]}, StudyContext()))
    protocol = quant_protocol(exp)
    return {"quant_protocol": protocol, "ma_peak": peak, "atlas": atlas,
            "super_weights": {"original": [str(w) for w in original_sw], "rotated": [str(w) for w in rotated_sw]},
            "calibration": calibration.meta, "variants": details, "reference": reference,
            "table": table.render(caption(ctx.cfg, protocol, calibration.meta))}
