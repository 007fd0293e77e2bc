"""The massive activations an MA study edits (model YAML registry or exp.massive_activations), the preflight check
of them, and their calibrated means: shared by experiments/ma_intervene.py and experiments/ma_attention.py."""
from __future__ import annotations

from omegaconf import OmegaConf

from outlierlab.errors import ConfigError
from outlierlab.evals.data import check_corpus, load_corpus
from outlierlab.evals.ppl import SAMPLING, Windows, build_windows
from outlierlab.models import massive
from outlierlab.models.load import BOS_POLICIES, model_shape
from outlierlab.probes.activation_means import calibrated_means


def locations(cfg) -> tuple[list[massive.MassiveActivation], list[str], str]:
    """(MA locations, notes on entries that cannot be addressed, where they came from)."""
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
                                     bos=cfg.model.bos)
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
