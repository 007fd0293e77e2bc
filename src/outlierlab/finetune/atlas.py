"""The outlier measurements fine-tuning is guided by, and checked against afterwards (read-only; the model is
unchanged by every function here).

    super weights       probes/super_weight.py detect_super_weights (paper SW Sec. 3.1; conf/probe/sw_detection.yaml)
    massive activation  probes/super_weight.py massive_activation (paper MA: |h| > 100 and > 1000x the median;
                        conf/probe/massive_activation.yaml) + the model YAML's massive_activations for this BOS policy
    gamma outliers      every norm gain vector: channels > 3 sigma from its mean (BERT Busters, arXiv 2105.06990;
                        conf/probe/norm_gain_outliers; paper RO: channel outliers come from the norm gains)
    channel outliers    LLM.int8 (arXiv 2208.07339) outlier features at the inputs of the block linears that read
                        the hidden state: |x| >= 6 at >= 6% of positions in >= 25% of layers
                        (conf/probe/channel_outliers_int8)
    layer outlier ratio OWL (arXiv 2310.05175; OwLore arXiv 2405.18380 samples layers by it): per block, the share
                        of weights with |W_ij| * ||X_j||_2 > M x the block's mean of that score

The criteria are probes/detectors.py's (one definition each, shared with the atlas and RO studies); this module
only says where they look.

Norms are the sites table's (Sites.all_norms, gains by Sites.norm_gain); block linears are found from its layer list
and module types (nn.Linear / transformers' Conv1D), never from model names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from outlierlab.models import massive
from outlierlab.models.coords import SuperWeight
from outlierlab.probes import detectors
from outlierlab.probes.super_weight import massive_activation, super_weights_for_study


def norm_sites(sites) -> dict[str, str]:
    """Every norm with a gain (Sites.all_norms, the one enumeration, query/key norms included: fine-tuning trains
    and guards them too), by its name in model.named_modules() -> its site."""
    return {sites.module_name(site): site for site in sites.all_norms(attention=True)}


def norm_modules(sites) -> dict[str, nn.Module]:
    """`norm_sites` -> the modules."""
    return {name: sites.module(site) for name, site in norm_sites(sites).items()}


def block_linears(sites) -> dict[str, tuple[int, nn.Module, bool]]:
    """Every linear inside the decoder blocks (Sites.block_linears, the one enumeration), by its full module name
    in model.named_modules() -> (layer, module, transposed weight?)."""
    from transformers.pytorch_utils import Conv1D
    found = {}
    for site, module in sites.block_linears():  # site: layers.{i}.<path>.weight
        in_block = site[len("layers."):-len(".weight")]
        layer = int(in_block.split(".", 1)[0])
        found[f"{sites.family.layers}.{in_block}"] = (layer, module, isinstance(module, Conv1D))
    return found


def gamma_outliers(sites, sigma: float = detectors.SIGMA) -> dict[str, list[int]]:
    """Per norm module: the channels whose gain (Sites.norm_gain) is more than `sigma` (sample) standard deviations
    from that gain vector's mean (detectors.sigma_outliers)."""
    found = {}
    for name, site in norm_sites(sites).items():
        channels = detectors.sigma_outliers(sites.norm_gain(site), sigma, ddof=1)
        if channels:
            found[name] = channels
    return found


