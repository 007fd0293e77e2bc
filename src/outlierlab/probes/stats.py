"""Read-only probes: forward hooks that fold each batch into small running statistics.

Nothing here keeps an activation tensor after its hook returns, so memory does not grow with the number of
sequences. Use as a context manager around any number of forward passes:

    with ResidualStats(loaded.sites, k=3) as residual, DownProjStats(loaded.sites) as down:
        for batch in batches: model(batch)
    residual.summary(); down.summary()
"""
from __future__ import annotations

from abc import ABC, abstractmethod
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
        """Yield (site, callback) pairs."""

    def __enter__(self):
        for site, callback in self.hook_points():
            self._stack.enter_context(self.sites.hook(site, callback))
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
        batch, length, channels = values.shape
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


class ResidualStats(Probe):
    """Per layer (`layers.{i}.out`): global top-k |residual| with coordinates, and the per-sequence top-1..k and
    median |residual| averaged over sequences (the MA paper's layer-wise plot)."""

    def __init__(self, sites, k: int = 3):
        super().__init__(sites)
        self.k = k
        self.tokens: torch.Tensor | None = None  # set by `observe` so top-k entries can name their token
        self.sequences = 0
        self.top = [TopK(k) for _ in range(sites.num_layers)]
        self.sum_topk = torch.zeros(sites.num_layers, k, dtype=torch.float64)
        self.sum_median = torch.zeros(sites.num_layers, dtype=torch.float64)
        self._seen = [0] * sites.num_layers

    def observe(self, input_ids: torch.Tensor):
        """Call before each forward so entries record token ids."""
        self.tokens = input_ids.detach().cpu()
        return self

    def hook_points(self):
        for layer in range(self.sites.num_layers):
            yield f"layers.{layer}.out", self._callback(layer)

    def _callback(self, layer: int):
        def fold(hidden: torch.Tensor):
            hidden = hidden.detach()
            magnitude = hidden.abs().float()
            batch = magnitude.shape[0]
            per_sequence = magnitude.reshape(batch, -1)
            self.sum_topk[layer] += per_sequence.topk(self.k, dim=1).values.double().sum(dim=0).cpu()
            self.sum_median[layer] += per_sequence.median(dim=1).values.double().sum().cpu()
            self.top[layer].update(hidden, self.tokens, self._seen[layer])
            self._seen[layer] += batch
            self.sequences = max(self.sequences, self._seen[layer])
        return fold

    def summary(self) -> list[dict]:
        count = max(self.sequences, 1)
        return [{"layer": layer, "site": f"layers.{layer}.out",
                 "mean_topk": (self.sum_topk[layer] / count).tolist(),
                 "mean_median": float(self.sum_median[layer] / count),
                 "top": self.top[layer].as_dicts()} for layer in range(self.sites.num_layers)]


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
        batch, length, channels = magnitude.shape
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
        for layer in range(self.sites.num_layers):
            yield f"layers.{layer}.mlp.down_proj.in", self._on_input(layer)
            yield f"layers.{layer}.mlp.down_proj.out", self._on_output(layer)

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
