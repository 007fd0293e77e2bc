"""Super experts (Su et al., "Unveiling Super Experts in Mixture-of-Experts Large Language Models", arXiv 2507.23279,
ICLR 2026; code ZunhaiSu/Super-Experts-Profilling).

Per routed expert of every MoE block, the largest |down_proj output| over calibration windows (ExpertProfile, through
the expert sites: `layers.{i}.mlp.experts.down_proj.out`, every expert's `.{e}.down_proj.out` at once), and the router's load per expert
(`layers.{i}.mlp.router.experts`). An expert is a super expert when its max is above the `quantile` (99.5th
percentile) of all experts' maxima and above `min_fraction_of_max` (a tenth) of the largest, among the experts of the
first `layer_fraction` (75%) of the layers (the paper's criterion; preset conf/probe/super_experts.yaml).

The paper's two thresholds always admit the largest expert (it is above any percentile below 100 and above a tenth
of itself): they rank experts of a model known to have super experts. So that a model without any finds none,
outlierlab adds one scale-free guard, `min_ratio_to_median`: the max must also be that many times the median expert's
max (10 by default; random experts are within ~3x of each other, Qwen3-30B-A3B's super experts reach thousands
against tens in the paper's Fig. 1). Set it to null for the paper's rule alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from outlierlab.probes.stats import Probe


@dataclass(frozen=True)
class SuperExpertCriterion:
    quantile: float = 99.5              # Su et al.: above the 99.5th percentile of the experts' max |output| ...
    min_fraction_of_max: float = 0.1    # ... and above a tenth of the largest of them
    layer_fraction: float = 0.75        # ... among the experts of the first 75% of the layers
    min_ratio_to_median: float | None = 10.0  # outlierlab's guard: ... and >= 10x the median expert's max


class ExpertProfile(Probe):
    """Per (MoE layer, expert): the max |down_proj output| over every routed token (its output channel) and the
    number of tokens routed to it (the router's load). Reads all experts of a layer at once
    (`layers.{i}.mlp.experts.down_proj.out`, rows sorted by expert): a few tensor operations per layer."""

    def __init__(self, sites):
        super().__init__(sites)
        # Running state on the model's device, updated without a host sync (one per forward at most: the router).
        self.max_abs: dict[int, torch.Tensor] = {}
        self.channel: dict[int, torch.Tensor] = {}
        self.load: dict[int, torch.Tensor] = {}
        self._sorted: dict[int, torch.Tensor] = {}

    def hook_points(self):
        for layer in self.sites.moe_layers:
            yield f"layers.{layer}.mlp.router.experts", self._count(layer)
            yield f"layers.{layer}.mlp.experts.down_proj.out", self._fold(layer)

    def _count(self, layer: int):
        def count(indices: torch.Tensor):
            experts = self.sites.num_experts(layer)
            if layer not in self.load:
                self.load[layer] = torch.zeros(experts, dtype=torch.int64, device=indices.device)
                self.max_abs[layer] = torch.zeros(experts, dtype=torch.float32, device=indices.device)
                self.channel[layer] = torch.full((experts,), -1, dtype=torch.int64, device=indices.device)
            self.load[layer] += torch.bincount(indices.reshape(-1), minlength=experts)
            self._sorted[layer] = torch.sort(indices.reshape(-1)).values  # the expert of each row of the outputs
        return count

    def _fold(self, layer: int):
        def fold(out: torch.Tensor):
            """Every expert's rows at once: the peak |value| of each row, then the largest per expert."""
            experts = self._sorted.pop(layer)
            peaks, channels = out.detach().abs().float().max(dim=-1)
            maxima = self.max_abs[layer].clone().scatter_reduce_(0, experts, peaks, reduce="amax")
            # the channel of the row that holds each expert's new max (the last such row when several tie)
            holds = peaks == maxima[experts]
            self.channel[layer].scatter_(0, experts[holds], channels[holds])
            self.max_abs[layer] = maxima
        return fold

    def summary(self) -> list[dict]:
        """One entry per (layer, expert): max_abs_out, channel, tokens routed, share of the layer's routing."""
        entries = []
        for layer in self.sites.moe_layers:
            if layer not in self.load:
                raise RuntimeError(f"layers.{layer}.mlp.router was never observed: run the model inside the probe")
            load, maxima, channels = (self.load[layer].tolist(), self.max_abs[layer].double().tolist(),
                                      self.channel[layer].tolist())
            total = max(sum(load), 1)
            entries += [{"layer": layer, "expert": expert, "max_abs_out": maxima[expert], "channel": channels[expert],
                         "tokens": load[expert], "load_share": load[expert] / total} for expert in range(len(load))]
        return entries


@torch.no_grad()
def profile_experts(loaded, ids: torch.Tensor, batch_size: int = 1) -> list[dict]:
    """ExpertProfile over the windows `ids` [n, seqlen]."""
    with ExpertProfile(loaded.sites) as profile:
        for start in tqdm(range(0, len(ids), batch_size), desc="profile experts", leave=False):
            loaded.model(ids[start:start + batch_size].to(loaded.device))
    return profile.summary()


def find_super_experts(profile: list[dict], num_layers: int, criterion: SuperExpertCriterion) -> dict:
    """The super experts of a profile (largest first) and the thresholds they passed."""
    considered = [e for e in profile if e["layer"] < criterion.layer_fraction * num_layers]
    if not considered:
        return {"super_experts": [], "quantile_threshold": None, "global_max": None, "considered": 0}
    maxima = torch.tensor([e["max_abs_out"] for e in considered], dtype=torch.float64)
    threshold = float(torch.quantile(maxima, criterion.quantile / 100))
    global_max, median = float(maxima.max()), float(maxima.median())
    floor = max(threshold, criterion.min_fraction_of_max * global_max)
    guard = None if criterion.min_ratio_to_median is None else criterion.min_ratio_to_median * median
    chosen = [dict(e, ratio_to_max=e["max_abs_out"] / global_max if global_max else 0.0,
                   ratio_to_median=e["max_abs_out"] / median if median else float("inf"))
              for e in considered if e["max_abs_out"] > floor and (guard is None or e["max_abs_out"] >= guard)]
    return {"super_experts": sorted(chosen, key=lambda e: -e["max_abs_out"]), "quantile_threshold": threshold,
            "global_max": global_max, "median_max": median, "median_guard": guard, "considered": len(considered)}
