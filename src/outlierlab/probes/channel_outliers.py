"""Channel-wise outliers (fixed channels that are large at nearly every token) and the norm gains they come from
(paper RO, Zhang, Raman, Sharma 2025, arXiv 2505.21670).

    ChannelStats          streaming per-channel statistics at named hook points (counts over positions, never the
                          activations): |x| >= an absolute threshold, |x| >= a ratio x the token's median |x|,
                          max |x|, mean |x|
    channel_outliers      LLM.int8's outlier features (Dettmers et al. 2022, arXiv 2208.07339, Sec. 4: magnitude
                          >= 6 in >= 25% of the layers and >= 6% of the sequence positions), per kind of site
    gamma_outliers        outlier norm dimensions (BERT Busters, Kovaleva et al. 2021, arXiv 2105.06990: a gain
                          more than 3 sigma from the layer's mean, in at least half of the layers; the bias too where
                          the norm has one); the gain is the family's convention (Gemma: 1 + w)
    coincidence           which gain-outlier channels are also activation-outlier channels at that norm's output

Two criteria for an activation outlier at one position: LLM.int8's absolute |x| >= 6 (calibrated on models whose
normalised hidden states are O(1)) and a relative one, |x| >= 9 x the median |x| of that token's channels (ours:
for Gaussian channels the median |x| is 0.674 sigma, so 9 x median ~ 6 sigma), which does not depend on the
model's scale. Both use LLM.int8's share rules (>= 6% of positions at a layer, >= 25% of layers). The rules are
probes/detectors.py's (one definition each, shared with the atlas and fine-tuning studies); this module says where
the RO study looks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from outlierlab.probes import detectors
from outlierlab.probes.layer_major import observe_windows
from outlierlab.probes.stats import Probe


@torch.no_grad()
def forward_windows(loaded, ids: torch.Tensor, batch_size: int = 1, desc: str = "probe") -> None:
    """Run [n, seqlen] token windows through the model (for the probes hooked around this call; layer-major when
    the model is offloaded: probes/layer_major.py)."""
    observe_windows(loaded, ids, batch_size, desc)


@dataclass(frozen=True)
class OutlierCriterion:
    # LLM.int8 (Dettmers et al. 2022, Sec. 4): "magnitude of at least 6.0", "in at least 25% of transformer
    # layers" and "at least 6% of the sequence dimensions".
    min_abs: float = detectors.INT8.threshold
    position_share: float = detectors.INT8.min_position_share
    layer_share: float = detectors.INT8.min_layer_share
    # Relative criterion (ours, see the module docstring): |x| >= median_ratio x the token's median |x|.
    median_ratio: float = 9.0


@dataclass(frozen=True)
class GammaCriterion:
    # BERT Busters (Kovaleva et al. 2021): > 3 sigma from the mean of the layer's weights, in >= half the layers.
    sigma: float = detectors.SIGMA
    layer_share: float = 0.5


def criteria_from_config(exp) -> tuple[OutlierCriterion, GammaCriterion]:
    """exp.criterion and exp.gamma_criterion of an RO exp (ro_gamma, ro_encoder) as criteria, checked (ConfigError)."""
    from omegaconf import OmegaConf

    from outlierlab.errors import ConfigError
    try:
        outlier = OutlierCriterion(**OmegaConf.to_container(exp.criterion))
        gamma = GammaCriterion(**OmegaConf.to_container(exp.gamma_criterion))
    except TypeError as error:
        raise ConfigError(f"exp.criterion / exp.gamma_criterion: {error}") from None
    for key in ("position_share", "layer_share"):
        if not 0 < getattr(outlier, key) <= 1:
            raise ConfigError(f"exp.criterion.{key}={getattr(outlier, key)} must be in (0, 1]")
    if not 0 < gamma.layer_share <= 1:
        raise ConfigError(f"exp.gamma_criterion.layer_share={gamma.layer_share} must be in (0, 1]")
    return outlier, gamma


def linear_input_points(sites, layer: int) -> list[str]:
    """Hook points of one block whose tensor some linear reads, besides the norm outputs: the attention's output
    projection input and the MLP's down_proj input (the q/k/v and gate/up inputs are the norm1/norm2 outputs)."""
    points = [f"layers.{layer}.attn.o_proj.in", f"layers.{layer}.mlp.down_proj.in"]
    return [p for p in points if sites.has(p)]


def channel_points(sites) -> list[str]:
    """Every norm output and linear input of every block, and the final norm's output."""
    points = []
    for layer in range(sites.num_layers):
        points += [f"{norm}.out" for norm in sites.norms(layer)] + linear_input_points(sites, layer)
    return points + (["final_norm.out"] if sites.has("final_norm") else [])


