"""Super experts (Su et al., "Unveiling Super Experts in Mixture-of-Experts Large Language Models", arXiv 2507.23279,
ICLR 2026; code ZunhaiSu/Super-Experts-Profilling).

Per routed expert of every MoE block, the largest |down_proj output| over calibration windows (ExpertProfile, through
the expert sites `layers.{i}.mlp.experts.{e}.down_proj.out`), and the router's load per expert
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
    number of tokens routed to it (the router's load)."""

    def __init__(self, sites):
        super().__init__(sites)
        self.max_abs = {layer: torch.zeros(sites.num_experts(layer), dtype=torch.float64) for layer in sites.moe_layers}
        self.channel = {layer: torch.full((sites.num_experts(layer),), -1) for layer in sites.moe_layers}
        self.load = {layer: torch.zeros(sites.num_experts(layer), dtype=torch.int64) for layer in sites.moe_layers}

    def hook_points(self):
        for layer in self.sites.moe_layers:
            yield f"layers.{layer}.mlp.router.experts", self._count(layer)
            for expert in range(self.sites.num_experts(layer)):
                yield f"layers.{layer}.mlp.experts.{expert}.down_proj.out", self._fold(layer, expert)

    def _count(self, layer: int):
        def count(indices: torch.Tensor):
            self.load[layer] += torch.bincount(indices.reshape(-1).cpu(), minlength=self.load[layer].numel())
        return count

    def _fold(self, layer: int, expert: int):
        def fold(out: torch.Tensor):
            if out.numel() == 0:
                return
            peak, flat = out.detach().abs().float().reshape(-1).max(dim=0)
            if float(peak) > self.max_abs[layer][expert]:
                self.max_abs[layer][expert] = float(peak)
                self.channel[layer][expert] = int(flat) % out.shape[-1]
        return fold

    def summary(self) -> list[dict]:
        """One entry per (layer, expert): max_abs_out, channel, tokens routed, share of the layer's routing."""
        entries = []
        for layer in self.sites.moe_layers:
            total = max(int(self.load[layer].sum()), 1)
            entries += [{"layer": layer, "expert": expert, "max_abs_out": float(self.max_abs[layer][expert]),
                         "channel": int(self.channel[layer][expert]), "tokens": int(self.load[layer][expert]),
                         "load_share": int(self.load[layer][expert]) / total}
                        for expert in range(self.load[layer].numel())]
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
