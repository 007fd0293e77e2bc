"""The statistics of our probes computed the ways researchers compute them instead, for scripts/bench.py.

Per layer: mean over sequences of the per-sequence top-k and median of |h| (residual stream after each block, the MA
paper's layer-wise plot), the largest |h| with its (sequence, position, channel); per layer the largest |input| and
|output| of mlp.down_proj with theirs (paper SW Fig. 3). Each way returns the same dict (`Statistics`), so a test can
check that every way gives our numbers (tests/test_bench.py):

    ours           ResidualStats + DownProjStats: streaming reducers in forward hooks (src/outlierlab/probes)
    nnsight        `.save()` of every layer output and down_proj input/output inside an nnsight trace, reduced after
    host_copy      forward hooks that copy every layer output (and down_proj input/output) to the host, reduced
                   there: the massive-activations repo's way (its hooks keep each layer's output on the CPU)
    hidden_states  `model(ids, output_hidden_states=True)`, reduced on the device. hidden_states[-1] is after the
                   final norm, so the last block's output is taken at the final norm's input (one hook); down_proj
                   is not in hidden_states: this way gives the residual statistics only

Every way reduces with the same plain torch code (`residual_statistics`, `peak`), as a researcher would write it.
Sites (models/sites.py) name the modules, so every family in the sites table works.
"""
from __future__ import annotations

import torch

from outlierlab.models.sites import first_tensor
from outlierlab.probes.stats import DownProjStats, ResidualStats

WAYS = ("ours", "nnsight", "host_copy", "hidden_states")


