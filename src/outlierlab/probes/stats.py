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

import numpy as np
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


def row_topk(magnitude: torch.Tensor, k: int, row_max: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence top-k of a non-negative [batch, T, C] tensor: (values [batch, k] descending, flat indices into
    T * C); `row_max` is magnitude.amax(dim=2) when the caller has it. Equal to
    `magnitude.reshape(batch, -1).topk(k, dim=1)` (up to the order of exact ties), but ~10x faster on the CPU: the
    k largest elements of a sequence lie in its k rows (positions) with the largest row maximum, so one row-max
    pass narrows topk to k x C candidates."""
    batch, length, channels = magnitude.shape
    rows = min(k, length)
    row_max = magnitude.amax(dim=2) if row_max is None else row_max
    best_rows = row_max.topk(rows, dim=1).indices  # [batch, rows]
    candidates = magnitude.gather(1, best_rows[:, :, None].expand(batch, rows, channels))
    values, index = candidates.reshape(batch, -1).topk(k, dim=1)
    flat = best_rows.gather(1, index // channels) * channels + index % channels
    return values, flat


def row_medians(values: torch.Tensor, has_nan: torch.Tensor | None = None) -> torch.Tensor:
    """torch.median(values, dim=1).values of a [batch, N] tensor (the lower median), computed fast.

    On the CPU torch's median is ~50x slower than numpy's introselect (np.partition), which returns the same
    element; NaN propagates as in torch (pass `has_nan` [batch] when it is known, else it is computed). Elsewhere
    (CUDA) torch's own median runs on the device."""
    if values.device.type != "cpu" or values.dtype not in (torch.float32, torch.float64):
        return values.median(dim=1).values
    rank = (values.shape[1] - 1) // 2
    medians = torch.from_numpy(np.partition(values.numpy(), rank, axis=1)[:, rank].copy())
    if has_nan is None:
        has_nan = values.isnan().any(dim=1)
    return torch.where(has_nan, torch.full_like(medians, float("nan")), medians)


def peak_abs(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest |x| of a [batch, T, C] tensor as 0-d device tensors (value, sequence * T + position, channel),
    where `value` is the signed element; the first such element in row-major order, as
    `tensor.abs().reshape(-1).argmax()` gives. No host sync, and no |x| copy of the whole tensor."""
    batch, length, channels = tensor.shape
    rows = tensor.reshape(batch * length, channels)
    row_max = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg())  # max |x| per row; NaN propagates
    row = row_max.argmax()
    values = rows.index_select(0, row.reshape(1))[0]  # index_select, not rows[row]: a 0-d index would sync
    channel = values.abs().argmax()
    return values.index_select(0, channel.reshape(1))[0], row, channel


class TopK:
    """Running top-k of |x| with coordinates (sequence, position, channel) and the token at that position.

    The state is k entries kept as tensors on the model's device; merging a batch is a few small device ops
    (no host sync); `as_dicts` / `entries` read them to the host."""

    FIELDS = ("abs", "value", "sequence", "position", "channel", "token")

    def __init__(self, k: int):
        self.k = k
        self._abs: torch.Tensor | None = None  # [<= k] float32, descending
        self._value = self._sequence = self._position = self._channel = self._token = None

    def merge(self, magnitudes: torch.Tensor, values: torch.Tensor, flat: torch.Tensor, channels: int,
              tokens: torch.Tensor | None, first_sequence: int):
        """Fold candidates [batch, k] (|x|, signed x, flat index position * C + channel within the sequence)."""
        batch, count = magnitudes.shape
        device = magnitudes.device
        local = torch.arange(batch, device=device)[:, None].expand(batch, count)
        position, channel = flat // channels, flat % channels
        token = tokens[local, position] if tokens is not None else torch.full_like(flat, -1)
        new = [magnitudes.float().reshape(-1), values.float().reshape(-1), (local + first_sequence).reshape(-1),
               position.reshape(-1), channel.reshape(-1), token.reshape(-1)]
        if self._abs is not None:
            new = [torch.cat([old, part]) for old, part in zip(self._state(), new)]
        # stable: on equal |x| earlier sequences (and entries already kept) come first
        order = new[0].sort(descending=True, stable=True).indices[: self.k]
        (self._abs, self._value, self._sequence, self._position, self._channel,
         self._token) = (part[order] for part in new)

    def _state(self):
        return [self._abs, self._value, self._sequence, self._position, self._channel, self._token]

    @property
    def entries(self) -> list[tuple]:
        """(abs value, signed value, sequence, position, channel, token) of each kept entry, largest first."""
        if self._abs is None:
            return []
        columns = [part.tolist() for part in self._state()]
        return [(a, v, s, p, c, None if t < 0 else t) for a, v, s, p, c, t in zip(*columns)]

    def as_dicts(self) -> list[dict]:
        return [dict(zip(self.FIELDS, entry)) for entry in self.entries]


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
        # running sums live on the model's device (moved there at the first forward): no host sync per layer
        self.sum_topk = torch.zeros(layers, k, dtype=torch.float64)
        self.sum_median = torch.zeros(layers, dtype=torch.float64)
        self.hits: list[dict[tuple[int, int], HitGroup]] = [{} for _ in range(layers)]
        self.moment_sum: list[torch.Tensor | None] = [None] * layers
        self.moment_sum_sq: list[torch.Tensor | None] = [None] * layers
        self._seen = [0] * layers
        self._copies: dict = {}  # (name, device) -> tokens / labels on that device, for the current batch

    def observe(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """Call before each forward so entries record token ids (and, with `exceedance`, position labels:
        an integer tensor shaped like input_ids)."""
        self.tokens = input_ids.detach()
        self.labels = None if labels is None else labels.detach()
        self._copies = {}
        return self

    def _on(self, name: str, device) -> torch.Tensor | None:
        """`self.tokens` / `self.labels` on `device`, copied once per batch."""
        tensor = getattr(self, name)
        if tensor is None:
            return None
        key = (name, str(device))
        if key not in self._copies:
            self._copies[key] = tensor.to(device)
        return self._copies[key]

    def hook_points(self):
        return self.sites.per_layer("layers.{i}.out", self._callback)

    def _callback(self, layer: int):
        def fold(hidden: torch.Tensor):
            hidden = hidden.detach()
            if self.sum_topk.device != hidden.device:
                self.sum_topk, self.sum_median = self.sum_topk.to(hidden.device), self.sum_median.to(hidden.device)
            magnitude = hidden.abs().float()
            batch, _length, channels = magnitude.shape
            row_max = magnitude.amax(dim=2)  # [batch, T]: shared by top-k and the exceedance scan
            top_values, top_flat = row_topk(magnitude, self.k, row_max)
            medians = row_medians(magnitude.reshape(batch, -1), top_values[:, 0].isnan() if self.k else None)
            self.sum_topk[layer] += top_values.double().sum(dim=0)
            self.sum_median[layer] += medians.double().sum()
            signed = hidden.reshape(batch, -1).gather(1, top_flat)
            self.top[layer].merge(top_values, signed, top_flat, channels, self._on("tokens", hidden.device),
                                  self._seen[layer])
            if self.exceedance is not None:
                self._fold_hits(layer, hidden, magnitude, row_max, medians)
            if self.moments:
                self._fold_moments(layer, hidden)
            self._seen[layer] += batch
            self.sequences = max(self.sequences, self._seen[layer])
        return fold

    def _fold_hits(self, layer: int, hidden: torch.Tensor, magnitude: torch.Tensor, row_max: torch.Tensor,
                   medians: torch.Tensor):
        threshold = (medians * self.exceedance.median_ratio).clamp(min=self.exceedance.min_abs)
        # only positions whose row maximum exceeds the threshold can hold a hit: scan those rows alone
        rows = (row_max > threshold[:, None]).nonzero()  # [R, 2] (sequence, position), row-major
        if rows.shape[0] == 0:
            return
        sequence, position = rows[:, 0], rows[:, 1]
        mask = magnitude[sequence, position] > threshold[sequence, None]  # [R, C]
        row, channel = mask.nonzero().unbind(dim=1)  # row-major: the order of hidden[full mask]
        sequence, position = sequence[row], position[row]
        where = torch.stack([sequence, position, channel], dim=1).cpu().tolist()
        values = hidden[sequence, position, channel].float().cpu().tolist()
        medians = medians.cpu().tolist()
        labels, tokens = self._on("labels", "cpu"), self._on("tokens", "cpu")
        groups = self.hits[layer]
        for (sequence, position, channel), value in zip(where, values):
            label = int(labels[sequence, position]) if labels is not None else 0
            token = int(tokens[sequence, position]) if tokens is not None else None
            ratio = abs(value) / medians[sequence] if medians[sequence] > 0 else float("inf")
            group = groups.setdefault((channel, label), HitGroup())
            group.add(value, ratio, self._seen[layer] + sequence, position, token)

    def _fold_moments(self, layer: int, hidden: torch.Tensor):
        if self.moment_sum[layer] is None:
            self.moment_sum[layer] = torch.zeros(hidden.shape[1:], dtype=torch.float64, device=hidden.device)
            self.moment_sum_sq[layer] = torch.zeros_like(self.moment_sum[layer])
        if hidden.shape[1:] != self.moment_sum[layer].shape:
            raise ValueError(f"moments need equal-length sequences: got {tuple(hidden.shape[1:])}, "
                             f"expected {tuple(self.moment_sum[layer].shape)}")
        if hidden.shape[0] == 1 and hidden.dtype != torch.float64:
            # in place, in float64, no [T, C] temporaries: x * x of a float32/bf16 x is exact in float64, so this
            # equals the general path below bit for bit
            self.moment_sum[layer].add_(hidden[0])
            self.moment_sum_sq[layer].addcmul_(hidden[0], hidden[0])
            return
        values = hidden.double()
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


class Extreme:
    """Running max |x| with where it was (sequence, position, channel).

    State: one float64 vector [abs, value, sequence, position, channel] on the tensor's device, updated with
    torch.where (no host sync); read with `as_dict()` or the attributes. A NaN never counts as larger."""

    FIELDS = ("abs", "value", "sequence", "position", "channel")

    def __init__(self):
        self.state = torch.tensor([-1.0, 0.0, -1.0, -1.0, -1.0], dtype=torch.float64)

    def update(self, tensor: torch.Tensor, first_sequence: int) -> torch.Tensor:
        """Fold a [batch, T, C] tensor; returns a 0-d bool tensor: whether the maximum grew."""
        value, row, channel = peak_abs(tensor.detach())
        length = tensor.shape[1]
        candidate = torch.stack([value.abs().double(), value.double(), (row // length + first_sequence).double(),
                                 (row % length).double(), channel.double()])
        state = self.state.to(candidate.device)
        grew = candidate[0] > state[0]
        self.state = torch.where(grew, candidate, state)
        return grew

    def as_dict(self) -> dict:
        abs_, value, sequence, position, channel = self.state.tolist()
        return {"abs": abs_, "value": value, "sequence": int(sequence), "position": int(position),
                "channel": int(channel)}

    def __getattr__(self, name):
        if name in Extreme.FIELDS:
            return self.as_dict()[name]
        raise AttributeError(name)


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
            grew = self.output[layer].update(y, self._seen[layer])
            x = self._last_input[layer]
            if x is not None:
                # the input row at the output's peak (sequence, position), taken when the peak is new
                peak = self.output[layer].state
                batch, length, channels = x.shape
                index = ((peak[2] - self._seen[layer]) * length + peak[3]).long().clamp(0, batch * length - 1)
                row = x.detach().reshape(batch * length, channels).index_select(0, index.reshape(1))[0]
                channel = row.abs().argmax()
                value = row.index_select(0, channel.reshape(1))[0].double()
                candidate = torch.stack([value.abs(), value, peak[2], peak[3], channel.double()])
                state = self.input_at_output_peak[layer].state.to(candidate.device)
                self.input_at_output_peak[layer].state = torch.where(grew, candidate, state)
            self._last_input[layer] = None
            self._seen[layer] += y.shape[0]
        return fold

    def summary(self) -> list[dict]:
        return [{"layer": layer, "site": f"layers.{layer}.mlp.down_proj",
                 "input_max": self.input[layer].as_dict(), "output_max": self.output[layer].as_dict(),
                 "input_at_output_peak": self.input_at_output_peak[layer].as_dict()}
                for layer in range(self.sites.num_layers)]
