"""Paper RO: can a massive activation be smoothed where it is born, or only on the skip path that carries it?

1. Where the MAs are: the model YAML's registry (for this BOS policy), an explicit list, or detected as in
   +exp=ro_locate (birth layer, residual channels, the positions where they are massive in most sequences).
2. Per variant (smooth_massive_activation at birth / on the skip path, by mean or clip; paper MA's set-to-zero for
   scale): PPL on the eval suite and the MA's mean value at every block output with the edit in place.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from outlierlab.errors import ConfigError
from outlierlab.evals.ppl import Windows, check_protocol
from outlierlab.interventions.massive_activation import NoMassiveActivations
from outlierlab.models import massive
from outlierlab.probes.activation_means import measure_means
from outlierlab.probes.channel_outliers import forward_windows
from outlierlab.probes.ma_birth import SiteExtremes, criterion_from, first_appearance
from outlierlab.studies.variants import ratios_with_intervals, scores, window_nll
from outlierlab.tables import Table, columns

SOURCES = ("auto", "registry", "detect")


def _configured(cfg) -> tuple[list[massive.MassiveActivation] | None, str]:
    """MAs from the config (None: detect them on the model)."""
    spec = cfg.exp.massive_activations
    if OmegaConf.is_list(spec):
        entries, origin = OmegaConf.to_container(spec), "exp.massive_activations"
    elif spec in SOURCES:
        entries = cfg.model.get("massive_activations")
        entries, origin = OmegaConf.to_container(entries) if entries else [], "registry (model YAML)"
    else:
        raise ConfigError(f"exp.massive_activations={spec} must be one of {', '.join(SOURCES)} or a list of "
                          "{first_layer, channels, positions}")
    try:
        found, _ = massive.parse(entries, bos=cfg.model.bos)
    except ValueError as error:
        raise ConfigError(f"exp.massive_activations: {error}") from None
    if spec == "detect" or (spec == "auto" and not found):
        return None, "detected (ro_locate's first appearance)"
    if spec == "registry" and not found:
        raise ConfigError(f"exp.massive_activations=registry: model {cfg.model.name} lists none for bos="
                          f"{cfg.model.bos} (use detect)")
    return found, origin


def check(cfg, plan) -> None:
    criterion_from(cfg.exp.criterion)
    found, _ = _configured(cfg)
    last = max((p for location in found or [] for p in location.positions), default=0)
    # windows must reach past every MA position
    check_protocol("exp.calibration", cfg.exp.calibration, plan.data_dir, min_seqlen=last + 2, all_windows=False)


def detect(ctx) -> tuple[list[massive.MassiveActivation], dict]:
    criterion, share = criterion_from(ctx.cfg.exp.criterion)
    windows = ctx.data_windows("probe")
    with SiteExtremes(ctx.loaded.sites, criterion=criterion) as extremes:
        forward_windows(ctx.loaded, windows.ids, ctx.cfg.exp.data.probe.batch_size, desc="MA birth")
    rows = extremes.summary()
    birth = first_appearance(rows, share)
    by_layer: dict[int, list[int]] = {}
    for entry in birth["channels"]:
        by_layer.setdefault(entry["first_block_output"], []).append(entry["channel"])
    found = []
    for layer, channels in sorted(by_layer.items()):
        row = next(r for r in rows if r["point"] == f"layers.{layer}.out")
        positions = [p for p, n in row["positions"] if n >= share * row["sequences"]]
        if positions:
            found.append(massive.MassiveActivation(layer, tuple(sorted(channels)), tuple(sorted(positions))))
    return found, birth


def _row(variant: str, detail: dict, protocols: list[str]) -> dict:
    """Where the edit acted, PPL per protocol (with its interval over windows), and the largest |mean MA value| at the
    last block output."""
    edits = [e for e in detail["edits"] if e.get("edit") == "smooth_massive_activation"]
    row = {"variant": variant,
           "edited_at": (", ".join(f"{e['where']} ({len(e['sites'])} sites, {e['value']})" for e in edits)
                         or ("; ".join(e["edit"] for e in detail["edits"]) or "-"))}
    row.update(scores(detail, protocols))
    trace = detail.get("ma_trace")
    if trace:
        row["abs_ma_last_layer"] = max(abs(v) for location in trace["mean"] for r in location[-1] for v in r)
    return row


def _caption(ctx, found, origin: str, calibration, count: int) -> str:
    exp = ctx.cfg.exp
    where = "; ".join(f"born in layer {m.first_layer}, channels {list(m.channels)}, positions {list(m.positions)}"
                      for m in found) or "none"
    clip = next((OmegaConf.select(exp, f"interventions.{name}.clip_ratio") for name in exp.interventions
                 if OmegaConf.select(exp, f"interventions.{name}.value") == "clip"), None)
    return (f"{ctx.cfg.model.name}, PPL ({ctx.cfg.eval.name}); MAs from {origin}: {where}. birth = the MLP branch's "
            f"output of the birth layer (down_proj's, or the MLP output norm's in sandwich-norm families), skip = the block outputs of every later layer (our reading of paper RO); mean = "
            f"calibrated over {calibration.meta['windows']} x {calibration.meta['seqlen']} tokens of "
            f"{calibration.meta['dataset']} {calibration.meta['split']}; clip = to {clip} x the token's median |x|;"
            f" |MA| last layer = largest |mean MA value| at the last block output with the edit in place "
            f"({count} calibration windows)")


def run(ctx) -> dict:
    exp = ctx.cfg.exp
    found, origin = _configured(ctx.cfg)
    birth = None
    if found is None:
        found, birth = detect(ctx)
    calibration = ctx.protocol_windows("exp.calibration")
    count = exp.trace_windows or 0
    traced = Windows(ids=calibration.ids[:count], meta=calibration.meta)

    def observe():
        if not found or count < 1:
            return {}
        measured = measure_means(ctx.loaded, found, traced, exp.calibration.batch_size)
        return {"ma_trace": {"mean": [loc["mean"] for loc in measured["locations"]],
                             "median_abs": measured["median_abs"]}}

    context = {"massive_activations": found, "calibration_ids": calibration.ids}
    protocols = list(ctx.cfg.eval.ppl)
    rows, details = [], {}
    for variant, names in exp.variants.items():
        try:
            details[variant] = ctx.evaluate(list(names), context, label=variant, observe=observe)
        except NoMassiveActivations:
            rows.append({"variant": variant, "note": "skipped: no massive activation"})
            continue
        rows.append(_row(variant, details[variant], protocols))
    ratios_with_intervals(rows, window_nll(details, protocols[0]), protocols[0])
    shown = columns("variant", ("edited_at", "edited at"), *protocols, ("x_original", "x original"),
                    ("abs_ma_last_layer", "|MA| last layer"), *(["note"] if any("note" in row for row in rows) else []))
    return {"massive_activations": {"used": [m.describe() for m in found], "origin": origin, "birth": birth},
            "calibration": calibration.meta, "variants": details,
            "table": Table(shown, rows, index="variant", caption=_caption(ctx, found, origin, calibration,
                                                                          count)).to_dict()}
