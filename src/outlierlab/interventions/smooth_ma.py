"""Paper RO's smoothing question: can a massive activation (MA) be smoothed where it is born, or only where the skip
connection carries it on? A forward hook at a chosen site replaces the MA coordinates by their calibrated mean or
clips them.

Our reading of the paper's two places (its text names them, not the tensors):
    where: birth   the MLP branch's output of the layer where the MA is born, i.e. what that branch adds to the
                   residual ("the output position where it is created"): the down_proj output
                   (`layers.{b}.mlp.out`), or, in families that normalise the MLP output before the residual add
                   (Gemma-2/3's sandwich norms, OLMo-2), that norm's output (`layers.{b}.norm_mlp_out.out`), where
                   those models' MAs first appear (+exp=ro_locate on Gemma-3-270M)
    where: skip    the residual stream that carries it on: the block outputs `layers.{j}.out` of the later layers
                   (`layers: after_birth` = every j > b, or a list); the birth layer itself is left intact
    site           any hook point with the residual's width can be given instead (`site: "layers.{layer}.mid"`)

    value: mean    each MA coordinate (position, channel) becomes its mean over `session.context.calibration_ids`
                   at that site, measured on the model as it is when the intervention is applied
    value: clip    each MA coordinate is clipped to +- clip_ratio x the median |x| of its token at that site (scale
                   free: the same rule on a model whose spikes are 300x smaller)

The MAs are `session.context.massive_activations` (models/massive.py: birth layer = first_layer, channels,
positions), as for the MA study's interventions.
"""
from __future__ import annotations

import torch

from outlierlab.interventions.base import EditSession, Intervention
from outlierlab.interventions.massive_activation import _index, _locations
from outlierlab.probes.channel_outliers import forward_windows

SITES = {"birth": "layers.{layer}.mlp.out", "skip": "layers.{layer}.out"}
# The MLP branch's output when the family normalises it before the residual add (used for `birth` when present).
SANDWICH_BIRTH = "layers.{layer}.norm_mlp_out.out"
LAYER_RULES = ("birth", "after_birth")


class SmoothMassiveActivation(Intervention):
    VALUES = ("mean", "clip")

    def __init__(self, where: str = "skip", value: str = "mean", layers=None, site: str | None = None,
                 clip_ratio: float = 10.0):
        if where not in SITES:
            raise ValueError(f"where='{where}' is not one of {', '.join(SITES)}")
        if value not in self.VALUES:
            raise ValueError(f"value='{value}' is not one of {', '.join(self.VALUES)}")
        layers = layers if layers is not None else ("birth" if where == "birth" else "after_birth")
        if isinstance(layers, str):
            if layers not in LAYER_RULES:
                raise ValueError(f"layers='{layers}' is not one of {', '.join(LAYER_RULES)} or a list of layers")
        else:
            layers = list(layers)
            if not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
                raise ValueError(f"layers={layers} must be birth, after_birth or a non-empty list of layers >= 0")
        if site is not None and "{layer}" not in site:
            raise ValueError(f"site='{site}' must contain {{layer}} (e.g. layers.{{layer}}.out)")
        if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or clip_ratio <= 0:
            raise ValueError(f"clip_ratio={clip_ratio} must be a positive number")
        self.where, self.value, self.layers, self.clip_ratio = where, value, layers, float(clip_ratio)
        self.site = site  # None: SITES[where], resolved on the model (`site_for`)

    def site_for(self, sites) -> str:
        """The site pattern on this model: the given one, else the birth / skip default (birth: after the MLP's
        output norm where the family has one)."""
        if self.site:
            return self.site
        if self.where == "birth" and sites.has(SANDWICH_BIRTH.format(layer=0)):
            return SANDWICH_BIRTH
        return SITES[self.where]

    def _layers(self, birth: int, num_layers: int) -> list[int]:
        if self.layers == "birth":
            return [birth]
        if self.layers == "after_birth":
            return list(range(birth + 1, num_layers))
        for layer in self.layers:
            if layer >= num_layers:
                raise ValueError(f"layers: {layer} is outside the model's {num_layers} layers")
        return sorted(self.layers)

    def plan(self, session: EditSession) -> dict[str, list]:
        """site -> [MA locations edited there]."""
        plan: dict[str, list] = {}
        pattern = self.site_for(session.sites)
        for location in _locations(session):
            for layer in self._layers(location.first_layer, session.sites.num_layers):
                plan.setdefault(pattern.format(layer=layer), []).append(location)
        return plan

    def apply(self, session: EditSession) -> None:
        plan = self.plan(session)
        means = self._calibrate(session, plan) if self.value == "mean" else {}
        for site, locations in plan.items():
            session.hook(site, self._hook(locations, means.get(site)))
        session.log.append({"edit": "smooth_massive_activation", "where": self.where, "value": self.value,
                            "sites": list(plan), "clip_ratio": self.clip_ratio if self.value == "clip" else None,
                            "means": {site: [m.tolist() for m in values] for site, values in means.items()}})

    @staticmethod
    def _calibrate(session: EditSession, plan: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        ids = session.context.calibration_ids
        if ids is None:
            raise ValueError("value='mean' needs calibration data: the study context has no calibration_ids")
        sums = {site: [None] * len(locations) for site, locations in plan.items()}
        sites = session.sites

        def folder(site, locations):
            def fold(x):
                for number, location in enumerate(locations):
                    positions, channels, _ = _index(location, x.shape[1], x.device)
                    values = x.detach()[:, positions[:, None], channels[None, :]].double().sum(0).cpu()
                    sums[site][number] = values if sums[site][number] is None else sums[site][number] + values
            return fold
        with sites.hooks({site: folder(site, locations) for site, locations in plan.items()}):
            forward_windows(session.loaded, ids, desc="smooth_ma means")
        return {site: [s / len(ids) for s in values] for site, values in sums.items()}

    def _hook(self, locations, means):
        ratio, value = self.clip_ratio, self.value

        def hook(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            for number, location in enumerate(locations):
                positions, channels, kept = _index(location, x.shape[1], x.device)
                if not kept:
                    continue
                if int(channels.max()) >= x.shape[-1]:
                    raise ValueError(f"channel {int(channels.max())} is outside this site's {x.shape[-1]} channels")
                rows, cols = positions[:, None], channels[None, :]
                if value == "mean":
                    x[:, rows, cols] = means[number][kept].to(x.device, x.dtype)
                else:
                    limit = ratio * x[:, positions].abs().median(dim=-1, keepdim=True).values  # [batch, P, 1]
                    x[:, rows, cols] = torch.maximum(torch.minimum(x[:, rows, cols], limit), -limit)
            return x
        return hook