def kind(point: str) -> str:
    """`layers.3.norm2.out` -> `norm2.out` (the same point across layers)."""
    return point.split(".", 2)[2] if point.startswith("layers.") else point


def layer_of(point: str) -> int | None:
    return int(point.split(".")[1]) if point.startswith("layers.") else None


class ChannelStats(Probe):
    """Per hook point and channel, over every position of every sequence: how many positions have |x| >= min_abs,
    how many have |x| >= median_ratio x that token's median |x|, the max |x| and the sum of |x|."""

    def __init__(self, sites, points: list[str], criterion: OutlierCriterion = OutlierCriterion()):
        super().__init__(sites)
        self.points, self.criterion = list(points), criterion
        self.positions = dict.fromkeys(self.points, 0)
        self.absolute: dict[str, torch.Tensor | None] = dict.fromkeys(self.points)
        self.relative: dict[str, torch.Tensor | None] = dict.fromkeys(self.points)
        self.max_abs: dict[str, torch.Tensor | None] = dict.fromkeys(self.points)
        self.sum_abs: dict[str, torch.Tensor | None] = dict.fromkeys(self.points)

    def hook_points(self):
        for point in self.points:
            yield point, self._callback(point)

    def _callback(self, point: str):
        def fold(x: torch.Tensor):
            magnitude = x.detach().abs().float().reshape(-1, x.shape[-1])  # [positions, channels]
            counts = (detectors.count_exceeding(magnitude, self.criterion.min_abs),
                      detectors.count_relative(magnitude, self.criterion.median_ratio),
                      magnitude.amax(0), magnitude.double().sum(0))
            if self.absolute[point] is None:
                self.absolute[point], self.relative[point], self.max_abs[point], self.sum_abs[point] = (
                    c.cpu() for c in counts)
            else:
                self.absolute[point] += counts[0].cpu()
                self.relative[point] += counts[1].cpu()
                self.max_abs[point] = torch.maximum(self.max_abs[point], counts[2].cpu())
                self.sum_abs[point] += counts[3].cpu()
            self.positions[point] += magnitude.shape[0]
        return fold

    def share(self, point: str, which: str = "absolute") -> torch.Tensor:
        """Per channel: the share of positions meeting the absolute or relative criterion."""
        counts = self.absolute[point] if which == "absolute" else self.relative[point]
        if counts is None:
            raise ValueError(f"no activations seen at {point} (run a forward inside the probe)")
        return counts.double() / self.positions[point]

    def wide(self, point: str, which: str = "absolute") -> list[int]:
        """The channels meeting the criterion at >= position_share of the positions (detectors.wide)."""
        counts = self.absolute[point] if which == "absolute" else self.relative[point]
        return detectors.wide(counts, self.positions[point], self.criterion.position_share).nonzero().flatten().tolist()

    def summary(self) -> dict:
        """Per point: per-layer outlier channels (share of positions >= position_share) under both criteria, as a
        range string (`decode_channels`), the TOP of them by share with their share and max |x|; the point's max and
        mean |x|. Small whatever the model: on Gemma-3 every channel can be an outlier by the absolute rule."""
        rows = {}
        for point in self.points:
            if self.absolute[point] is None:
                continue
            row = {"positions": self.positions[point], "channels": int(self.absolute[point].numel()),
                   "max_abs": float(self.max_abs[point].max()),
                   "mean_abs": float(self.sum_abs[point].sum() / (self.positions[point] * self.absolute[point].numel()))}
            for which in ("absolute", "relative"):
                share = self.share(point, which)
                channels = self.wide(point, which)
                top = sorted(channels, key=lambda c: -float(share[c]))[:TOP]
                row[which] = {"count": len(channels), "channels": encode_channels(channels),
                              "top": [[c, round(float(share[c]), 4), float(self.max_abs[point][c])] for c in top]}
            rows[point] = row
        return rows


TOP = 16


