"""Paper MA Table 3: do the massive activations matter as values, or only as (nearly constant) biases?

1. Where the MAs are: the model YAML's registry (or an explicit list in exp.massive_activations).
2. Their mean at every layer over the calibration corpus (a probe pass, cached on disk by model + data + coords).
3. For each variant (interventions applied in order to the original model): PPL on every protocol of the eval suite,
   zero-shot accuracy when the suite has it; then the hooks are removed.
4. One row per variant, the paper's numbers (reference block) beside ours when this model is the paper's, else after.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from outlierlab.evals.ppl import Windows
from outlierlab.interventions.base import StudyContext
from outlierlab.interventions.massive_activation import NoMassiveActivations
from outlierlab.probes.activation_means import measure_means
from outlierlab.studies.massive_activations import calibrate, locations
from outlierlab.studies.variants import VariantTable, paper_reference
from outlierlab.tables import Column


def trace(ctx, found, windows: Windows | None) -> dict | None:
    """The MAs' mean value at every layer on the model as it is now (edited or not), over the first
    `exp.trace_windows` calibration windows: shows whether a model rewrites an MA removed at one layer."""
    count = ctx.cfg.exp.get("trace_windows") or 0
    if windows is None or count < 1:
        return None
    first = Windows(ids=windows.ids[:count], meta={**windows.meta, "windows": min(count, len(windows.ids))})
    measured = measure_means(ctx.loaded, found, first, ctx.cfg.exp.calibration.batch_size)
    return {"windows": measured["sequences"], "mean": [loc["mean"] for loc in measured["locations"]],
            "median_abs": measured["median_abs"]}


def peak(traced: dict | None) -> float | None:
    """Largest |mean MA value| over layers, positions and channels."""
    if not traced:
        return None
    return max(abs(v) for location in traced["mean"] for layer in location for row in layer for v in row)


def caption(ctx, found, origin: str, means: dict | None, details: dict, table: VariantTable, reference: dict) -> str:
    where = "; ".join(f"layer {m.first_layer}, channels {list(m.channels)}, positions {list(m.positions)}"
                      for m in found) or "none"
    text = f"PPL ({ctx.cfg.eval.name} protocols); massive activations from {origin}: {where}"
    if means:
        text += (f"; means over {means['sequences']} calibration windows of {means['calibration']['seqlen']} "
                 f"tokens ({means['calibration']['dataset']} {means['calibration']['split']})")
    if any(row.get(PEAK.key) is not None for row in table.rows):
        text += (f"; peak |MA| = largest |mean MA value| over all layers on the first {ctx.cfg.exp.trace_windows} "
                 "calibration windows with the edit in place")
    zeroshot = next((d["zeroshot"] for d in details.values() if d.get("zeroshot")), None)
    if zeroshot:
        text += f"; zero-shot: mean acc x100 over {', '.join(zeroshot['tasks'])}, limit {zeroshot['limit']} per task"
    if table.reference and table.beside:
        text += f"; paper: {reference['source']}"
    return text


PEAK = Column("peak_abs_ma", "peak |MA|")


def run(ctx) -> dict:
    cfg = ctx.cfg.exp
    found, notes, origin = locations(ctx.cfg, ctx.loaded.bos)
    means, calibration = calibrate(ctx, found)
    reference = OmegaConf.to_container(cfg.reference) if cfg.get("reference") else {}
    with_paper = reference.get("model") == ctx.cfg.model.name
    table = VariantTable(list(ctx.cfg.eval.ppl), zeroshot=bool(ctx.cfg.eval.get("zeroshot")),
                         reference=paper_reference(reference), beside=with_paper,
                         paper="paper" if with_paper else f"paper {reference.get('model')}")
    details = table.evaluate(ctx, cfg.variants, StudyContext(massive_activations=found, ma_means=means),
                             skip={NoMassiveActivations: "skipped: no massive activation"},
                             observe=lambda: {"ma_trace": trace(ctx, found, calibration)},
                             extra=lambda evaluated: {PEAK.key: peak(evaluated["ma_trace"])})
    return {
        "massive_activations": {"used": [m.describe() for m in found], "origin": origin, "notes": notes},
        "ma_means": means,
        "variants": details,
        "reference": reference if with_paper else None,
        "table": table.render(caption(ctx, found, origin, means, details, table, reference), optional=[PEAK]),
    }
