"""Paper SW Table 1: how much one super weight matters.

1. Find the super weights: data-free detection always runs; `exp.super_weights` picks detected or registry ones.
2. For each variant (a list of interventions applied in order to the original weights): PPL on every protocol of
   the eval suite, then undo the edits.
3. One row per variant, with the paper's numbers beside ours when this model is the paper's.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from outlierlab.interventions.base import StudyContext
from outlierlab.interventions.super_weight import NoSuperWeights
from outlierlab.probes.super_weight import super_weights_for_study
from outlierlab.tables import ratio_to_baseline


def run(ctx) -> dict:
    cfg = ctx.cfg.exp
    registry = ctx.registry_super_weights
    detection, detected, chosen, origin = super_weights_for_study(ctx.loaded, cfg.detection, cfg.super_weights,
                                                                  registry)
    context = StudyContext(super_weights=chosen)

    protocols = list(ctx.cfg.eval.ppl)
    reference = OmegaConf.to_container(cfg.reference) if cfg.get("reference") else {}
    with_paper = reference.get("model") == ctx.cfg.model.name
    rows, details = [], {}
    for variant, names in cfg.variants.items():
        row = {"variant": variant}
        try:
            details[variant] = ctx.evaluate(list(names), context, label=variant)
        except NoSuperWeights:
            row["note"] = "skipped: no super weight"
            rows.append(row)
            continue
        ppl, zeroshot = details[variant]["ppl"], details[variant]["zeroshot"]
        for key in protocols:
            row[key] = ppl[key]["ppl"]
            if with_paper:
                row[f"paper {key}"] = reference.get("values", {}).get(variant, {}).get(key)
        if zeroshot:
            for task, scores in zeroshot["tasks"].items():
                row[task] = None if scores["acc"] is None else 100 * scores["acc"]
            row["zero-shot mean"] = None if zeroshot["mean"] is None else 100 * zeroshot["mean"]
            if with_paper:
                row["paper zero-shot mean"] = reference.get("values", {}).get(variant, {}).get("zeroshot_mean")
        rows.append(row)

    ratio_to_baseline(rows, protocols[0])
    columns = ["variant", *protocols, "x original"]
    if with_paper:
        columns += [f"paper {key}" for key in protocols]
    suite = ctx.cfg.eval.get("zeroshot")
    if suite:
        columns += [*suite.tasks, "zero-shot mean"] + (["paper zero-shot mean"] if with_paper else [])
    if any("note" in row for row in rows):
        columns.append("note")
    caption = f"PPL ({ctx.cfg.eval.name} protocols); super weights {origin}: {', '.join(map(str, chosen)) or 'none'}"
    zeroshot = next((d["zeroshot"] for d in details.values() if d.get("zeroshot")), None)
    if zeroshot:
        caveats = [f"{task}: {scores['data']}" for task, scores in zeroshot["tasks"].items()
                   if scores["data"] not in ("verbatim", "hub")]
        caption += f"; zero-shot acc x100, limit {zeroshot['limit']} per task"
        caption += f" (data: {', '.join(caveats)})" if caveats else ""
    return {
        "super_weights": {"used": [str(w) for w in chosen], "origin": origin,
                          "detected": [str(w) for w in detected], "registry": [str(w) for w in registry],
                          "registry_agrees": sorted(detected) == sorted(registry) if registry else None},
        "detection": {k: v for k, v in detection.items() if k != "iterations"},
        "detection_iterations": detection["iterations"],
        "variants": details,
        "reference": reference if with_paper else None,
        "table": {"columns": columns, "rows": rows, "caption": caption},
    }
