"""Paper RO's gamma reset: set outlier channels of a norm's gain to 1 or to the mean of the other channels.

A weight edit through EditSession (only the touched elements are saved; undone bit-exactly). The gain is the
family's convention (models/sites.py `norm_gain_offset`): Llama-style norms multiply by the stored w, Gemma's by
1 + w, so "gain 1" writes w = 1 - offset (w = 0 for Gemma) and "gain = m" writes w = m - offset.

    channels  "detected": per norm, the channels whose gain is more than `sigma` standard deviations from its mean
              (BERT Busters' 3 sigma, per layer: probes/channel_outliers.py); "consistent": BERT Busters' outlier
              dimensions of that norm role (outliers in >= half of the layers), reset in every layer; or an explicit
              list of channels, reset in every chosen norm
    value     "one" (gain 1), "mean" (the mean gain of the norm's other channels) or "zero" (gain 0: BERT Busters'
              "disabling" of an outlier dimension, with bias=true its beta too)
    tail      "high" (default: gains above the mean, the ones that make large activations) or "both" (BERT
              Busters' |gain - mean| > sigma std)
    control   "random": as many channels per norm as the rule above picks, drawn at random (seeded) from the
              channels it does not pick: does resetting *any* channels do the same?
    norms     norm roles (norm1, norm2, norm_attn_out, norm_mlp_out, final_norm) or "all"
    layers    "all" or a list of block indices (final_norm is not in a block and ignores it)
    bias      also reset the bias of those channels (LayerNorm's beta: to 0 with "one" and "zero", to the others'
              mean with "mean"); RMSNorm has none
"""
from __future__ import annotations

import torch

from outlierlab.interventions.base import EditSession, Intervention
from outlierlab.models import offload
from outlierlab.models.sites import NORM_ROLES
from outlierlab.probes.channel_outliers import TAILS, GammaCriterion, gamma_outliers, kind, norm_outlier_channels

ROLES = (*NORM_ROLES, "final_norm")
CHANNEL_RULES = ("detected", "consistent")


class ResetNormGamma(Intervention):
    VALUES = ("one", "mean", "zero")
    CONTROLS = (None, "random")

    def __init__(self, channels="detected", value: str = "one", control: str | None = None, norms="all",
                 layers="all", sigma: float = 3.0, tail: str = "high", bias: bool = False, seed: int = 0):
        if isinstance(channels, str):
            if channels not in CHANNEL_RULES:
                raise ValueError(f"channels='{channels}' is not one of {', '.join(CHANNEL_RULES)} or a list of "
                                 "channel indices")
        else:
            channels = list(channels)
            if not channels or not all(isinstance(c, int) and c >= 0 for c in channels):
                raise ValueError(f"channels={channels} must be a non-empty list of channel indices >= 0")
        if value not in self.VALUES:
            raise ValueError(f"value='{value}' is not one of {', '.join(self.VALUES)}")
        if control not in self.CONTROLS:
            raise ValueError(f"control='{control}' is not one of: null, random")
        if norms != "all":
            norms = list(norms)
            unknown = [n for n in norms if n not in ROLES]
            if not norms or unknown:
                raise ValueError(f"norms={norms}: {unknown or 'empty'}; use 'all' or a list of {', '.join(ROLES)}")
        if layers != "all":
            layers = list(layers)
            if not layers or not all(isinstance(i, int) and i >= 0 for i in layers):
                raise ValueError(f"layers={layers} must be 'all' or a non-empty list of layer indices >= 0")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma <= 0:
            raise ValueError(f"sigma={sigma} must be a positive number")
        if tail not in TAILS:
            raise ValueError(f"tail='{tail}' is not one of {', '.join(TAILS)}")
        if not isinstance(bias, bool):
            raise ValueError(f"bias={bias} must be true or false")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed} must be an integer")
        self.tail = tail
        self.channels, self.value, self.control, self.norms, self.layers = channels, value, control, norms, layers
        self.sigma, self.bias, self.seed = float(sigma), bool(bias), int(seed)

    def targets(self, sites) -> list[str]:
        """The norm sites this reset acts on, in forward order."""
        layers = range(sites.num_layers) if self.layers == "all" else self.layers
        found = []
        for layer in layers:
            if layer >= sites.num_layers:
                raise ValueError(f"layers: {layer} is outside the model's {sites.num_layers} layers")
            found += [n for n in sites.norms(layer) if self.norms == "all" or kind(n) in self.norms]
        if (self.norms == "all" or "final_norm" in self.norms) and sites.has("final_norm"):
            if getattr(sites.module("final_norm"), "weight", None) is not None:
                found.append("final_norm")
        return found

    def _chosen(self, sites, norm: str, consistent: dict) -> list[int]:
        size = sites.module(norm).weight.numel()
        if self.channels == "detected":
            chosen = norm_outlier_channels(sites, norm, self.sigma, self.tail)["gain"]
        elif self.channels == "consistent":
            chosen = consistent.get(kind(norm), {}).get("consistent", [])
        else:
            if max(self.channels) >= size:
                raise ValueError(f"channels: {max(self.channels)} is outside {norm}'s {size} channels")
            chosen = sorted(set(self.channels))
        if self.control == "random" and chosen:
            others = torch.tensor([c for c in range(size) if c not in set(chosen)])
            generator = torch.Generator().manual_seed(self.seed)
            chosen = sorted(others[torch.randperm(len(others), generator=generator)[: len(chosen)]].tolist())
        return chosen

    def apply(self, session: EditSession) -> None:
        sites = session.sites
        offset = sites.family.norm_gain_offset
        consistent = (gamma_outliers(sites, GammaCriterion(sigma=self.sigma), self.tail)
                      if self.channels == "consistent" else {})
        edited = {}
        for norm in self.targets(sites):
            chosen = self._chosen(sites, norm, consistent)
            if not chosen:
                continue
            module = sites.module(norm)
            index = torch.tensor(chosen, dtype=torch.long, device=offload.device(module.weight))
            gain = sites.norm_gain(norm)
            keep = torch.ones_like(gain, dtype=torch.bool)
            keep[index] = False
            target = {"one": 1.0, "zero": 0.0}.get(self.value) if self.value != "mean" else float(gain[keep].mean())
            before = gain[index].tolist()
            session.set(module.weight, (index,), torch.full((len(chosen),), target - offset,
                                                            dtype=module.weight.dtype, device=index.device))
            entry = {"channels": chosen, "gain_before": [round(v, 4) for v in before], "gain_after": round(target, 6)}
            if self.bias and getattr(module, "bias", None) is not None:
                beta = offload.values(module.bias).detach().float()
                value = float(beta[keep.to(beta.device)].mean()) if self.value == "mean" else 0.0
                session.set(module.bias, (index,), torch.full((len(chosen),), value, dtype=module.bias.dtype,
                                                              device=index.device))
                entry["bias_after"] = value
            edited[norm] = entry
        session.log.append({"edit": "reset_norm_gamma", "channels_rule": self.channels, "value": self.value,
                            "control": self.control, "tail": self.tail, "gain_offset": offset, "sigma": self.sigma,
                            "norms_edited": len(edited), "channels_reset": sum(len(e["channels"])
                                                                              for e in edited.values()),
                            "norms": edited})
