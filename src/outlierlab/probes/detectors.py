"""The outlier criteria, each defined here once with its paper (presets in conf/probe/). The studies differ only in
where they look (which hook points, which norms, which gain parametrisation), never in the rule: the atlas
(probes/outliers.py), paper RO (probes/channel_outliers.py) and fine-tuning (finetune/atlas.py) all call these.

    BERT Busters   Kovaleva et al. 2021 (arXiv 2105.06990): an outlier dimension of a norm has a gain (or bias)
                   more than 3 sigma from the mean of that vector: `sigma_outliers` (conf/probe/norm_gain_outliers).
                   z-scores do not change under g -> a + b g, so w, 1 + w (Gemma) and a gain measured from the
                   module (w / sqrt(1 + eps)) give the same channels. The std is the sample std (ddof=1: atlas,
                   fine-tuning) or the population std (ddof=0: paper RO); both are kept because committed results
                   were made with them: on SmolLM2 they agree on all 297 channels, on Gemma-3-270M they differ on one
                   (layers.1.post_attention_layernorm #129, z = 3.0011 by the population std).
    LLM.int8       Dettmers et al. 2022 (arXiv 2208.07339, Sec. 4): an outlier feature has magnitude >= 6.0 in
                   >= 25% of the layers and >= 6% of the sequence positions (conf/probe/channel_outliers_int8):
                   `Int8Criterion`, `count_exceeding` (per channel, positions with |x| >= 6), `wide` (channels at
                   >= 6% of positions at one point), `int8_features` (channels doing so in >= 25% of the layers).
    relative       outlierlab (paper RO study): |x| >= 9 x the median |x| of the token's channels (for Gaussian
                   channels the median |x| is 0.674 sigma, so 9 x median ~ 6 sigma), with LLM.int8's share rules:
                   `count_relative`.
    OWL            Yin et al. 2023 (arXiv 2310.05175; OwLore, arXiv 2405.18380, samples layers by it): a layer's
                   outlier ratio is the share of its weights with |W_ij| * ||X_j||_2 > M x the layer's mean of that
                   score: `owl_scores`, `owl_outlier_ratio`.

The other criteria are each defined once where they are measured: paper MA (probes/massive_activations.py
MACriterion, probes/super_weight.py massive_activation), paper SW (probes/super_weight.py detect_super_weights),
PrefixQuant outlier tokens and Gu et al.'s sink rate (probes/outliers.py TokenCriterion, SinkCriterion).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

# ------------------------------------------------------------------------------------------------- BERT Busters
SIGMA = 3.0
TAILS = ("both", "high")


def sigma_outliers(values: torch.Tensor, sigma: float = SIGMA, tail: str = "both", ddof: int = 1) -> list[int]:
    """Indices of `values` more than `sigma` standard deviations from their mean (tail "both", BERT Busters; "high":
    only above the mean, the gains that make large activations). Computed in float64; a constant vector has none."""
    if tail not in TAILS:
        raise ValueError(f"tail={tail!r} is not one of {TAILS}")
    values = values.detach().double().flatten()
    std = values.std(correction=ddof)
    if not std > 0:
        return []
    deviation = values - values.mean()
    if tail == "both":
        deviation = deviation.abs()
    return (deviation > sigma * std).nonzero().flatten().tolist()


# ----------------------------------------------------------------------------------------------------- LLM.int8
@dataclass(frozen=True)
class Int8Criterion:
    threshold: float = 6.0           # LLM.int8: magnitude >= 6
    min_layer_share: float = 0.25    # ... in >= 25% of the layers
    min_position_share: float = 0.06  # ... at >= 6% of the positions


INT8 = Int8Criterion()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """|x| as [positions, channels] in float32 (any leading batch / sequence dimensions folded)."""
    return x.detach().float().reshape(-1, x.shape[-1]).abs()


def count_exceeding(x: torch.Tensor, threshold: float = INT8.threshold) -> torch.Tensor:
    """Per channel (last dimension): how many positions have |x| >= threshold."""
    return (_rows(x) >= threshold).sum(dim=0)


def count_relative(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per channel: how many positions have |x| >= ratio x the median |x| over that position's channels."""
    magnitude = _rows(x)
    return (magnitude >= ratio * magnitude.median(dim=-1, keepdim=True).values).sum(dim=0)


def wide(counts: torch.Tensor, positions: int, min_position_share: float = INT8.min_position_share) -> torch.Tensor:
    """Bool mask (the shape of counts): channels over the threshold at >= min_position_share of the positions."""
    return counts.double() / max(int(positions), 1) >= min_position_share


def int8_features(per_layer: Mapping[int, Iterable[int]], num_layers: int,
                  min_layer_share: float = INT8.min_layer_share) -> dict[int, int]:
    """Outlier features: channel -> number of layers where it is wide, for the channels wide in >= min_layer_share
    of `num_layers` layers (sorted by channel)."""
    counts: dict[int, int] = {}
    for channels in per_layer.values():
        for channel in set(channels):
            counts[channel] = counts.get(channel, 0) + 1
    return {c: counts[c] for c in sorted(counts) if counts[c] >= min_layer_share * num_layers}


# ---------------------------------------------------------------------------------------------------------- OWL
def owl_scores(weight: torch.Tensor, input_sum_sq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for a weight [out, in] and the per-input-channel sum of squares of its inputs (flattened)."""
    return (weight.detach().float().abs() * input_sum_sq.sqrt()[None, :]).flatten()


def owl_outlier_ratio(scores: torch.Tensor, multiple: float) -> float:
    """Share of a layer's scores above `multiple` x their mean (OWL's M, 5 in the paper's range)."""
    return float((scores > multiple * scores.mean()).float().mean())
