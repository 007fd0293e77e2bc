"""Paper MA Table 3: do the massive activations matter as values, or only as (nearly constant) biases?

1. Where the MAs are: the model YAML's registry (or an explicit list in exp.massive_activations).
2. Their mean at every layer over the calibration corpus (a probe pass, cached on disk by model + data + coords).
3. For each variant (interventions applied in order to the original model): PPL on every protocol of the eval suite,
   zero-shot accuracy when the suite has it; then the hooks are removed.
4. One row per variant, with the paper's numbers beside ours when this model is the paper's.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from outlierlab.evals.data import check_corpus, load_corpus
from outlierlab.evals.ppl import SAMPLING, Windows, build_windows
from outlierlab.interventions.massive_activation import NoMassiveActivations
from outlierlab.models import massive
from outlierlab.models.load import BOS_POLICIES, model_shape
from outlierlab.probes.activation_means import calibrated_means, measure_means
from outlierlab.runner import ConfigError
from outlierlab.tables import ratio_to_baseline


def locations(cfg, bos: str | None = None) -> tuple[list[massive.MassiveActivation], list[str], str]:
    """(MA locations, notes on entries that cannot be addressed, where they came from). `bos`: the loaded model's
    resolved policy; before loading, model.bos unless it is auto (then every entry is kept for the checks)."""
    if bos is None:
        bos = cfg.model.get("bos") or "auto"
        bos = None if bos == "auto" else bos
    spec = cfg.exp.massive_activations
    if spec == "registry":
        entries, origin = cfg.model.get("massive_activations") or [], "registry (model YAML)"
    elif OmegaConf.is_list(spec):
        entries, origin = spec, "exp.massive_activations"
    else:
        raise ConfigError(f"exp.massive_activations={spec} must be 'registry' or a list of "
                          "{first_layer, channels, positions}")
    try:
        found, notes = massive.parse(OmegaConf.to_container(entries) if OmegaConf.is_config(entries) else entries,
                                     bos=bos)
    except ValueError as error:
        raise ConfigError(f"exp.massive_activations: {error}") from None
    return found, notes, origin


def check_protocol(key: str, protocol, data_dir, positions) -> None:
    if protocol.sampling not in SAMPLING:
        raise ConfigError(f"{key}.sampling={protocol.sampling} is not one of: {', '.join(SAMPLING)}")
    if protocol.bos not in ("model", *BOS_POLICIES):
        raise ConfigError(f"{key}.bos={protocol.bos} is not one of: model, {', '.join(BOS_POLICIES)}")
    if not isinstance(protocol.windows, int) or protocol.windows < 1:
        raise ConfigError(f"{key}.windows={protocol.windows} must be a positive integer")
    if not isinstance(protocol.seqlen, int) or protocol.seqlen <= max(positions, default=0) + 1:
        raise ConfigError(f"{key}.seqlen={protocol.seqlen} must be an integer longer than the MA positions "
                          f"(largest {max(positions, default=0)}) + 1")
    check_corpus(protocol.dataset, protocol.split, data_dir)


def check(cfg, plan) -> None:
    """Preflight (before weights load): MA coordinates fit the model, calibration data exist, layers are valid."""
    found, _, _ = locations(cfg)
    positions = [p for location in found for p in location.positions]
    for key in ("calibration", "attention_data"):
        if cfg.exp.get(key) is not None:
            check_protocol(f"exp.{key}", cfg.exp[key], plan.data_dir, positions)
    if not found:
        return  # the recipe reports every MA variant as skipped
    layers, hidden, _ = model_shape(cfg.model, plan.source)
    try:
        massive.check_fits(found, layers, hidden)
    except ValueError as error:
        raise ConfigError(f"{'model' if cfg.exp.massive_activations == 'registry' else 'exp'}."
                          f"massive_activations: {error}") from None
    for name, intervention in plan.interventions.items():
        where = getattr(intervention, "layers", None)
        if isinstance(where, list) and max(where) >= layers:
            raise ConfigError(f"exp.interventions.{name}.layers: {max(where)} is outside the model's {layers} layers")


def calibrate(ctx, found) -> tuple[dict | None, Windows | None]:
    """The MAs' means at every layer over the calibration corpus (cached), and the calibration windows."""
    if not found:
        return None, None
    protocol = ctx.cfg.exp.calibration
    corpus = load_corpus(protocol.dataset, protocol.split, ctx.plan.data_dir)
    windows = build_windows(protocol, corpus, ctx.loaded)
    means = calibrated_means(ctx.loaded, found, windows, ctx.cfg.paths.cache_dir, protocol.batch_size)
    means["calibration"] = windows.meta
    return means, windows


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


