"""Streaming moments of an activation site, per layer: max |x| (the "inf-norm" of paper QT) and kurtosis.

Paper QT reports, per model, the maximum infinity norm and the average kurtosis of the outputs of the attention
layers. Kurtosis here is of all elements of a layer's tensor, pooled over every sequence seen:
E[(x - mu)^4] / E[(x - mu)^2]^2 (3 for a Gaussian), computed from running power sums in float64, so no activation
is kept after its hook returns.
"""
from __future__ import annotations

import torch

from outlierlab.probes.stats import Probe


class SiteMoments(Probe):
    """`site` is a per-layer pattern with `{i}`, e.g. `layers.{i}.attn.out` (attention output after o_proj)."""

    def __init__(self, sites, site: str = "layers.{i}.attn.out"):
        super().__init__(sites)
        self.site = site
        layers = sites.num_layers
        self.power_sums = torch.zeros(layers, 5, dtype=torch.float64)  # count, sum x, x^2, x^3, x^4
        self.max_abs = torch.zeros(layers, dtype=torch.float64)

    def hook_points(self):
        return self.sites.per_layer(self.site, self._callback)

    def _callback(self, layer: int):
        def fold(tensor: torch.Tensor):
            x = tensor.detach().double().reshape(-1)
            if self.power_sums.device != x.device:  # the sums live on the model's device: no host sync per layer
                self.power_sums, self.max_abs = self.power_sums.to(x.device), self.max_abs.to(x.device)
            square = x * x  # == x ** 2; x ** 4 as square * square (std::pow is ~70x slower; equal to 1 ulp)
            count = x.new_full((), float(x.numel()))  # made on the device (torch.tensor(..., device=) copies)
            self.power_sums[layer] += torch.stack([count, x.sum(), square.sum(), (square * x).sum(),
                                                   (square * square).sum()])
            peak = torch.maximum(x.max(), x.min().neg())  # max |x| without a |x| copy
            self.max_abs[layer] = torch.where(peak > self.max_abs[layer], peak, self.max_abs[layer])
        return fold

    def kurtosis(self) -> list[float]:
        n, s1, s2, s3, s4 = self.power_sums.cpu().unbind(dim=1)
        mean = s1 / n
        m2 = s2 / n - mean ** 2
        m4 = s4 / n - 4 * mean * s3 / n + 6 * mean ** 2 * s2 / n - 3 * mean ** 4
        return (m4 / m2 ** 2).tolist()

    def summary(self) -> dict:
        kurtosis = self.kurtosis()
        max_abs = self.max_abs.cpu()
        return {"site": self.site, "max_abs": max_abs.tolist(), "kurtosis": kurtosis,
                "max_inf_norm": float(max_abs.max()), "avg_kurtosis": sum(kurtosis) / len(kurtosis)}
