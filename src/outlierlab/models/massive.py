"""Where massive activations (MAs) sit: residual-stream coordinates (layer, token position, channel).

A `MassiveActivation` is one group of MAs: the decoder block after which they first appear (`first_layer`, i.e. the
output of layers[first_layer], the MA paper's and papers.md's convention), the hidden channels and the token
positions. Interventions and probes take a list of them. They come from a model YAML's `massive_activations`
entries (papers.md, or written back by a detector) or are given explicitly in an experiment config:

    massive_activations:
      - {first_layer: 2, channels: [507], positions: [0]}

Registry entries name their tokens in words ("first token", "BOS", 'first "." or "\\n"'); only tokens at a fixed
position can be addressed by position, so those map to position 0 and the others (a sequence's first delimiter sits
at a different position in every sequence) are reported as skipped. An entry with an explicit `positions` list
uses it as given. An entry with a `bos` key (none / prepend) holds for runs with that BOS policy only.
"""
from __future__ import annotations

from dataclasses import dataclass

# Token descriptions in model YAMLs that always denote the sequence's first position. BOS (or GPT-2's
# <|endoftext|> / OPT's </s> used as BOS) is position 0 when the model's BOS policy prepends it; "first token" is
# position 0 by definition.
START_TOKENS = ("first token", "BOS", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class MassiveActivation:
    first_layer: int
    channels: tuple[int, ...]
    positions: tuple[int, ...]

    def layers(self, where, num_layers: int) -> list[int]:
        """Layers an intervention acts on: "first" (the first MA layer), "all" (every block output from the first
        MA layer on; before it there is no MA to edit) or an explicit list of layer indices."""
        if where == "first":
            return [self.first_layer]
        if where == "all":
            return list(range(self.first_layer, num_layers))
        return sorted({int(layer) for layer in where})

    def describe(self) -> dict:
        return {"first_layer": self.first_layer, "channels": list(self.channels), "positions": list(self.positions)}


def parse(entries, bos: str | None = None) -> tuple[list[MassiveActivation], list[str]]:
    """Model-YAML or config entries -> (locations, notes on what could not be addressed).

    An entry measured under one BOS policy (its `bos` key: the detector writes one entry per policy, since a BOS
    token moves the MAs) applies only to runs with that policy; `bos=None` keeps every entry."""
    found, notes = [], []
    for number, entry in enumerate(entries or []):
        entry = dict(entry)
        if bos is not None and entry.get("bos") not in (None, bos):
            continue
        for key in ("first_layer", "channels"):
            if key not in entry:
                raise ValueError(f"massive_activations[{number}] has no '{key}'")
        channels = tuple(int(c) for c in entry["channels"])
        if entry.get("positions") is not None:
            positions = tuple(int(p) for p in entry["positions"])
        else:
            tokens = [str(t) for t in entry.get("tokens") or []]
            positions = (0,) if any(t in START_TOKENS for t in tokens) else ()
            skipped = [t for t in tokens if t not in START_TOKENS]
            if skipped:
                notes.append(f"massive_activations[{number}]: tokens {skipped} have no fixed position; not addressed")
        if not positions or not channels:
            continue
        if int(entry["first_layer"]) < 0 or min(channels) < 0 or min(positions) < 0:
            raise ValueError(f"massive_activations[{number}]: layer, channels and positions must be >= 0")
        found.append(MassiveActivation(int(entry["first_layer"]), channels, positions))
    return found, notes


def check_fits(locations: list[MassiveActivation], num_layers: int, hidden_size: int) -> None:
    """Raise ValueError naming the entry that does not fit the model."""
    for number, location in enumerate(locations):
        if location.first_layer >= num_layers:
            raise ValueError(f"massive_activations[{number}]: first_layer {location.first_layer} is outside the "
                             f"model's {num_layers} layers")
        if max(location.channels) >= hidden_size:
            raise ValueError(f"massive_activations[{number}]: channel {max(location.channels)} is outside the "
                             f"hidden size {hidden_size}")
