"""Pruning experts of a mixture of experts by a router mask (Su et al., arXiv 2507.23279: prune the super experts vs
as many random experts).

The mask is a hook on `layers.{i}.mlp.router.weights` (models/experts.py): a token routed to a pruned expert gets
routing weight 0 for it, so that expert adds nothing; the other top-k experts keep their weights (no renormalisation,
as zeroing the expert's weights would do). Nothing is written to the weights; removing the hook is the exact undo.

    experts   "super": the super experts in `session.context.super_experts`; "random": as many experts as that,
              drawn (seeded) from the other experts of the MoE layers; or an explicit list of [layer, expert]
"""
from __future__ import annotations

import random

import torch

from outlierlab.interventions.base import EditSession, Intervention


class NoSuperExperts(ValueError):
    """Raised when the super experts are to be pruned and the model has none."""


class PruneExperts(Intervention):
    CHOICES = ("super", "random")

    def __init__(self, experts="super", seed: int = 0):
        if isinstance(experts, str):
            if experts not in self.CHOICES:
                raise ValueError(f"experts='{experts}' is not one of {', '.join(self.CHOICES)} or a list of "
                                 "[layer, expert]")
        else:
            experts = [list(pair) for pair in experts]
            if not experts or not all(len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p) for p in experts):
                raise ValueError(f"experts={experts} must be a non-empty list of [layer, expert] pairs")
        self.experts, self.seed = experts, seed

    def check_experts(self, experts: dict[int, tuple]) -> None:
        """Before weights load: every [layer, expert] named exists ({MoE layer: (experts, ...)} from the config)."""
        if not experts:
            raise ValueError("pruning experts needs a mixture-of-experts model; this one has no MoE layer")
        for layer, expert in [] if isinstance(self.experts, str) else self.experts:
            if layer not in experts:
                raise ValueError(f"[{layer}, {expert}]: layers.{layer} is not a mixture-of-experts layer "
                                 f"(MoE layers: {sorted(experts)})")
            if expert >= experts[layer][0]:
                raise ValueError(f"[{layer}, {expert}]: expert {expert} is outside layers.{layer}'s "
                                 f"{experts[layer][0]} experts")

    def chosen(self, session: EditSession) -> list[tuple[int, int]]:
        if not isinstance(self.experts, str):
            return [tuple(pair) for pair in self.experts]
        supers = [tuple(pair) for pair in session.context.super_experts]
        if not supers:
            raise NoSuperExperts("pruning super experts needs super experts, and none were detected")
        if self.experts == "super":
            return supers
        sites = session.sites
        others = [(layer, e) for layer in sites.moe_layers for e in range(sites.num_experts(layer))
                  if (layer, e) not in supers]
        return sorted(random.Random(self.seed).sample(others, min(len(supers), len(others))))

    def apply(self, session: EditSession) -> None:
        by_layer: dict[int, list[int]] = {}
        for layer, expert in self.chosen(session):
            session.sites.weight(f"layers.{layer}.mlp.experts.{expert}.down_proj.weight")  # KeyError names it
            by_layer.setdefault(layer, []).append(expert)
        for layer, experts in by_layer.items():
            seen: dict[str, torch.Tensor] = {}  # the top-k indices of this forward (tapped before the weights)
            session.hook(f"layers.{layer}.mlp.router.experts", lambda indices, seen=seen: seen.update(indices=indices))
            session.hook(f"layers.{layer}.mlp.router.weights", self._mask(seen, experts))
        session.log.append({"edit": "prune_experts", "rule": self.experts if isinstance(self.experts, str) else
                            "list", "experts": [[layer, e] for layer, es in by_layer.items() for e in es]})

    @staticmethod
    def _mask(seen: dict, experts: list[int]):
        def mask(weights: torch.Tensor) -> torch.Tensor:
            pruned = torch.isin(seen["indices"], torch.tensor(experts, device=weights.device))
            return weights.masked_fill(pruned, 0.0)
        return mask
