"""Activation edits of paper MA (Sun et al. 2024, arXiv 2402.17762, Table 3), as forward hooks on `layers.{i}.out`.

All act on `session.context.massive_activations` (a list of `MassiveActivation`: first layer, channels, token
positions) and, for "mean", on `session.context.ma_means` (`probes.activation_means.calibrated_means`).
`layers` says where: "first" (the layer where the MAs first appear: the paper's Table 3), "all" (every block output
from there on: a model that rewrites a removed MA in its next layer cannot undo the edit) or a list of layer indices.
The hooks live until the EditSession ends; positions beyond a sequence's length are left alone.
"""
from __future__ import annotations

import torch

from outlierlab.interventions.base import EditSession, Intervention
from outlierlab.models.massive import MassiveActivation

WHERE = ("first", "all")


class NoMassiveActivations(ValueError):
    """Raised by an intervention that needs massive activations when the model has none (configured or found)."""


def _check_layers(layers):
    if isinstance(layers, str):
        if layers not in WHERE:
            raise ValueError(f"layers='{layers}' is not one of {', '.join(WHERE)} or a list of layer indices")
        return layers
    layers = list(layers)
    if not layers or not all(isinstance(layer, int) and layer >= 0 for layer in layers):
        raise ValueError(f"layers={layers} must be 'first', 'all' or a non-empty list of layer indices >= 0")
    return layers


def _locations(session: EditSession) -> list[MassiveActivation]:
    locations = session.context.massive_activations
    if not locations:
        raise NoMassiveActivations("this intervention needs massive activations, and none were configured or found")
    return locations


def _by_layer(session: EditSession, where) -> dict[int, list[tuple[int, MassiveActivation]]]:
    """layer -> [(location number, location)] that the intervention edits there."""
    num_layers = session.sites.num_layers
    plan: dict[int, list] = {}
    for number, location in enumerate(_locations(session)):
        for layer in location.layers(where, num_layers):
            if layer >= num_layers:
                raise ValueError(f"layers: {layer} is outside the model's {num_layers} layers")
            plan.setdefault(layer, []).append((number, location))
    return dict(sorted(plan.items()))


def _index(location: MassiveActivation, length: int, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    kept = [i for i, p in enumerate(location.positions) if p < length]
    positions = torch.tensor([location.positions[i] for i in kept], device=device, dtype=torch.long)
    channels = torch.tensor(location.channels, device=device, dtype=torch.long)
    return positions, channels, kept


class SetMassiveActivations(Intervention):
    """Set the MAs in the residual stream after each chosen layer to zero or to their calibration mean."""

    VALUES = ("zero", "mean")

    def __init__(self, value: str = "zero", layers="first"):
        if value not in self.VALUES:
            raise ValueError(f"value='{value}' is not one of {', '.join(self.VALUES)}")
        self.value = value
        self.layers = _check_layers(layers)

    def _values(self, session: EditSession, number: int, layer: int) -> torch.Tensor | None:
        if self.value == "zero":
            return None
        means = session.context.ma_means
        if not means:
            raise ValueError("value='mean' needs the calibration means (context 'ma_means'); none were computed")
        return torch.tensor(means["locations"][number]["mean"][layer], dtype=torch.float64)  # [P, C]

    def apply(self, session: EditSession) -> None:
        logged = {}
        for layer, entries in _by_layer(session, self.layers).items():
            edits = [(location, self._values(session, number, layer)) for number, location in entries]
            session.hook(f"layers.{layer}.out", self._hook(edits))
            logged[layer] = [None if values is None else values.tolist() for _, values in edits]
        session.log.append({"edit": "set_massive_activations", "value": self.value, "where": self.layers,
                            "layers": sorted(logged), "values": None if self.value == "zero" else logged})

    @staticmethod
    def _hook(edits):
        def hook(hidden: torch.Tensor) -> torch.Tensor:
            hidden = hidden.clone()
            for location, values in edits:
                positions, channels, kept = _index(location, hidden.shape[1], hidden.device)
                if not kept:
                    continue
                if values is None:
                    hidden[:, positions[:, None], channels[None, :]] = 0.0
                else:
                    hidden[:, positions[:, None], channels[None, :]] = values[kept].to(hidden.device, hidden.dtype)
            return hidden
        return hook


class ZeroMedianActivations(Intervention):
    """Control: at the same layers, zero as many activations as there are MAs, chosen as those whose |h| is nearest
    the median |h| of the sequence at that layer (never an MA coordinate). Chosen afresh for every sequence."""

    def __init__(self, layers="first"):
        self.layers = _check_layers(layers)

    def apply(self, session: EditSession) -> None:
        plan = _by_layer(session, self.layers)
        for layer, entries in plan.items():
            session.hook(f"layers.{layer}.out", self._hook([loc for _, loc in entries]))
        session.log.append({"edit": "zero_median_activations", "where": self.layers, "layers": sorted(plan),
                            "per_sequence": sum(len(loc.positions) * len(loc.channels) for loc in _locations(session))})

    @staticmethod
    def _hook(locations):
        def hook(hidden: torch.Tensor) -> torch.Tensor:
            batch, length, channels = hidden.shape
            protected, count = [], 0
            for location in locations:
                positions, chans, kept = _index(location, length, hidden.device)
                protected.append((positions[:, None] * channels + chans[None, :]).reshape(-1))
                count += len(kept) * len(location.channels)
            if count == 0:
                return None
            flat = hidden.reshape(batch, -1)
            magnitude = flat.abs().float()
            distance = (magnitude - magnitude.median(dim=1, keepdim=True).values).abs()
            distance[:, torch.cat(protected)] = float("inf")
            chosen = distance.topk(count, dim=1, largest=False).indices
            return flat.scatter(1, chosen, 0.0).reshape(batch, length, channels)
        return hook
