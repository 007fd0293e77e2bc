"""Where each massive activation (MA) is born: the MA criterion at every hook point inside every block, in forward
order (paper RO: MAs first appear after the activation of the first FFN that makes them, y6 in Llama/Qwen blocks,
y4 in GPT blocks; models/sites.py BLOCK_POINTS and `paper_label`).

`SiteExtremes` folds, per (point, sequence): the largest |x| with its position and channel, the sequence's median
|x| at that point, and whether the MA criterion holds there (paper MA: |x| > 100 and > 1000 x the median; the same
`MACriterion` as the MA study); per point it keeps counts, a channel counter of the hits and the max |x| of every
channel (a vector of the point's width), so memory does not grow with the number of sequences.

`first_appearance` reads that summary: the first point (forward order) where any MA appears, and for every MA
channel of the residual stream (hits at `layers.{i}.out`), the first point whose hits include that channel, and the
point just before it in the same block.
"""
from __future__ import annotations

from collections import Counter

import torch

from outlierlab.probes.massive_activations import MACriterion
from outlierlab.probes.stats import Probe


class SiteExtremes(Probe):
    def __init__(self, sites, points: list[str] | None = None, criterion: MACriterion = MACriterion()):
        super().__init__(sites)
        self.points = points or [p for layer in range(sites.num_layers) for p in sites.block_points(layer)]
        self.criterion = criterion
        self.state = {p: {"sequences": 0, "hits": 0, "sum_peak": 0.0, "sum_median": 0.0, "max_abs": None,
                          "peak": (0.0, -1, -1, -1), "channels": Counter(), "positions": Counter(),
                          "max_ratio": 0.0} for p in self.points}

    def hook_points(self):
        for point in self.points:
            yield point, self._callback(point)

    def _callback(self, point: str):
        state = self.state[point]

        def fold(x: torch.Tensor):
            magnitude = x.detach().abs().float()
            batch, _, channels = magnitude.shape
            flat = magnitude.reshape(batch, -1)
            peaks, where = flat.max(dim=1)
            medians = flat.median(dim=1).values
            per_channel = magnitude.amax(dim=(0, 1)).cpu()
            state["max_abs"] = per_channel if state["max_abs"] is None else torch.maximum(state["max_abs"], per_channel)
            for b, (peak, index, median) in enumerate(zip(peaks.tolist(), where.tolist(), medians.tolist())):
                position, channel = divmod(index, channels)
                ratio = peak / median if median > 0 else float("inf")
                state["sum_peak"] += peak
                state["sum_median"] += median
                if peak > state["peak"][0]:
                    state["peak"] = (peak, state["sequences"] + b, position, channel)
                if peak > self.criterion.min_abs and ratio > self.criterion.median_ratio:
                    state["hits"] += 1
                    state["max_ratio"] = max(state["max_ratio"], ratio)
                    threshold = max(self.criterion.min_abs, self.criterion.median_ratio * median)
                    hit = (magnitude[b] > threshold).nonzero().tolist()  # every massive (position, channel)
                    state["channels"].update({c for _, c in hit})
                    state["positions"].update({p for p, _ in hit})
            state["sequences"] += batch
        return fold

    def summary(self) -> list[dict]:
        rows = []
        for point in self.points:
            state = self.state[point]
            count = max(state["sequences"], 1)
            peak, sequence, position, channel = state["peak"]
            rows.append({"point": point, "layer": int(point.split(".")[1]), "kind": point.split(".", 2)[2],
                         "label": self.sites.paper_label(point), "sequences": state["sequences"],
                         "hit_share": state["hits"] / count, "mean_peak": state["sum_peak"] / count,
                         "mean_median": state["sum_median"] / count, "max_ratio": state["max_ratio"],
                         "peak": {"abs": peak, "sequence": sequence, "position": position, "channel": channel},
                         "channels": [[c, n] for c, n in state["channels"].most_common(8)],
                         "positions": [[p, n] for p, n in state["positions"].most_common(8)],
                         "width": None if state["max_abs"] is None else int(state["max_abs"].numel())})
        return rows

    def channel_max(self, point: str) -> torch.Tensor:
        return self.state[point]["max_abs"]


def criterion_from(section) -> tuple[MACriterion, float]:
    """(MACriterion, min_share) from a config section {min_abs, median_ratio, min_share}; ValueError names the key."""
    section = dict(section)
    share = section.pop("min_share", 0.5)
    try:
        criterion = MACriterion(**section)
    except TypeError as error:
        raise ValueError(f"exp.criterion: {error}") from None
    for key in ("min_abs", "median_ratio"):
        if not getattr(criterion, key) > 0:
            raise ValueError(f"exp.criterion.{key}={getattr(criterion, key)} must be > 0")
    if not 0 < share <= 1:
        raise ValueError(f"exp.criterion.min_share={share} must be in (0, 1]")
    return criterion, share


def first_appearance(rows: list[dict], min_share: float = 0.5) -> dict:
    """The birth of the MAs in a SiteExtremes summary (rows in forward order).

    A point "has an MA" when the criterion holds in >= min_share of the sequences. For every residual MA channel
    (a hit channel at some `layers.{i}.out` with that share): `residual_point` is the first point of the residual's
    width whose hits include it, and `born_at` the first point of that block, up to there, that has an MA of
    another width (inside the MLP: the down_proj input) or in that channel (an MA of another channel carried by the
    residual does not count); `before` is the point just before it."""
    with_ma = [row for row in rows if row["hit_share"] >= min_share and row["sequences"]]
    result = {"first": with_ma[0]["point"] if with_ma else None,
              "first_label": with_ma[0]["label"] if with_ma else None, "channels": []}
    residual = {}
    for row in with_ma:
        if row["kind"] == "out":
            for channel, count in row["channels"]:
                if count >= min_share * row["sequences"]:
                    residual.setdefault(channel, row["layer"])
    width = next((row["width"] for row in rows if row["kind"] == "out"), None)
    for channel, out_layer in sorted(residual.items(), key=lambda item: item[1]):
        first_wide = next((row for row in with_ma if row["width"] == width and row["layer"] <= out_layer
                           and any(c == channel and n >= min_share * row["sequences"] for c, n in row["channels"])),
                          None)
        layer = first_wide["layer"] if first_wide else out_layer
        in_block = [row for row in rows if row["layer"] == layer]

        def makes_it(row):  # massive, and either inside the MLP/attention (another width) or in this channel
            return row in with_ma and (row["width"] != width or any(
                c == channel and n >= min_share * row["sequences"] for c, n in row["channels"]))
        end = in_block.index(first_wide) + 1 if first_wide in in_block else len(in_block)
        born = next((row for row in in_block[:end] if makes_it(row)), first_wide)
        index = in_block.index(born) if born in in_block else 0
        result["channels"].append({
            "channel": channel, "first_block_output": out_layer, "layer": layer,
            "residual_point": first_wide["point"] if first_wide else None,
            "born_at": born["point"] if born else None, "born_label": born["label"] if born else None,
            "born_channel": born["peak"]["channel"] if born else None,
            "before": in_block[index - 1]["point"] if index > 0 else None,
            "before_peak": in_block[index - 1]["mean_peak"] if index > 0 else None,
            "born_peak": born["mean_peak"] if born else None})
    return result
