"""Mean value of the massive activations at every layer, over a calibration corpus, cached on disk.

The MA paper's "set to mean" intervention writes, at each MA coordinate (token position, channel), the mean of that
activation over calibration sequences. `ActivationMeans` folds each batch into running sums (float64) at the
`layers.{i}.out` sites, so memory does not grow with the number of sequences; it also keeps the per-sequence median
|h| of each layer, so a result can say how massive the MA is (MA / median).

`calibrated_means` caches the result under `<cache_dir>/ma_means/<key hash>.json`, keyed by:
    model    its source, GGUF file sha256 (when there is one) and the sha256 of its weights as loaded
    data     the calibration windows' provenance: corpus files' sha256, the text's and the token windows' sha256
    config   the MA coordinates, the batch size (float sums over batches of 1 and 4 differ in the last bits, so a
             mean measured at one batch size is not reused at another) and this probe's version
Any change to one of these gives another key, so a stale mean is never reused; nothing changed, nothing recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from outlierlab.models.hashing import weights_sha256
from outlierlab.models.massive import MassiveActivation
from outlierlab.probes.layer_major import observe_windows
from outlierlab.probes.stats import Probe

CACHE_VERSION = "ma_means/v1"


class ActivationMeans(Probe):
    """Per location and layer: running mean and std of h[:, positions, channels]; per layer: mean median |h|."""

    def __init__(self, sites, locations: list[MassiveActivation]):
        super().__init__(sites)
        self.locations = locations
        layers = sites.num_layers
        self.sums = [torch.zeros(layers, len(loc.positions), len(loc.channels), dtype=torch.float64)
                     for loc in locations]
        self.squares = [torch.zeros_like(s) for s in self.sums]
        self.median_sum = torch.zeros(layers, dtype=torch.float64)
        self.sequences = [0] * layers

    def hook_points(self):
        return self.sites.per_layer("layers.{i}.out", self._callback)

    def _callback(self, layer: int):
        def fold(hidden: torch.Tensor):
            hidden = hidden.detach()
            for number, location in enumerate(self.locations):
                positions = torch.tensor(location.positions, device=hidden.device)
                channels = torch.tensor(location.channels, device=hidden.device)
                values = hidden[:, positions[:, None], channels[None, :]].double()  # [batch, P, C]
                self.sums[number][layer] += values.sum(dim=0).cpu()
                self.squares[number][layer] += values.square().sum(dim=0).cpu()
            per_sequence = hidden.abs().float().reshape(hidden.shape[0], -1)
            self.median_sum[layer] += per_sequence.median(dim=1).values.double().sum().cpu()
            self.sequences[layer] += hidden.shape[0]
        return fold

    def summary(self) -> dict:
        count = max(self.sequences[0], 1)
        locations = []
        for number, location in enumerate(self.locations):
            mean = self.sums[number] / count
            variance = (self.squares[number] / count - mean.square()).clamp(min=0.0)
            locations.append({**location.describe(), "mean": mean.tolist(), "std": variance.sqrt().tolist()})
        return {"sequences": self.sequences[0], "locations": locations,
                "median_abs": (self.median_sum / count).tolist()}


def model_identity(loaded) -> dict:
    info = loaded.info
    return {"source": info.get("source"), "file_sha256": info.get("file_sha256"), "dtype": info.get("torch_dtype"),
            "weights_sha256": weights_sha256(loaded.model)}


def cache_key(loaded, locations: list[MassiveActivation], windows_meta: dict, batch_size: int = 1) -> dict:
    data = {key: windows_meta.get(key) for key in ("dataset", "split", "sampling", "seqlen", "windows", "bos",
                                                    "seed", "text_sha256", "windows_sha256", "data")}
    return {"version": CACHE_VERSION, "model": model_identity(loaded), "data": data,
            "locations": [location.describe() for location in locations], "batch_size": batch_size}


@torch.no_grad()
def measure_means(loaded, locations: list[MassiveActivation], windows, batch_size: int = 1) -> dict:
    seqlen = windows.ids.shape[1]
    for location in locations:
        if max(location.positions) >= seqlen:
            raise ValueError(f"massive activation position {max(location.positions)} is beyond the calibration "
                             f"windows' {seqlen} tokens")
    with ActivationMeans(loaded.sites, locations) as probe:
        observe_windows(loaded, windows.ids, batch_size, desc="MA means (calibration)")
    return probe.summary()


def calibrated_means(loaded, locations: list[MassiveActivation], windows, cache_dir, batch_size: int = 1) -> dict:
    """The MA means over `windows`, from the disk cache when model, data and coordinates are unchanged.

    Returns the probe summary plus `cache`: {path, hit, key}."""
    key = cache_key(loaded, locations, windows.meta, batch_size)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir).expanduser() / "ma_means" / f"{digest[:32]}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return {**stored["summary"], "cache": {"path": str(path), "hit": True, "key": key}}
    summary = measure_means(loaded, locations, windows, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".staging-", suffix=".json")
    with os.fdopen(handle, "w") as out:
        json.dump({"key": key, "summary": summary}, out)
    os.replace(staging, path)
    return {**summary, "cache": {"path": str(path), "hit": False, "key": key}}
