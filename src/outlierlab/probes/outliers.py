"""Outlier detectors beyond massive activations, each with its paper's criterion (presets in conf/probe/):

    OutlierTokens    PrefixQuant (arXiv 2410.05265): a token is an outlier token at a layer when its max |x| over
                     channels at the down_proj input is > `ratio` (64) x its median |x| (the mean |x| where
                     the median is 0: after a ReLU, OPT's MLP input is mostly zeros).
    ChannelOutliers  LLM.int8 (Dettmers et al. 2022, arXiv 2208.07339): an outlier feature is a channel with
                     |x| >= `threshold` (6.0) in >= `min_layer_share` (25%) of the layers and >= `min_position_share`
                     (6%) of the positions, in the hidden states fed to the linear layers (here: the outputs of
                     the pre-attention and pre-MLP norms, sites layers.{i}.norm1 / norm2).
    SinkRate         Gu et al. 2024, "When Attention Sink Emerges" (arXiv 2410.10781): Sink_1^eps = share of
                     (layer, head) whose attention to token 0, averaged over the queries of 64-token inputs,
                     exceeds eps = 0.3. Attention is causal, so queries 0..63 of a longer window see exactly what
                     they would see in a 64-token prompt: the metric comes from the same forward as everything else.
    norm_gains       the effective gain of every norm, measured from the module itself (so a norm computing
                     x * (1 + w), Gemma's, is read right without knowing it), with BERT Busters' (arXiv
                     2105.06990) > 3 sigma outlier channels.

All probes fold each batch into counters of fixed size (layers x channels at most); nothing keeps activations.
The LLM.int8 and BERT Busters rules are probes/detectors.py's (one definition each, shared with the RO and
fine-tuning studies); this module says where the atlas looks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from outlierlab.models import offload
from outlierlab.probes import detectors
from outlierlab.probes.stats import Probe


def _tokens_by_channels(tensor: torch.Tensor) -> torch.Tensor:
    """[batch * positions, channels] (OPT's MLP already sees [batch * positions, channels])."""
    return tensor.detach().float().reshape(-1, tensor.shape[-1])


@dataclass(frozen=True)
class TokenCriterion:
    ratio: float = 64.0  # PrefixQuant: token-wise max |x| > 64 x the median of the token-wise maxima


class OutlierTokens(Probe):
    """Per layer: how many tokens are outlier tokens at the down_proj input, the largest max/median, and at which
    positions (counted; positions are bounded by the window length)."""

    def __init__(self, sites, criterion: TokenCriterion = TokenCriterion()):
        super().__init__(sites)
        self.criterion = criterion
        layers = sites.num_layers
        self.tokens = [0] * layers
        self.outliers = [0] * layers
        self.max_ratio = [0.0] * layers
        self.positions: list[dict[int, int]] = [{} for _ in range(layers)]
        self._length = 1

    def observe(self, input_ids: torch.Tensor):
        self._length = input_ids.shape[-1]
        return self

    def hook_points(self):
        for layer in range(self.sites.num_layers):
            yield f"layers.{layer}.mlp.down_proj.in", self._callback(layer)

    def _callback(self, layer: int):
        def fold(x: torch.Tensor):
            maxima = _tokens_by_channels(x).abs().amax(dim=1).reshape(-1, self._length)  # [batch, positions]
            ratio = maxima / maxima.median(dim=1, keepdim=True).values.clamp(min=1e-12)
            hits = torch.nonzero(ratio.flatten() > self.criterion.ratio).flatten().tolist()
            self.tokens[layer] += ratio.numel()
            self.outliers[layer] += len(hits)
            self.max_ratio[layer] = max(self.max_ratio[layer], float(ratio.max()))
            for flat in hits:
                position = flat % self._length
                self.positions[layer][position] = self.positions[layer].get(position, 0) + 1
        return fold

    def summary(self) -> list[dict]:
        return [{"layer": layer, "tokens": self.tokens[layer], "outlier_tokens": self.outliers[layer],
                 "share": self.outliers[layer] / max(self.tokens[layer], 1), "max_ratio": self.max_ratio[layer],
                 "positions": sorted(self.positions[layer].items(), key=lambda item: -item[1])[:5]}
                for layer in range(self.sites.num_layers)]


ChannelCriterion = detectors.Int8Criterion  # LLM.int8: |x| >= 6, in >= 25% of the layers, at >= 6% of positions


class ChannelOutliers(Probe):
    """Per (layer, channel): how many positions reach |x| >= threshold at the norm outputs feeding the linears."""

    def __init__(self, sites, criterion: ChannelCriterion = detectors.INT8):
        super().__init__(sites)
        self.criterion = criterion
        self.points = [name for name in ("norm1", "norm2") if getattr(sites.family, name) is not None]
        self.counts: dict[str, torch.Tensor] = {}
        self.positions: dict[str, int] = {}

    def hook_points(self):
        for layer in range(self.sites.num_layers):
            for point in self.points:
                yield f"layers.{layer}.{point}.out", self._callback(layer, point)

    def _callback(self, layer: int, point: str):
        def fold(x: torch.Tensor):
            rows = _tokens_by_channels(x)
            key = f"{point}"
            if key not in self.counts:
                self.counts[key] = torch.zeros(self.sites.num_layers, rows.shape[1], dtype=torch.long)
                self.positions[key] = 0
            self.counts[key][layer] += detectors.count_exceeding(rows, self.criterion.threshold).cpu()
            if layer == 0:
                self.positions[key] += rows.shape[0]
        return fold

    def summary(self) -> dict:
        """Per site kind and per layer the channels at >= min_position_share of positions, and the outlier features
        (channels doing so in >= min_layer_share of the layers, at either site)."""
        layers = self.sites.num_layers
        per_layer = [set() for _ in range(layers)]
        by_point = {}
        for point, counts in self.counts.items():
            wide = detectors.wide(counts, self.positions[point], self.criterion.min_position_share)
            by_point[point] = [torch.nonzero(wide[layer]).flatten().tolist() for layer in range(layers)]
            for layer in range(layers):
                per_layer[layer].update(by_point[point][layer])
        features = list(detectors.int8_features(dict(enumerate(per_layer)), layers, self.criterion.min_layer_share))
        return {"criterion": vars(self.criterion) if hasattr(self.criterion, "__dict__") else self.criterion,
                "sites": self.points, "positions": self.positions,
                "count_per_layer": [len(layer_set) for layer_set in per_layer],
                "channels_per_layer": {point: lists for point, lists in by_point.items()},
                "features": features,
                "feature_layers": {c: [l for l in range(layers) if c in per_layer[l]] for c in features}}


@dataclass(frozen=True)
class SinkCriterion:
    eps: float = 0.3         # Gu et al. 2024: attention to token 0 above 0.3 ...
    prompt_tokens: int = 64  # ... averaged over the queries of 64-token inputs


class SinkRate(Probe):
    """Per (layer, head): attention to token 0 averaged over queries 0..prompt_tokens-1, summed over sequences."""

    def __init__(self, sites, criterion: SinkCriterion = SinkCriterion()):
        super().__init__(sites)
        self.criterion = criterion
        self.sums: list[torch.Tensor | None] = [None] * sites.num_layers
        self.sequences = [0] * sites.num_layers

    def hook_points(self):
        for layer in range(self.sites.num_layers):
            yield f"layers.{layer}.attn.probs", self._callback(layer)

    def _callback(self, layer: int):
        def fold(probs: torch.Tensor):
            queries = min(self.criterion.prompt_tokens, probs.shape[-2])
            to_first = probs[:, :, :queries, 0].float().mean(dim=-1)  # [batch, heads]
            total = to_first.sum(dim=0).double().cpu()
            self.sums[layer] = total if self.sums[layer] is None else self.sums[layer] + total
            self.sequences[layer] += probs.shape[0]
        return fold

    def summary(self) -> dict:
        per_layer, sinks, heads = [], 0, 0
        for layer, total in enumerate(self.sums):
            if total is None:
                raise RuntimeError(f"layers.{layer}.attn.probs was never observed: its attention cannot be observed")
            mean = total / max(self.sequences[layer], 1)
            sink_heads = int((mean > self.criterion.eps).sum())
            per_layer.append({"layer": layer, "sink_heads": sink_heads, "heads": mean.numel(),
                              "share": sink_heads / mean.numel(), "mean_attention_to_first": mean.tolist()})
            sinks, heads = sinks + sink_heads, heads + mean.numel()
        return {"criterion": {"eps": self.criterion.eps, "prompt_tokens": self.criterion.prompt_tokens},
                "sink_rate": sinks / max(heads, 1), "sink_heads": sinks, "heads": heads, "per_layer": per_layer}


@torch.no_grad()
def effective_gain(module: torch.nn.Module, size: int) -> torch.Tensor:
    """The per-channel gain a norm applies, measured by calling it: for x = (+1, -1, +1, ...) (mean 0, RMS 1),
    (norm(x) - norm(-x)) / 2x is the gain whatever the parametrisation (w, 1 + w, ...) and cancels any bias."""
    parameter = next(module.parameters())
    x = torch.ones(1, 1, size, dtype=parameter.dtype, device=offload.device(parameter))
    x[..., 1::2] = -1.0
    gain = (module(x) - module(-x)) / (2 * x)
    return gain.reshape(-1).float().cpu()


def _parametrisation(gain: torch.Tensor, weight: torch.Tensor) -> str:
    if torch.allclose(gain, weight, rtol=1e-3, atol=1e-3):
        return "w"
    if torch.allclose(gain, 1.0 + weight, rtol=1e-3, atol=1e-3):
        return "1 + w"
    return "other"


def norm_modules(loaded) -> list[tuple[str, int | None, torch.nn.Module]]:
    """(name, layer or None, module) of every normalisation over the hidden size: modules whose class name says
    Norm and whose only weight is a [hidden] vector (so per-head q/k norms are left out)."""
    hidden = loaded.model.config.hidden_size
    layer_of = {id(module): index for index, module in enumerate(loaded.sites.layers)}
    found = []
    for name, module in loaded.model.named_modules():
        weight = getattr(module, "weight", None)
        if "norm" not in type(module).__name__.lower() or not isinstance(weight, torch.Tensor):
            continue
        if weight.ndim != 1 or weight.numel() != hidden:
            continue
        layer = None
        for parent_name, parent in loaded.model.named_modules():
            if id(parent) in layer_of and name.startswith(parent_name + "."):
                layer = layer_of[id(parent)]
                break
        found.append((name, layer, module))
    return found


def norm_gains(loaded, sigmas: float = 3.0, top: int = 3) -> list[dict]:
    """Per norm: parametrisation (w or 1 + w, read from the module), the largest |gain| channels with their ratio
    to the median |gain|, and the channels more than `sigmas` std from the mean gain (BERT Busters)."""
    hidden = loaded.model.config.hidden_size
    rows = []
    for name, layer, module in norm_modules(loaded):
        gain = effective_gain(module, hidden)
        magnitude = gain.abs()
        median = float(magnitude.median()) or 1e-12
        order = magnitude.argsort(descending=True)[:top].tolist()
        outliers = detectors.sigma_outliers(gain, sigmas, ddof=1)
        rows.append({"name": name, "layer": layer, "kind": name.rpartition(".")[2],
                     "parametrisation": _parametrisation(gain, offload.values(module.weight).detach().float().cpu()),
                     "median_gain": median, "max_gain": float(gain[order[0]]), "max_channel": order[0],
                     "max_ratio_to_median": float(magnitude[order[0]]) / median,
                     "top": [{"channel": c, "gain": float(gain[c]), "ratio_to_median": float(magnitude[c]) / median}
                             for c in order],
                     "outlier_channels": outliers, "gain": gain})
    return rows


def gains_at(gains: list[dict], channel: int, layer: int) -> list[dict]:
    """Every norm of `layer` with its gain at `channel` and that gain's ratio to the norm's median."""
    return [{"name": row["name"], "gain": float(row["gain"][channel]),
             "ratio_to_median": abs(float(row["gain"][channel])) / row["median_gain"]}
            for row in gains if row["layer"] == layer]


@torch.no_grad()
def massive_activation_origin(loaded, ids: torch.Tensor, layer: int, channel: int, position: int) -> dict:
    """Where the MA (channel, position) that first appears after layers[layer] comes from, on one sequence: the
    residual before and after the block, and the part of that step that the block's down_proj output carries at
    the channel. down_proj making most of the step is the super-weight mechanism; a step far larger than down_proj's
    output means something after down_proj (a norm's gain on the sublayer output) scales it up."""
    seen = {}

    def keep(key):
        def fold(tensor):
            seen[key] = float(_tokens_by_channels(tensor)[position, channel])
        return fold

    before = f"layers.{layer - 1}.out" if layer > 0 else "embed.out"
    with loaded.sites.hooks({before: keep("before"), f"layers.{layer}.out": keep("after"),
                             f"layers.{layer}.mlp.down_proj.out": keep("down_proj")}):
        loaded.model(ids[:, : position + 1])
    step = seen["after"] - seen["before"]
    share = seen["down_proj"] / step if step else 0.0
    return {"layer": layer, "channel": channel, "position": position, "residual_before": seen["before"],
            "residual_after": seen["after"], "step": step, "down_proj_output": seen["down_proj"],
            "down_proj_share_of_step": share}
