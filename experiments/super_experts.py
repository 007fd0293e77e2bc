"""Super experts (Su et al. 2025, arXiv 2507.23279): which experts of a mixture of experts make the massive
activations, and what pruning them does.

1. Profile every routed expert over the calibration windows (max |down_proj output|, load; probes/super_experts.py)
   and pick the super experts (conf/probe/super_experts.yaml).
2. Variants: original, super experts pruned, as many random experts pruned (router mask, interventions/experts.py):
   PPL and zero-shot of the eval suite, and under the same edit the largest residual activation on the prompt (paper
   MA criterion) and the attention-sink rate (Gu et al. 2024) on the first calibration windows.
"""
from __future__ import annotations

from outlierlab.interventions.base import StudyContext
from outlierlab.interventions.experts import NoSuperExperts
from outlierlab.probes.super_experts import SuperExpertCriterion, find_super_experts, profile_experts
from outlierlab.studies.super_experts import OUTLIER_COLUMNS, outliers, super_experts_table
from outlierlab.studies.variants import VariantTable


def check(cfg, plan) -> None:
    SuperExpertCriterion(**_criterion(cfg.exp.detection))


def _criterion(spec) -> dict:
    return {key: value for key, value in spec.items() if key != "provenance"}


def run(ctx) -> dict:
    exp, loaded = ctx.cfg.exp, ctx.loaded
    if not loaded.sites.moe_layers:
        raise ValueError(f"model '{ctx.cfg.model.name}' has no mixture-of-experts layer")
    windows = ctx.protocol_windows("exp.calibration")
    profile = profile_experts(loaded, windows.ids, exp.calibration.batch_size)
    found = find_super_experts(profile, loaded.sites.num_layers, SuperExpertCriterion(**_criterion(exp.detection)))
    context = StudyContext(super_experts=[(e["layer"], e["expert"]) for e in found["super_experts"]])
    suite = ctx.cfg.eval.get("zeroshot")
    table = VariantTable(list(ctx.cfg.eval.ppl), zeroshot=bool(suite))
    details = table.evaluate(ctx, exp.variants, context, skip={NoSuperExperts: "skipped: no super expert"},
                             observe=lambda: {"outliers": outliers(loaded, exp, windows.ids)},
                             extra=lambda evaluated: evaluated["outliers"]["row"])
    listed = ", ".join(f"layers.{e['layer']} expert {e['expert']} ({e['max_abs_out']:.4g})"
                       for e in found["super_experts"]) or "none"
    return {"detection": {"provenance": exp.detection.provenance, **_criterion(exp.detection), **found},
            "super_experts": found["super_experts"], "profile": profile, "variants": details,
            "super_experts_table": super_experts_table(found["super_experts"]),
            "table": table.render(f"PPL ({ctx.cfg.eval.name} protocols) with experts pruned by router mask; "
                                  f"super experts: {listed}", extra=OUTLIER_COLUMNS)}