class LinearInputStats:
    """Hooks every block linear's input; folds the squared norm of each input channel (OWL) and, per channel, how
    many positions reach |x| >= threshold (LLM.int8). Nothing but per-channel sums is kept."""

    def __init__(self, sites, threshold: float):
        self.linears = block_linears(sites)
        self.threshold = threshold
        self.sum_sq = {}
        self.hits = {}
        self.positions = {}
        self._handles = []

    def __enter__(self):
        for name, (_layer, module, _t) in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self._fold(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False

    def _fold(self, name: str):
        def fold(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.sum_sq[name] = self.sum_sq.get(name, 0) + (x * x).sum(0)
            self.hits[name] = self.hits.get(name, 0) + detectors.count_exceeding(x, self.threshold)
            self.positions[name] = self.positions.get(name, 0) + x.shape[0]
        return fold


@torch.no_grad()
def linear_input_stats(loaded, windows: torch.Tensor, threshold: float) -> LinearInputStats:
    with LinearInputStats(loaded.sites, threshold) as stats:
        for row in tqdm(windows, desc="linear input stats", leave=False):
            loaded.model(row[None].to(loaded.device))
    return stats


def channel_outliers(stats: LinearInputStats, hidden_size: int, min_position_share: float,
                     min_layer_share: float) -> list[int]:
    """LLM.int8 outlier features: hidden channels at >= `min_position_share` of positions over the threshold in
    >= `min_layer_share` of the layers (at the input of any block linear that reads the hidden state)."""
    num_layers = 1 + max(layer for layer, _m, _t in stats.linears.values())
    per_layer: dict[int, set[int]] = {}
    for name, (layer, _module, _t) in stats.linears.items():
        hits = stats.hits.get(name)
        if hits is None or hits.numel() != hidden_size:
            continue
        wide = detectors.wide(hits, stats.positions[name], min_position_share)
        per_layer.setdefault(layer, set()).update(wide.nonzero().flatten().tolist())
    return list(detectors.int8_features(per_layer, num_layers, min_layer_share))


def layer_outlier_ratios(stats: LinearInputStats, num_layers: int, multiple: float) -> list[float]:
    """OWL's layer-wise outlier ratio: share of a block's weights whose |W_ij| * ||X_j||_2 exceeds `multiple` x the
    block's mean score (every block linear counted)."""
    scores: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(num_layers)}
    for name, (layer, module, transposed) in stats.linears.items():
        weight = module.weight.detach().float()
        weight = weight.t() if transposed else weight  # [out, in]
        scores[layer].append(detectors.owl_scores(weight, stats.sum_sq[name]))
    return [detectors.owl_outlier_ratio(torch.cat(scores[layer]), multiple) for layer in range(num_layers)]


@dataclass
class Atlas:
    super_weights: list[SuperWeight]
    super_weight_values: dict[str, float]
    ma: dict  # massive_activation(...) without per_layer
    ma_channels: list[int]  # detected MA channel + the registry's for this BOS policy
    ma_layers: list[int]  # where the MA is written: the first MA layer and every super weight's layer
    gamma_outliers: dict[str, list[int]]
    channel_outliers: list[int]
    layer_outlier_ratio: list[float]
    detection: dict

    def as_dict(self) -> dict:
        return {"super_weights": [str(w) for w in self.super_weights],
                "super_weight_values": self.super_weight_values, "massive_activation": self.ma,
                "ma_channels": self.ma_channels, "ma_layers": self.ma_layers,
                "gamma_outliers": self.gamma_outliers,
                "gamma_outlier_count": sum(map(len, self.gamma_outliers.values())),
                "channel_outliers": self.channel_outliers, "layer_outlier_ratio": self.layer_outlier_ratio,
                "detection": self.detection}


def super_weight_values(loaded, weights: list[SuperWeight]) -> dict[str, float]:
    values = {}
    for weight in weights:
        view = loaded.sites.down_proj(weight.layer)
        values[str(weight)] = float(view.param.data[view.index(weight.row, weight.col)])
    return values


def measure(loaded, settings, windows: torch.Tensor, registry: list[SuperWeight], registry_ma: list,
            mode: str = "auto") -> Atlas:
    """Every measurement above on the model as it is. `settings` is exp.atlas (thresholds), `windows` the
    calibration token windows, `registry` / `registry_ma` the model YAML's super weights / massive activations."""
    detection, _detected, chosen, origin = super_weights_for_study(loaded, settings.detection, mode, registry)
    ma = massive_activation(loaded, settings.detection.prompt, settings.ma_criterion.min_abs,
                            settings.ma_criterion.min_ratio)
    located, _notes = massive.parse(registry_ma, loaded.bos)
    channels = sorted({*(c for entry in located for c in entry.channels), *([ma["channel"]] if ma["massive"] else [])})
    first = [ma["layers"][0]] if ma["massive"] and ma["layers"] else []
    first += [entry.first_layer for entry in located]
    ma_layers = sorted({*first, *(w.layer for w in chosen)})
    stats = linear_input_stats(loaded, windows, settings.channel.threshold)
    hidden = loaded.model.config.hidden_size
    return Atlas(
        super_weights=list(chosen), super_weight_values=super_weight_values(loaded, chosen),
        ma={k: v for k, v in ma.items() if k != "per_layer"}, ma_channels=channels, ma_layers=ma_layers,
        gamma_outliers=gamma_outliers(loaded.sites, settings.gamma.sigmas),
        channel_outliers=channel_outliers(stats, hidden, settings.channel.min_position_share,
                                          settings.channel.min_layer_share),
        layer_outlier_ratio=layer_outlier_ratios(stats, loaded.sites.num_layers, settings.owl_multiple),
        detection={"origin": origin, "stop_reason": detection.get("stop_reason"),
                   "detected": [str(w) for w in _detected]})


def survival(before: dict, after: dict) -> dict:
    """Which of the outliers measured before fine-tuning are still there after it."""
    sw_after = set(after["detection"]["detected"])
    sw = {name: {"detected_after": name in sw_after, "value_before": value,
                 "value_after": after["super_weight_values"].get(name)}
          for name, value in before["super_weight_values"].items()}
    ma_b, ma_a = before["massive_activation"], after["massive_activation"]
    ma_kept = bool(ma_b["massive"] and ma_a["massive"] and ma_a["channel"] == ma_b["channel"])
    gamma_b = {(n, c) for n, cs in before["gamma_outliers"].items() for c in cs}
    gamma_a = {(n, c) for n, cs in after["gamma_outliers"].items() for c in cs}
    channel_b, channel_a = set(before["channel_outliers"]), set(after["channel_outliers"])
    return {
        "super_weights": sw,
        "sw_kept": sum(entry["detected_after"] for entry in sw.values()), "sw_total": len(sw),
        "ma_kept": ma_kept, "ma_before": ma_b["value"] if ma_b["massive"] else None,
        "ma_after": ma_a["value"], "ma_channel_after": ma_a["channel"],
        "gamma_kept": len(gamma_b & gamma_a), "gamma_total": len(gamma_b), "gamma_new": len(gamma_a - gamma_b),
        "channel_kept": len(channel_b & channel_a), "channel_total": len(channel_b),
        "channel_new": len(channel_a - channel_b),
    }
