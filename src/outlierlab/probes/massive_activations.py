"""Massive activations (MA paper, Sun et al. 2024, arXiv 2402.17762): where they are, how large, how constant.

Criterion (MA paper Sec. 2, "Which layers?": an activation is massive when its magnitude is larger than 100 and
about 1,000 times larger than the median magnitude of its hidden state). Both numbers are `MACriterion` fields, so
a run can tighten or relax them; the defaults are the paper's.

Positions are labelled by role so that MAs can be compared across sequences whose content differs:
    bos              position 0 when the BOS token was prepended
    first            the first text token (position 0 without BOS, 1 with it)
    first_delimiter  the first delimiter token after that (the paper: first "." or "\\n")
    delimiter        any later delimiter
    other            everything else (the paper's "weak words" show up here with their decoded token)

Typical use (what experiments/ma_stats.py does, and what an intervention needs):

    criterion = MACriterion()
    is_delim = delimiter_mask(loaded.tokenizer, [".", "\\n"])
    with ResidualStats(loaded.sites, exceedance=criterion.exceedance(), moments=True) as stats:
        for batch in batches:
            stats.observe(batch, position_roles(batch, is_delim, loaded.bos)); loaded.model(batch)
    found = find_massive_activations(stats.summary(), stats.sequences, criterion, decode)
    # -> [{"layer", "channel", "role", "positions", "mean", "std", "max_abs", "share", ...}, ...]
    where = locations(found, min_share=0.5)  # per (channel, role): first layer, peak, value at the first layer
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from outlierlab.probes.stats import Exceedance

ROLES = ("bos", "first", "first_delimiter", "delimiter", "other")
ROLE_CODE = {role: code for code, role in enumerate(ROLES)}


@dataclass(frozen=True)
class MACriterion:
    # MA paper Sec. 2: "magnitudes larger than 100" and "about 1,000 times larger than the median".
    min_abs: float = 100.0
    median_ratio: float = 1000.0
    # A (layer, channel, role) is listed when it is massive in at least this share of the sequences (0 = any).
    min_share: float = 0.0

    def exceedance(self) -> Exceedance:
        return Exceedance(min_abs=self.min_abs, median_ratio=self.median_ratio)


def delimiter_mask(tokenizer, delimiters: list[str]) -> torch.Tensor:
    """Boolean [vocab]: tokens whose decoded text, with spaces stripped, is one of `delimiters`."""
    wanted = set(delimiters)
    size = len(tokenizer)
    mask = torch.zeros(size, dtype=torch.bool)
    for token_id in range(size):
        if tokenizer.decode([token_id]).strip(" ") in wanted:
            mask[token_id] = True
    return mask


def position_roles(input_ids: torch.Tensor, is_delimiter: torch.Tensor, bos: str) -> torch.Tensor:
    """Role code (index into ROLES) of every position of a [batch, T] batch; `bos` is the policy the windows
    were built with ("prepend" or "none")."""
    ids = input_ids.cpu()
    roles = torch.full(ids.shape, ROLE_CODE["other"], dtype=torch.long)
    first = 1 if bos == "prepend" else 0
    if bos == "prepend":
        roles[:, 0] = ROLE_CODE["bos"]
    if ids.shape[1] <= first:
        return roles
    roles[:, first] = ROLE_CODE["first"]
    delimiter = is_delimiter[ids.clamp(0, len(is_delimiter) - 1)]
    delimiter[:, : first + 1] = False
    roles[delimiter] = ROLE_CODE["delimiter"]
    has_any = delimiter.any(dim=1)
    first_delimiter = delimiter.int().argmax(dim=1)  # first True per row
    rows = torch.nonzero(has_any).flatten()
    roles[rows, first_delimiter[rows]] = ROLE_CODE["first_delimiter"]
    return roles


def find_massive_activations(summary: list[dict], sequences: int, criterion: MACriterion,
                             decode: Callable[[int], str] | None = None) -> list[dict]:
    """Every (layer, channel, role) whose activations met the criterion, from `ResidualStats(...,
    exceedance=criterion.exceedance()).summary()`; sorted by layer, channel, role. Each entry carries the most
    common token positions and tokens, the mean/std/extremes of the signed value over its occurrences, the share of
    sequences where it occurs, and its mean ratio to the median |activation| of the layer."""
    found = []
    for row in summary:
        for hit in row.get("hits", []):
            share = hit["sequences"] / max(sequences, 1)
            if share < criterion.min_share:
                continue
            entry = {"layer": row["layer"], "channel": hit["channel"], "role": ROLES[hit["label"]],
                     "share": share, "max_abs": max(abs(hit["min"]), abs(hit["max"])),
                     "layer_median": row["mean_median"],
                     **{k: hit[k] for k in ("count", "sequences", "mean", "std", "min", "max",
                                            "mean_ratio_to_median", "positions", "distinct_positions")}}
            entry["tokens"] = [[decode(t) if decode else t, c] for t, c in hit["tokens"]]
            found.append(entry)
    return sorted(found, key=lambda e: (e["layer"], e["channel"], ROLES.index(e["role"])))


def coordinate_reference(mean: torch.Tensor, std: torch.Tensor, top_fraction: float = 0.1,
                         median_band: float = 0.1) -> dict:
    """How much ordinary activations vary across sequences, from per-(position, channel) moments at one layer.

    Coordinates are ranked by their RMS over sequences, sqrt(mean^2 + std^2). "top" = the top `top_fraction` of
    coordinates (the MA paper compares with the top 1% / 10% activations); "median" = the coordinates within
    `median_band` around the median rank. For each group: the median over its coordinates of |mean|, std, variance
    and relative std std / RMS (0 = the same value for every input, ~1 = zero-mean noise)."""
    rms = (mean.square() + std.square()).sqrt().flatten()
    relative = (std.flatten() / rms.clamp(min=1e-30))
    order = rms.argsort()
    count = order.numel()
    groups = {"top": order[int(count * (1 - top_fraction)):],
              "median": order[int(count * (0.5 - median_band / 2)): int(count * (0.5 + median_band / 2)) + 1]}
    reference = {"top_fraction": top_fraction, "median_band": median_band}
    for name, index in groups.items():
        reference[name] = {"abs_mean": float(mean.flatten()[index].abs().median()),
                           "std": float(std.flatten()[index].median()),
                           "variance": float(std.flatten()[index].square().median()),
                           "relative_std": float(relative[index].median())}
    return reference


def relative_std(mean: float, std: float) -> float:
    rms = (mean * mean + std * std) ** 0.5
    return std / rms if rms > 0 else 0.0


def mark_input_agnostic(entries: list[dict], references: dict[int, dict], max_relative_std: float) -> None:
    """Add `relative_std`, the layer's reference groups and `input_agnostic` (relative std across sequences
    <= max_relative_std) to each entry in place."""
    for entry in entries:
        entry["relative_std"] = relative_std(entry["mean"], entry["std"])
        reference = references.get(entry["layer"])
        if reference is not None:
            entry["reference"] = reference
        entry["input_agnostic"] = entry["relative_std"] <= max_relative_std


def locations(entries: list[dict], min_share: float = 0.0) -> list[dict]:
    """One record per (channel, role), from the entries massive in at least `min_share` of the sequences: the first
    and last layer where it is massive, its value at the first layer, and its peak (layer and mean value over
    sequences)."""
    grouped = defaultdict(list)
    for entry in entries:
        if entry["share"] >= min_share:
            grouped[(entry["channel"], entry["role"])].append(entry)
    records = []
    for (channel, role), group in grouped.items():
        group.sort(key=lambda e: e["layer"])
        first, peak = group[0], max(group, key=lambda e: abs(e["mean"]))
        records.append({"channel": channel, "role": role, "first_layer": first["layer"],
                        "last_layer": group[-1]["layer"], "layers": [e["layer"] for e in group],
                        "value_at_first_layer": first["mean"], "share_at_first_layer": first["share"],
                        "peak_layer": peak["layer"], "peak_mean": peak["mean"], "peak_std": peak["std"],
                        "peak_ratio_to_median": peak["mean_ratio_to_median"], "peak_share": peak["share"],
                        "peak_relative_std": peak.get("relative_std"),
                        "peak_input_agnostic": peak.get("input_agnostic"),
                        "positions": peak["positions"], "tokens": peak["tokens"]})
    return sorted(records, key=lambda r: (r["first_layer"], r["channel"], ROLES.index(r["role"])))


def fixed_position_trajectories(stats, channels: list[int], bos: str) -> dict:
    """Mean and std across sequences of each channel at the fixed-position roles (BOS at 0, the first text token at
    0 or 1), after every layer, from the probe's per-coordinate moments: the MA's whole path, also in layers where
    it is below the criterion."""
    positions = {"bos": 0, "first": 1} if bos == "prepend" else {"first": 0}
    paths = {}
    for channel in channels:
        for role, position in positions.items():
            means, stds = [], []
            for layer in range(stats.sites.num_layers):
                mean, std = stats.coordinate_moments(layer)
                means.append(float(mean[position, channel]))
                stds.append(float(std[position, channel]))
            paths[f"{channel}@{role}"] = {"channel": channel, "role": role, "position": position,
                                         "mean": means, "std": stds}
    return paths


def super_weight_rows(records: list[dict], super_weights) -> None:
    """Cross-check with the super-weight registry: add to each record the SWs whose row (the down_proj output
    channel) is the MA's channel (the MA paper's channels equal SW rows where both are known)."""
    for record in records:
        record["super_weights_same_row"] = [str(w) for w in super_weights if w.row == record["channel"]]


@torch.no_grad()
def activation_slices(loaded, ids: list[int], layers: list[int], significant: int = 4) -> dict[int, list]:
    """|residual| [tokens, channels] after each of `layers` for one short prompt (the MA paper's Fig. 1 data),
    rounded to `significant` digits. Meant for a prompt of a few tokens: it keeps whole hidden states."""
    captured = {}
    def keep(layer: int):
        return lambda h: captured.__setitem__(layer, h[0].detach().abs().float())
    with loaded.sites.hooks(loaded.sites.per_layer("layers.{i}.out", keep, layers)):
        loaded.model(torch.tensor([ids], device=loaded.device))
    return {layer: [[float(f"{v:.{significant}g}") for v in row] for row in captured[layer].cpu().tolist()]
            for layer in layers}
