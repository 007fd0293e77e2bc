"""Super weights inside experts: paper SW's criterion (Yu et al. 2024, arXiv 2411.07191, Sec. 3.1, as
probes/super_weight.py applies it to a dense down_proj) applied to each routed expert of a mixture of experts.

Per expert, over the tokens routed to it (sites `layers.{i}.mlp.experts.{e}.down_proj.in|out`): the largest
|down_proj output| (row, token) and, at that token, the largest |input| (col). The weight (layer, expert, row, col) is
a super weight when output and input both reach `spike_layer_ratio` x the median |.| of that expert's own output /
input (conf/probe/sw_detection.yaml's scale-free preset), it makes at least `min_share` of the output spike, and it is
at least `min_weight_zscore` std of that expert's matrix. One pass over `ids`: every expert is judged on its own
tokens, so no zero-and-repeat is needed to see a second one.
"""
from __future__ import annotations

import torch

from outlierlab.models.coords import SuperWeight
from outlierlab.probes.super_weight import _scale


class _ExpertSpikes:
    def __init__(self, sites):
        self.sites, self.inputs, self.best = sites, {}, {}

    def hooks(self) -> dict:
        points = {}
        for layer in self.sites.moe_layers:
            for expert in range(self.sites.num_experts(layer)):
                points[f"layers.{layer}.mlp.experts.{expert}.down_proj.in"] = self._keep(layer, expert)
                points[f"layers.{layer}.mlp.experts.{expert}.down_proj.out"] = self._fold(layer, expert)
        return points

    def _keep(self, layer: int, expert: int):
        def keep(inputs: torch.Tensor):
            self.inputs[(layer, expert)] = inputs.detach().float()
        return keep

    def _fold(self, layer: int, expert: int):
        def fold(out: torch.Tensor):
            inputs = self.inputs.pop((layer, expert))
            if out.numel() == 0:
                return
            out = out.detach().float()
            token, row = divmod(int(out.abs().argmax()), out.shape[-1])
            if abs(float(out[token, row])) <= self.best.get((layer, expert), {}).get("output_abs", -1.0):
                return
            col = int(inputs[token].abs().argmax())
            self.best[(layer, expert)] = {
                "layer": layer, "expert": expert, "row": row, "col": col, "output": float(out[token, row]),
                "input": float(inputs[token, col]), "output_abs": abs(float(out[token, row])),
                "input_abs": abs(float(inputs[token, col])), "output_median": _scale(out), "input_median": _scale(inputs)}
        return fold


@torch.no_grad()
def detect_expert_super_weights(loaded, ids: torch.Tensor, spike_layer_ratio: float = 100.0, min_share: float = 0.5,
                                min_weight_zscore: float = 10.0, provenance: str | None = None) -> dict:
    """{"super_weights": [{coord: [layer, expert, row, col], value, contribution_share, weight_zscore, ...}],
    "candidates": every expert whose input and output spike}; ids [n, seqlen]."""
    spikes = _ExpertSpikes(loaded.sites)
    with loaded.sites.hooks(spikes.hooks()):
        for window in ids:
            loaded.model(window[None].to(loaded.device))
    candidates = []
    for spike in spikes.best.values():
        if (spike["output_abs"] < spike_layer_ratio * (spike["output_median"] or 1e-12)
                or spike["input_abs"] < spike_layer_ratio * (spike["input_median"] or 1e-12)):
            continue
        weight = SuperWeight(spike["layer"], spike["row"], spike["col"], spike["expert"])
        view = loaded.sites.super_weight_view(weight)
        matrix = view.as_out_in()
        value = float(matrix[weight.row, weight.col])
        candidates.append({**spike, "coord": weight.coord, "label": str(weight), "value": value,
                           "contribution_share": value * spike["input"] / spike["output"] if spike["output"] else 0.0,
                           "weight_zscore": abs(value) / float(matrix.float().std())})
    found = [c for c in candidates if c["contribution_share"] >= min_share and c["weight_zscore"] >= min_weight_zscore]
    return {"provenance": provenance, "spike_layer_ratio": spike_layer_ratio, "min_share": min_share,
            "min_weight_zscore": min_weight_zscore, "super_weights": sorted(found, key=lambda c: -c["output_abs"]),
            "candidates": candidates}