def encode_channels(channels: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (sorted, compact in a result file)."""
    runs, start = [], None
    for index, channel in enumerate(channels):
        if start is None:
            start = channel
        if index + 1 == len(channels) or channels[index + 1] != channel + 1:
            runs.append(str(start) if start == channel else f"{start}-{channel}")
            start = None
    return ",".join(runs)


def decode_channels(text: str) -> list[int]:
    channels = []
    for run in filter(None, text.split(",")):
        first, _, last = run.partition("-")
        channels += list(range(int(first), int(last or first) + 1))
    return channels


def channel_outliers(summary: dict, criterion: OutlierCriterion = OutlierCriterion(), which: str = "absolute",
                     num_layers: int | None = None) -> dict:
    """LLM.int8's outlier features per kind of point: channels that are outliers (>= position_share of positions) in
    >= layer_share of the layers where that kind of point exists. Also "hidden": pooled over every point whose
    tensor has the hidden size (a channel counts at a layer when it is an outlier at any such point of the layer),
    which is how LLM.int8 counts a feature of the hidden dimension."""
    by_kind: dict[str, dict[int, set]] = {}
    hidden_size = None
    for point, row in summary.items():
        layer = layer_of(point)
        if layer is None:
            continue
        by_kind.setdefault(kind(point), {})[layer] = set(decode_channels(row[which]["channels"]))
        if kind(point).startswith("norm"):
            hidden_size = row["channels"]
    pooled: dict[int, set] = {}
    for point, row in summary.items():
        layer = layer_of(point)
        if layer is not None and row["channels"] == hidden_size:
            pooled.setdefault(layer, set()).update(decode_channels(row[which]["channels"]))
    result = {}
    for name, layers in [*sorted(by_kind.items()), ("hidden", pooled)]:
        found = detectors.int8_features(layers, num_layers or len(layers), criterion.layer_share)
        result[name] = {"features": list(found), "layers_per_feature": found,
                        "per_layer": {layer: len(channels) for layer, channels in sorted(layers.items())}}
    return result


TAILS = detectors.TAILS


def _deviations(values: torch.Tensor, sigma: float, tail: str = "both") -> list[int]:
    return detectors.sigma_outliers(values, sigma, tail, ddof=0)  # RO: the population std


def norm_outlier_channels(sites, norm: str, sigma: float = 3.0, tail: str = "both") -> dict:
    """One norm: the channels whose gain (family convention: norm_gain_offset + w) is more than sigma standard
    deviations from the mean gain of that norm (tail "both", BERT Busters; "high": only above the mean, the gains
    that make large activations), and likewise for its bias where it has one."""
    module = sites.module(norm)
    gain = sites.norm_gain(norm)
    bias = getattr(module, "bias", None)
    return {"gain": _deviations(gain, sigma, tail),
            "bias": None if bias is None else _deviations(bias.detach().float(), sigma),
            "gain_mean": float(gain.mean()), "gain_std": float(gain.std(unbiased=False)),
            "gain_max": float(gain.abs().max())}


def gamma_outliers(sites, criterion: GammaCriterion = GammaCriterion(), tail: str = "both") -> dict:
    """Per norm role (norm1, norm2, ...): per layer the sigma-outlier channels of the gain (and bias), and BERT
    Busters' outlier dimensions: channels that are gain outliers in >= layer_share of the layers with that norm
    ("gain_and_bias": those that are also bias outliers there, where the norm has a bias)."""
    roles: dict[str, dict] = {}
    for layer in range(sites.num_layers):
        for norm in sites.norms(layer):
            roles.setdefault(kind(norm), {})[layer] = norm_outlier_channels(sites, norm, criterion.sigma, tail)
    result = {}
    for role, layers in roles.items():
        counts, both = {}, {}
        for found in layers.values():
            for channel in found["gain"]:
                counts[channel] = counts.get(channel, 0) + 1
                if found["bias"] is not None and channel in found["bias"]:
                    both[channel] = both.get(channel, 0) + 1
        need = criterion.layer_share * len(layers)
        has_bias = any(found["bias"] is not None for found in layers.values())
        result[role] = {"per_layer": layers,
                        "consistent": sorted(c for c, n in counts.items() if n >= need),
                        "gain_and_bias": sorted(c for c, n in both.items() if n >= need) if has_bias else None}
    return result


def gamma_outliers_record(gammas: dict, criterion: GammaCriterion, gain_offset: float, **extra) -> dict:
    """`gamma_outliers` as a result records it (layers as string keys), with its criterion and gain convention."""
    return {"criterion": vars(criterion), **extra, "gain_offset": gain_offset,
            "roles": {role: {"consistent": found["consistent"], "gain_and_bias": found["gain_and_bias"],
                             "per_layer": {str(k): v for k, v in found["per_layer"].items()}}
                      for role, found in gammas.items()}}


def coincidence(gammas: dict, summary: dict, which: str = "absolute") -> dict:
    """Per norm role: of the per-layer gain-outlier channels, how many are activation-outlier channels at that
    norm's output in the same layer, and of the activation-outlier channels, how many have an outlier gain."""
    result = {}
    for role, found in gammas.items():
        gain_total = gain_hit = act_total = act_hit = 0
        for layer, entry in found["per_layer"].items():
            row = summary.get(f"layers.{layer}.{role}.out")
            if row is None:
                continue
            gain, act = set(entry["gain"]), set(decode_channels(row[which]["channels"]))
            gain_total, gain_hit = gain_total + len(gain), gain_hit + len(gain & act)
            act_total, act_hit = act_total + len(act), act_hit + len(act & gain)
        result[role] = {"gain_outliers": gain_total, "also_activation_outliers": gain_hit,
                        "activation_outliers": act_total, "with_outlier_gain": act_hit}
    return result
