"""The massive activations an MA study edits (model YAML registry or exp.massive_activations), the preflight check
of them, and their calibrated means: shared by experiments/ma_intervene.py and experiments/ma_attention.py."""
from __future__ import annotations

from omegaconf import OmegaConf

from outlierlab.errors import ConfigError
from outlierlab.evals.ppl import Windows, check_protocol
from outlierlab.models import massive
from outlierlab.models.load import model_shape
from outlierlab.probes.activation_means import calibrated_means


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


def check(cfg, plan) -> None:
    """Preflight (before weights load): MA coordinates fit the model, calibration data exist, layers are valid."""
    found, _, _ = locations(cfg)
    last = max((p for location in found for p in location.positions), default=0)
    for key in ("calibration", "attention_data"):  # windows must reach past every MA position
        if cfg.exp.get(key) is not None:
            check_protocol(f"exp.{key}", cfg.exp[key], plan.data_dir, min_seqlen=last + 2, all_windows=False)
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
    windows = ctx.protocol_windows("exp.calibration")
    means = calibrated_means(ctx.loaded, found, windows, ctx.cfg.paths.cache_dir, ctx.cfg.exp.calibration.batch_size)
    means["calibration"] = windows.meta
    return means, windows