def peak(tensor: torch.Tensor) -> dict:
    """Largest |x| of [batch, T, C] and where it is (the first in row-major order), as 0-d tensors."""
    _batch, length, channels = tensor.shape
    magnitude = tensor.abs().reshape(-1)
    flat = magnitude.argmax()
    return {"abs": magnitude[flat].double(), "sequence": flat // (length * channels),
            "position": flat // channels % length, "channel": flat % channels}


def residual_statistics(hidden: torch.Tensor, k: int) -> dict:
    magnitude = hidden.abs().float().reshape(hidden.shape[0], -1)
    return {"sum_topk": magnitude.topk(k, dim=1).values.double().sum(dim=0),
            "sum_median": magnitude.median(dim=1).values.double().sum(), "max": peak(hidden)}


def down_proj_statistics(x: torch.Tensor, y: torch.Tensor) -> dict:
    return {"input_max": peak(x), "output_max": peak(y)}


class Statistics:
    """Per-forward results of one way, folded over forwards; `as_lists()` reads them to the host once."""

    def __init__(self):
        self.forwards: list[dict] = []  # {"sequences", "residual": [per layer], "down_proj": [per layer] | None}

    def add(self, sequences: int, residual: list[dict], down_proj: list[dict] | None):
        self.forwards.append({"sequences": sequences, "residual": residual, "down_proj": down_proj})

    def as_lists(self) -> dict:
        count = sum(f["sequences"] for f in self.forwards)
        layers = len(self.forwards[0]["residual"])
        residual, down = [], []
        for layer in range(layers):
            rows = [f["residual"][layer] for f in self.forwards]
            best, offset = None, 0
            for forward, row in zip(self.forwards, rows):
                entry = _host(row["max"], offset)
                if best is None or entry["abs"] > best["abs"]:
                    best = entry
                offset += forward["sequences"]
            residual.append({"mean_topk": (sum(r["sum_topk"] for r in rows) / count).tolist(),
                             "mean_median": float(sum(r["sum_median"] for r in rows) / count), "max": best})
            if self.forwards[0]["down_proj"] is not None:
                down.append({key: _best([(f["down_proj"][layer][key], f["sequences"]) for f in self.forwards])
                             for key in ("input_max", "output_max")})
        return {"residual": residual, "down_proj": down or None}


def _host(entry: dict, first_sequence: int) -> dict:
    values = {key: value.item() for key, value in entry.items()}
    values["sequence"] = int(values["sequence"]) + first_sequence
    return {"abs": values["abs"], **{key: int(values[key]) for key in ("sequence", "position", "channel")}}


def _best(entries: list[tuple[dict, int]]) -> dict:
    best, offset = None, 0
    for entry, sequences in entries:
        host = _host(entry, offset)
        if best is None or host["abs"] > best["abs"]:
            best = host
        offset += sequences
    return best


class Ours:
    """ResidualStats + DownProjStats hooked for the whole run; `statistics()` from their summaries."""
    name = "ours"

    def __init__(self, loaded, k: int = 3, down_proj: bool = True):
        self.loaded, self.k, self.down_proj = loaded, k, down_proj
        self.residual = ResidualStats(loaded.sites, k=k).__enter__()
        self.down = DownProjStats(loaded.sites).__enter__() if down_proj else None

    def forward(self, ids: torch.Tensor):
        self.residual.observe(ids)
        self.loaded.model(ids)

    def close(self):
        self.residual.__exit__(None, None, None)
        if self.down is not None:
            self.down.__exit__(None, None, None)

    def statistics(self) -> dict:
        residual = [{"mean_topk": row["mean_topk"], "mean_median": row["mean_median"],
                     "max": {key: row["top"][0][key] for key in ("abs", "sequence", "position", "channel")}}
                    for row in self.residual.summary()]
        down = None
        if self.down is not None:
            down = [{key: {field: row[key][field] for field in ("abs", "sequence", "position", "channel")}
                     for key in ("input_max", "output_max")} for row in self.down.summary()]
        return {"residual": residual, "down_proj": down}


class _Folding:
    """A way that reduces after each forward and keeps the per-forward results."""

    def __init__(self, loaded, k: int = 3, down_proj: bool = True):
        self.loaded, self.k, self.down_proj = loaded, k, down_proj
        self.results = Statistics()

    def close(self):
        pass

    def statistics(self) -> dict:
        return self.results.as_lists()


class NNsightWay(_Folding):
    """`.save()` inside an nnsight trace (nnsight.NNsight wraps the loaded model), reduced after the trace."""
    name = "nnsight"

    def __init__(self, loaded, k: int = 3, down_proj: bool = True):
        from nnsight import NNsight
        super().__init__(loaded, k, down_proj)
        self.wrapped = NNsight(loaded.model)
        family = loaded.sites.family
        self.layers_path, self.down_path = family.layers, family.down_proj

    @staticmethod
    def _envoy(root, path: str):
        for part in path.split("."):
            root = getattr(root, part)
        return root

    def forward(self, ids: torch.Tensor):
        saved = []
        with self.wrapped.trace(ids):
            layers = self._envoy(self.wrapped, self.layers_path)
            for layer in range(self.loaded.sites.num_layers):
                block = layers[layer]
                if self.down_proj:
                    down = self._envoy(block, self.down_path)  # in execution order: down_proj runs first
                    x, y = down.input.save(), down.output.save()
                    saved.append((block.output.save(), x, y))
                else:
                    saved.append((block.output.save(), None, None))
        residual = [residual_statistics(first_tensor(h), self.k) for h, _, _ in saved]
        down = [down_proj_statistics(x, y) for _, x, y in saved] if self.down_proj else None
        self.results.add(ids.shape[0], residual, down)


class HostCopy(_Folding):
    """Forward hooks that copy each block's output (and down_proj's input and output) to the host; reduced there
    after the forward."""
    name = "host_copy"

    def forward(self, ids: torch.Tensor):
        sites, stored = self.loaded.sites, {}

        def keep(name):
            return lambda tensor: stored.__setitem__(name, tensor.detach().to("cpu", copy=True))
        handles = []
        for layer in range(sites.num_layers):
            handles.append(sites.register(f"layers.{layer}.out", keep(("out", layer))))
            if self.down_proj:
                handles.append(sites.register(f"layers.{layer}.mlp.down_proj.in", keep(("in", layer))))
                handles.append(sites.register(f"layers.{layer}.mlp.down_proj.out", keep(("down", layer))))
        try:
            self.loaded.model(ids)
        finally:
            for handle in handles:
                handle.remove()
        layers = range(sites.num_layers)
        residual = [residual_statistics(stored["out", layer], self.k) for layer in layers]
        down = ([down_proj_statistics(stored["in", layer], stored["down", layer]) for layer in layers]
                if self.down_proj else None)
        self.results.add(ids.shape[0], residual, down)


class HiddenStates(_Folding):
    """`output_hidden_states=True`; the last block's output from the final norm's input (hidden_states[-1] is
    normed). Residual statistics only."""
    name = "hidden_states"

    def __init__(self, loaded, k: int = 3, down_proj: bool = False):
        super().__init__(loaded, k, down_proj=False)

    def forward(self, ids: torch.Tensor):
        last = {}
        with self.loaded.sites.hook("final_norm.in", lambda tensor: last.__setitem__("h", tensor.detach())):
            hidden = self.loaded.model(ids, output_hidden_states=True).hidden_states
        outputs = [*hidden[1:self.loaded.sites.num_layers], last["h"]]
        self.results.add(ids.shape[0], [residual_statistics(h, self.k) for h in outputs], None)


def make(way: str, loaded, k: int = 3, down_proj: bool = True):
    return {"ours": Ours, "nnsight": NNsightWay, "host_copy": HostCopy, "hidden_states": HiddenStates}[way](
        loaded, k, down_proj)


def state_size(probe) -> dict:
    """What a probe holds, found by walking its attributes: bytes of every tensor and the number of entries of every
    list / tuple / dict / set / Counter (whatever a fold might append to), excluding the model it observes."""
    from collections.abc import Mapping

    from outlierlab.models.sites import Sites
    seen, totals = set(), {"tensor_bytes": 0, "entries": 0}

    def walk(value):
        if id(value) in seen or isinstance(value, (torch.nn.Module, Sites)) or callable(value) and not hasattr(
                value, "__dict__"):
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            totals["tensor_bytes"] += value.numel() * value.element_size()
        elif isinstance(value, Mapping):
            totals["entries"] += len(value)
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, (list, tuple, set, frozenset)):
            totals["entries"] += len(value)
            for item in value:
                walk(item)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for item in vars(value).values():
                walk(item)
    walk(probe)
    return {"probe": type(probe).__name__, **totals}
