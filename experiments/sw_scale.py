"""Paper SW Fig. 6: scale the super weights by s; PPL and zero-shot accuracy against s.

1. Find the super weights (detection always runs; `exp.super_weights` picks detected or registry ones).
2. For every s in `exp.scales`: multiply them by s (the exp's `scale_sw` intervention with scale=s), measure the
   PPL protocols `exp.protocols` and the eval suite's zero-shot tasks, undo.
"""
from __future__ import annotations

import math

import hydra
from omegaconf import OmegaConf

from outlierlab.interventions.base import StudyContext
from outlierlab.probes.super_weight import super_weights_for_study


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
    detection, detected, chosen, origin = super_weights_for_study(ctx.loaded, cfg.detection, cfg.super_weights,
                                                                  ctx.registry_super_weights)
    protocols = list(cfg.protocols)
    reference = {float(s): v for s, v in (cfg.get("reference") or {}).get("zeroshot_mean", {}).items()}

    rows, points = [], []
    for scale in (scales(cfg.scales) if chosen else []):
        intervention = hydra.utils.instantiate(cfg.interventions.scale_sw, scale=scale)
        with ctx.edit([intervention], StudyContext(super_weights=chosen)):
            ppl = ctx.perplexities(label=f"scale {scale:g}", keys=protocols)
            zeroshot = ctx.zeroshot(label=f"scale {scale:g}")
        row = {"scale": scale, **{key: ppl[key]["ppl"] for key in protocols}}
        if zeroshot:
            row.update({task: None if s["acc"] is None else 100 * s["acc"] for task, s in zeroshot["tasks"].items()})
            row["zero-shot mean"] = None if zeroshot["mean"] is None else 100 * zeroshot["mean"]
            row["paper zero-shot mean"] = reference.get(scale)
        rows.append(row)
        points.append({"scale": scale, "ppl": ppl, "zeroshot": zeroshot})

    suite = ctx.cfg.eval.get("zeroshot")
    columns = ["scale", *protocols]
    if suite:
        columns += [*suite.tasks, "zero-shot mean", "paper zero-shot mean"]
    caption = (f"super weights {origin} ({', '.join(map(str, chosen)) or 'none: nothing to scale'}) multiplied by "
               f"s; PPL ({ctx.cfg.eval.name} protocols)")
    if suite:
        caption += (f"; zero-shot acc x100, limit {suite.limit} per task; paper: Llama-7B 7-task mean "
                    f"({(cfg.get('reference') or {}).get('source', '')})")
    return {
        "super_weights": {"used": [str(w) for w in chosen], "origin": origin, "detected": [str(w) for w in detected]},
        "detection": {k: v for k, v in detection.items() if k != "iterations"},
        "points": points,
        "reference": OmegaConf.to_container(cfg.reference) if cfg.get("reference") else None,
        "table": {"columns": columns, "rows": rows, "caption": caption},
    }
