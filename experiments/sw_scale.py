"""Paper SW Fig. 6: scale the super weights by s; PPL and zero-shot accuracy against s.

1. Find the super weights (detection always runs; `exp.super_weights` picks detected or registry ones).
2. For every s in `exp.scales`: multiply them by s (the exp's `scale_sw` intervention with scale=s), measure the
   PPL protocols `exp.protocols` and the eval suite's zero-shot tasks, undo.
"""
from __future__ import annotations

import math

import hydra
from omegaconf import OmegaConf

from outlierlab.studies.super_weights import SuperWeightChoice
from outlierlab.studies.variants import ZERO_SHOT, scores
from outlierlab.tables import Column, Reference, Table


def scales(spec) -> list[float]:
    """`exp.scales` {stop, step, extra}: every multiple of `step` from 0 to `stop` (none if step is null), plus
    the `extra` points, sorted and de-duplicated."""
    values = list(spec.get("extra") or [])
    if spec.get("step") is not None:
        if spec.step <= 0 or spec.get("stop") is None or spec.stop < 0:
            raise ValueError(f"exp.scales: step={spec.step}, stop={spec.get('stop')} needs step > 0 and stop >= 0")
        values += [round(i * spec.step, 10) for i in range(round(spec.stop / spec.step) + 1)]
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"exp.scales: {values or 'no scales'} (need finite numbers: set step/stop or extra)")
    return sorted({float(v) for v in values})


def check(cfg, plan) -> None:
    scales(cfg.exp.scales)
    available = list(cfg.eval.get("ppl") or {})
    unknown = [key for key in cfg.exp.protocols if key not in available]
    if unknown:
        raise ValueError(f"exp.protocols: {', '.join(unknown)} not in eval={cfg.eval.name} "
                         f"(it has: {', '.join(available) or 'none'})")


def run(ctx) -> dict:
    cfg = ctx.cfg.exp
    weights = SuperWeightChoice.of(ctx)
    protocols = list(cfg.protocols)
    paper = cfg.get("reference") or {}
    reference = {float(s): v for s, v in paper.get("zeroshot_mean", {}).items()}

    rows, points = [], []
    for scale in (scales(cfg.scales) if weights.chosen else []):
        intervention = hydra.utils.instantiate(cfg.interventions.scale_sw, scale=scale)
        with ctx.edit([intervention], weights.context):
            point = {"scale": scale, "ppl": ctx.perplexities(label=f"scale {scale:g}", keys=protocols),
                     "zeroshot": ctx.zeroshot(label=f"scale {scale:g}")}
        rows.append({"scale": scale, **scores(point, protocols, tasks=True)})
        points.append(point)

    suite = ctx.cfg.eval.get("zeroshot")
    table = Table([Column("scale", "scale"), *(Column(key, key) for key in protocols)], rows, index="scale")
    if suite:  # the paper's zero-shot mean per scale, beside ours
        table.reference = Reference(source=paper.get("source", "paper"), values={
            table.row_id(row): {ZERO_SHOT.key: reference[row["scale"]]} for row in rows
            if ZERO_SHOT.key in row and reference.get(row["scale"]) is not None})
        table.columns += [*(Column(task, task) for task in suite.tasks), ZERO_SHOT,
                          Column(ZERO_SHOT.key, f"paper {ZERO_SHOT.label}", reference=True)]
    caption = (f"super weights {weights.origin} ({', '.join(map(str, weights.chosen)) or 'none: nothing to scale'}) "
               f"multiplied by s; PPL ({ctx.cfg.eval.name} protocols)")
    if suite:
        caption += (f"; zero-shot acc x100, limit {suite.limit} per task; paper: Llama-7B 7-task mean "
                    f"({(cfg.get('reference') or {}).get('source', '')})")
    return {
        **weights.record(),
        "points": points,
        "reference": OmegaConf.to_container(cfg.reference) if cfg.get("reference") else None,
        "table": table.with_caption(caption).to_dict(),
    }