def run(ctx) -> dict:
    cfg = ctx.cfg.exp
    found, notes, origin = locations(ctx.cfg, ctx.loaded.bos)
    means, calibration = calibrate(ctx, found)
    context = {"massive_activations": found, "ma_means": means}

    protocols = list(ctx.cfg.eval.ppl)
    reference = OmegaConf.to_container(cfg.reference) if cfg.get("reference") else {}
    with_paper = reference.get("model") == ctx.cfg.model.name
    paper = reference.get("values", {}) if with_paper else {}
    rows, details = [], {}
    for variant, names in cfg.variants.items():
        row = {"variant": variant}
        try:
            details[variant] = ctx.evaluate(list(names), context, label=variant,
                                            observe=lambda: {"ma_trace": trace(ctx, found, calibration)})
        except NoMassiveActivations:
            row["note"] = "skipped: no massive activation"
            rows.append(row)
            continue
        ppl, zeroshot, traced = (details[variant][key] for key in ("ppl", "zeroshot", "ma_trace"))
        for key in protocols:
            row[key] = ppl[key]["ppl"]
            if with_paper:
                row[f"paper {key}"] = paper.get(variant, {}).get(key)
        if zeroshot:
            row["zero-shot mean"] = None if zeroshot["mean"] is None else 100 * zeroshot["mean"]
            if with_paper:
                row["paper zero-shot mean"] = paper.get(variant, {}).get("zeroshot_mean")
        row["peak |MA|"] = peak(traced)
        rows.append(row)

    ratio_to_baseline(rows, protocols[0])
    columns = ["variant", *protocols, "x original"]
    columns += [f"paper {key}" for key in protocols] if with_paper else []
    if ctx.cfg.eval.get("zeroshot"):
        columns += ["zero-shot mean"] + (["paper zero-shot mean"] if with_paper else [])
    if any(row.get("peak |MA|") is not None for row in rows):
        columns.append("peak |MA|")
    if any("note" in row for row in rows):
        columns.append("note")
    where = "; ".join(f"layer {m.first_layer}, channels {list(m.channels)}, positions {list(m.positions)}"
                      for m in found) or "none"
    caption = f"PPL ({ctx.cfg.eval.name} protocols); massive activations from {origin}: {where}"
    if means:
        caption += (f"; means over {means['sequences']} calibration windows of {means['calibration']['seqlen']} "
                    f"tokens ({means['calibration']['dataset']} {means['calibration']['split']})")
    if any(row.get("peak |MA|") is not None for row in rows):
        caption += (f"; peak |MA| = largest |mean MA value| over all layers on the first {ctx.cfg.exp.trace_windows} "
                    "calibration windows with the edit in place")
    zeroshot = next((d["zeroshot"] for d in details.values() if d.get("zeroshot")), None)
    if zeroshot:
        caption += f"; zero-shot: mean acc x100 over {', '.join(zeroshot['tasks'])}, limit {zeroshot['limit']} per task"
    if with_paper:
        caption += f"; paper: {reference['source']}"
    return {
        "massive_activations": {"used": [m.describe() for m in found], "origin": origin, "notes": notes},
        "ma_means": means,
        "variants": details,
        "reference": reference if with_paper else None,
        "table": {"columns": columns, "rows": rows, "caption": caption},
    }
