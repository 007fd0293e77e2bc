"""Read-only probes: forward hooks that fold each batch into small running statistics.

Nothing here keeps an activation tensor after its hook returns, so memory does not grow with the number of
sequences. Use as a context manager around any number of forward passes:

    with ResidualStats(loaded.sites, k=3) as residual, DownProjStats(loaded.sites) as down:
        for batch in batches: model(batch)
    residual.summary(); down.summary()
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch


class Probe(ABC):
    """Registers hooks on enter, removes them on exit."""

    def __init__(self, sites):
        self.sites = sites
        self._stack = ExitStack()

    @abstractmethod
    def hook_points(self):
        """{site: callback} (or (site, callback) pairs) for `Sites.hooks`; `Sites.per_layer` builds per-layer ones."""

    def __enter__(self):
        self._stack.enter_context(self.sites.hooks(self.hook_points()))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


@dataclass
class TopK:
    """Running top-k of |x| with coordinates (sequence, position, channel) and the token at that position."""
    k: int
    entries: list = field(default_factory=list)  # (abs value, signed value, sequence, position, channel, token)

    def update(self, values: torch.Tensor, tokens: torch.Tensor | None, first_sequence: int):
        _batch, length, channels = values.shape
        flat_values = values.reshape(-1)
        top = flat_values.abs().topk(min(self.k, flat_values.numel()))  # on the model's device; only k leave it
        signed = flat_values[top.indices].float().tolist()
        for abs_value, value, flat in zip(top.values.float().tolist(), signed, top.indices.tolist()):
            sequence, rest = divmod(flat, length * channels)
            position, channel = divmod(rest, channels)
            token = int(tokens[sequence, position]) if tokens is not None else None
            self.entries.append((abs_value, value, first_sequence + sequence, position, channel, token))
        self.entries = sorted(self.entries, key=lambda entry: -entry[0])[: self.k]

    def as_dicts(self) -> list[dict]:
        keys = ("abs", "value", "sequence", "position", "channel", "token")
        return [dict(zip(keys, entry)) for entry in self.entries]


@dataclass(frozen=True)
class Exceedance:
    """Record every activation with |x| > max(min_abs, median_ratio * median |x| of its sequence at that layer)."""
    min_abs: float
    median_ratio: float


@dataclass
class HitGroup:
    """Running summary of the recorded activations of one (channel, label) at one layer."""
    count: int = 0
    sequences: int = 0  # distinct sequences with at least one hit
    last_sequence: int = -1
    sum: float = 0.0
    sum_sq: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    sum_ratio: float = 0.0  # sum of |x| / (median |x| of its sequence and layer)
    positions: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)

    def add(self, value: float, ratio: float, sequence: int, position: int, token: int | None):
        self.count += 1
        if sequence != self.last_sequence:
            self.sequences += 1
            self.last_sequence = sequence
        self.sum += value
        self.sum_sq += value * value
        self.min, self.max = min(self.min, value), max(self.max, value)
        self.sum_ratio += ratio
        self.positions[position] += 1
        if token is not None:
            self.tokens[token] += 1

    def as_dict(self, top: int = 5) -> dict:
        mean = self.sum / self.count
        variance = max(self.sum_sq / self.count - mean * mean, 0.0)
        return {"count": self.count, "sequences": self.sequences, "mean": mean, "std": variance ** 0.5,
                "min": self.min, "max": self.max, "mean_ratio_to_median": self.sum_ratio / self.count,
                "positions": [[p, c] for p, c in self.positions.most_common(top)],
                "distinct_positions": len(self.positions),
                "tokens": [[t, c] for t, c in self.tokens.most_common(top)]}


class ResidualStats(Probe):
    """Per layer (`layers.{i}.out`): global top-k |residual| with coordinates, and the per-sequence top-1..k and
    median |residual| averaged over sequences (the MA paper's layer-wise plot).

    Optional, still streaming:
    - `exceedance`: every activation above the threshold is folded into a HitGroup per (channel, label), where the
      label of a position comes from `observe(input_ids, labels)` (e.g. first token / first delimiter / other);
      state is bounded by channels x labels x positions, not by the number of sequences.
    - `moments`: per (position, channel) running sum and sum of squares over sequences (float64,
      layers x T x C x 16 bytes), for the mean and variance of each coordinate across inputs. All batches must then
      have the same length T.
    """

    def __init__(self, sites, k: int = 3, exceedance: Exceedance | None = None, moments: bool = False):
        super().__init__(sites)
        self.k = k
        self.exceedance = exceedance
        self.moments = moments
        self.tokens: torch.Tensor | None = None  # set by `observe` so top-k entries can name their token
        self.labels: torch.Tensor | None = None
        self.sequences = 0
        layers = sites.num_layers
        self.top = [TopK(k) for _ in range(layers)]
        self.sum_topk = torch.zeros(layers, k, dtype=torch.float64)
        self.sum_median = torch.zeros(layers, dtype=torch.float64)
        self.hits: list[dict[tuple[int, int], HitGroup]] = [{} for _ in range(layers)]
        self.moment_sum: list[torch.Tensor | None] = [None] * layers
        self.moment_sum_sq: list[torch.Tensor | None] = [None] * layers
        self._seen = [0] * layers

    def observe(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """Call before each forward so entries record token ids (and, with `exceedance`, position labels:
        an integer tensor shaped like input_ids)."""
        self.tokens = input_ids.detach().cpu()
        self.labels = None if labels is None else labels.detach().cpu()
        return self

    def hook_points(self):
        return self.sites.per_layer("layers.{i}.out", self._callback)

    def _callback(self, layer: int):
        def fold(hidden: torch.Tensor):
            hidden = hidden.detach()
            magnitude = hidden.abs().float()
            batch = magnitude.shape[0]
            per_sequence = magnitude.reshape(batch, -1)
            medians = per_sequence.median(dim=1).values
            self.sum_topk[layer] += per_sequence.topk(self.k, dim=1).values.double().sum(dim=0).cpu()
            self.sum_median[layer] += medians.double().sum().cpu()
            self.top[layer].update(hidden, self.tokens, self._seen[layer])
            if self.exceedance is not None:
                self._fold_hits(layer, hidden, magnitude, medians)
            if self.moments:
                self._fold_moments(layer, hidden)
            self._seen[layer] += batch
            self.sequences = max(self.sequences, self._seen[layer])
        return fold

    def _fold_hits(self, layer: int, hidden: torch.Tensor, magnitude: torch.Tensor, medians: torch.Tensor):
        threshold = (medians * self.exceedance.median_ratio).clamp(min=self.exceedance.min_abs)
        mask = magnitude > threshold[:, None, None]
        if not bool(mask.any()):
            return
        where = mask.nonzero().cpu().tolist()  # row-major, the same order as hidden[mask]
        values = hidden[mask].float().cpu().tolist()
        medians = medians.cpu().tolist()
        groups = self.hits[layer]
        for (sequence, position, channel), value in zip(where, values):
            label = int(self.labels[sequence, position]) if self.labels is not None else 0
            token = int(self.tokens[sequence, position]) if self.tokens is not None else None
            ratio = abs(value) / medians[sequence] if medians[sequence] > 0 else float("inf")
            group = groups.setdefault((channel, label), HitGroup())
            group.add(value, ratio, self._seen[layer] + sequence, position, token)

    def _fold_moments(self, layer: int, hidden: torch.Tensor):
        values = hidden.double()
        if self.moment_sum[layer] is None:
            self.moment_sum[layer] = torch.zeros(values.shape[1:], dtype=torch.float64, device=values.device)
            self.moment_sum_sq[layer] = torch.zeros_like(self.moment_sum[layer])
        if values.shape[1:] != self.moment_sum[layer].shape:
            raise ValueError(f"moments need equal-length sequences: got {tuple(values.shape[1:])}, "
                             f"expected {tuple(self.moment_sum[layer].shape)}")
        self.moment_sum[layer] += values.sum(dim=0)
        self.moment_sum_sq[layer] += values.square().sum(dim=0)

    def coordinate_moments(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (population) std across sequences of every (position, channel) at `layer`, each [T, C]."""
        if self.moment_sum[layer] is None:
            raise ValueError("no moments recorded (construct ResidualStats with moments=True and run a forward)")
        count = self._seen[layer]
        mean = self.moment_sum[layer] / count
        variance = (self.moment_sum_sq[layer] / count - mean.square()).clamp(min=0)
        return mean.cpu(), variance.sqrt().cpu()

    def summary(self) -> list[dict]:
        count = max(self.sequences, 1)
        rows = []
        for layer in range(self.sites.num_layers):
            row = {"layer": layer, "site": f"layers.{layer}.out",
                   "mean_topk": (self.sum_topk[layer] / count).tolist(),
                   "mean_median": float(self.sum_median[layer] / count),
                   "top": self.top[layer].as_dicts()}
            if self.exceedance is not None:
                row["hits"] = [{"channel": channel, "label": label, **group.as_dict()}
                               for (channel, label), group in sorted(self.hits[layer].items())]
            rows.append(row)
        return rows


@dataclass
class Extreme:
    """Running max |x| with where it was (sequence, position, channel)."""
    abs: float = -1.0
    value: float = 0.0
    sequence: int = -1
    position: int = -1
    channel: int = -1

    def update(self, tensor: torch.Tensor, first_sequence: int):
        magnitude = tensor.detach().abs()
        flat = int(magnitude.reshape(-1).argmax())
        _batch, length, channels = magnitude.shape
        sequence, rest = divmod(flat, length * channels)
        position, channel = divmod(rest, channels)
        peak = float(magnitude[sequence, position, channel])
        if peak > self.abs:
            self.abs, self.value = peak, float(tensor[sequence, position, channel])
            self.sequence, self.position, self.channel = first_sequence + sequence, position, channel


class DownProjStats(Probe):
    """Per layer: max |input| and max |output| of mlp.down_proj with their channel and position (paper SW Fig. 3).
    `input_at_output_peak` is the input channel with the largest |x| at the output's peak position: the column of
    a super weight when that output is a spike."""

    def __init__(self, sites):
        super().__init__(sites)
        layers = sites.num_layers
        self.input = [Extreme() for _ in range(layers)]
        self.output = [Extreme() for _ in range(layers)]
        self._last_input: list[torch.Tensor | None] = [None] * layers
        self.input_at_output_peak = [Extreme() for _ in range(layers)]
        self._seen = [0] * layers

    def hook_points(self):
        return {**self.sites.per_layer("layers.{i}.mlp.down_proj.in", self._on_input),
                **self.sites.per_layer("layers.{i}.mlp.down_proj.out", self._on_output)}

    def _on_input(self, layer):
        def fold(x: torch.Tensor):
            self.input[layer].update(x, self._seen[layer])
            self._last_input[layer] = x.detach()  # held only until the matching output hook, same forward
        return fold

    def _on_output(self, layer):
        def fold(y: torch.Tensor):
            before = self.output[layer].abs
            self.output[layer].update(y, self._seen[layer])
            x = self._last_input[layer]
            if self.output[layer].abs > before and x is not None:
                peak = self.output[layer]
                row = x[peak.sequence - self._seen[layer], peak.position]
                channel = int(row.abs().argmax())
                self.input_at_output_peak[layer] = Extreme(abs(float(row[channel])), float(row[channel]),
                                                           peak.sequence, peak.position, channel)
            self._last_input[layer] = None
            self._seen[layer] += y.shape[0]
        return fold

    def summary(self) -> list[dict]:
        return [{"layer": layer, "site": f"layers.{layer}.mlp.down_proj",
                 "input_max": vars(self.input[layer]).copy(), "output_max": vars(self.output[layer]).copy(),
                 "input_at_output_peak": vars(self.input_at_output_peak[layer]).copy()}
                for layer in range(self.sites.num_layers)]
