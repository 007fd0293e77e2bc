"""Paper SW Tables 3/4: W8A8 (simulated) with naive activation RTN, with the super activation held out, and with
SmoothQuant's smoothing as the data-calibrated baseline.

1. Build the calibration windows (exp.calibration, a PPL protocol config) for SmoothQuant.
2. For each variant (interventions applied in order to the original model): PPL (+ zero-shot), then undo.
3. One row per variant with the activation and weight quantization error beside the scores.
"""
from __future__ import annotations

import math

from omegaconf import OmegaConf

from outlierlab.interventions.base import StudyContext
from outlierlab.studies.variants import VariantTable, paper_reference
from outlierlab.tables import Column


def _activation_error(edits: list[dict]) -> float | None:
    """sqrt(sum of squared errors / sum of squares) over every quantized linear input of the variant."""
    inputs = [r for e in edits if e["edit"] == "quantize_activations" for r in e["inputs"].values()]
    total = sum(r["sum_sq"] for r in inputs)
    return math.sqrt(sum(r["sum_sq_error"] for r in inputs) / total) if total else None


def _errors(evaluated: dict) -> dict:
    weights = [e["summary"]["mean_relative_error"] for e in evaluated["edits"] if e["edit"] == "quantize_weights"]
    return {"act_rel_error": _activation_error(evaluated["edits"]), "weight_rel_error": weights[0] if weights else None}


ERRORS = [Column("act_rel_error", "act. rel. error"), Column("weight_rel_error", "weight rel. error")]


def run(ctx) -> dict:
    exp = ctx.cfg.exp
    calibration = ctx.protocol_windows("exp.calibration")
    reference = (OmegaConf.to_container(exp.reference.models).get(ctx.cfg.model.name)
                 if exp.get("reference") else None)
    table = VariantTable(list(ctx.cfg.eval.ppl), zeroshot=bool(ctx.cfg.eval.get("zeroshot")),
                         reference=paper_reference(exp.get("reference"), values=reference, model=ctx.cfg.model.name)
                         if reference else None, beside=False, paper_zeroshot=False)
    details = table.evaluate(ctx, exp.variants, StudyContext(calibration_ids=calibration.ids), extra=_errors)
    caption = (f"W8A8 simulated ({ctx.cfg.eval.name} protocols); act. rel. error = ||X^-X||/||X|| over every "
               f"quantized linear input; SmoothQuant calibrated on {calibration.meta['windows']} x "
               f"{calibration.meta['seqlen']} tokens of {exp.calibration.dataset} (seed {exp.calibration.seed})")
    return {
        "calibration": calibration.meta,
        "variants": details,
        "reference": {"source": exp.reference.source, "values": reference} if reference else None,
        "table": table.render(caption, extra=ERRORS),
    }
