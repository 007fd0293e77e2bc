"""Paper SW Table 1: how much one super weight matters.

1. Find the super weights: data-free detection always runs; `exp.super_weights` picks detected or registry ones.
2. For each variant (a list of interventions applied in order to the original weights): PPL on every protocol of
   the eval suite, then undo the edits.
3. One row per variant; the paper's numbers (its model, whichever ours is) in the table's reference block, after ours.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from outlierlab.interventions.super_weight import NoSuperWeights
from outlierlab.studies.super_weights import SuperWeightChoice
from outlierlab.studies.variants import VariantTable, paper_reference


def run(ctx) -> dict:
    cfg = ctx.cfg.exp
    weights = SuperWeightChoice.of(ctx)
    reference = OmegaConf.to_container(cfg.reference) if cfg.get("reference") else {}
    with_paper = reference.get("model") == ctx.cfg.model.name
    suite = ctx.cfg.eval.get("zeroshot")
    table = VariantTable(list(ctx.cfg.eval.ppl), zeroshot=bool(suite), tasks=list(suite.tasks) if suite else None,
                         reference=paper_reference(reference), beside=False, paper_ratio=True)
    details = table.evaluate(ctx, cfg.variants, weights.context, skip={NoSuperWeights: "skipped: no super weight"})

    caption = f"PPL ({ctx.cfg.eval.name} protocols); super weights {weights.describe()}"
    zeroshot = next((d["zeroshot"] for d in details.values() if d.get("zeroshot")), None)
    if zeroshot:
        caveats = [f"{task}: {scores['data']}" for task, scores in zeroshot["tasks"].items()
                   if scores["data"] not in ("verbatim", "hub")]
        caption += f"; zero-shot acc x100, limit {zeroshot['limit']} per task"
        caption += f" (data: {', '.join(caveats)})" if caveats else ""
    return {
        **weights.record(registry=True),
        "variants": details,
        "reference": reference if with_paper else None,
        "table": table.render(caption),
    }
