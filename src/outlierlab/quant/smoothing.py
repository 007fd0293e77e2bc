"""SmoothQuant (Xiao et al. 2023, arXiv 2211.10438): per-channel smoothing factors from calibration maxima.

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

X_j is input channel j of the linears that read one norm's output (calibrated on data), W_j the column j of those
linears' weights (max over all of them). X / s and W * s give the same product, with the activation outliers moved
into the weights. Which linears share a norm is a fact of the architecture family, `Family.smooth_groups` in
models/sites.py (as SmoothQuant's smooth.py does for Llama and OPT: the attention projections after the first norm,
the MLP's input projections after the second; o_proj and down_proj are not smoothed). In a mixture of experts the
second norm feeds the router and every expert: all of them are scaled, so routing is unchanged.
"""
from __future__ import annotations

import torch

from outlierlab.models.sites import FAMILIES, WeightView
from outlierlab.probes.layer_major import observe_windows
from outlierlab.quant.targets import weight_view

# SmoothQuant's smooth.py clamps both maxima and the factors at 1e-5 (avoids 0 ** negative and division by 0).
EPSILON = 1e-5


class NoSmoothingTable(ValueError):
    pass


def smoothing_groups(sites) -> list[tuple[int, str, list[tuple[str, WeightView]]]]:
    """[(layer, norm site, [(weight name, WeightView)])] for every block of this model. In a mixture-of-experts
    block the MLP norm's readers are the router, every expert's gate_up_proj (its slice of the fused parameter) and
    the shared expert's input projections (`Sites.moe_input_weights`)."""
    table = sites.family.smooth_groups
    if table is None:
        known = sorted(family.name for family in FAMILIES if family.smooth_groups is not None)
        raise NoSmoothingTable(f"SmoothQuant has no norm -> linear table for family '{sites.family.name}' "
                               f"(known: {', '.join(known)}); add smooth_groups to its Family in models/sites.py")
    groups = []
    for layer in range(sites.num_layers):
        block = sites.module(f"layers.{layer}")
        for norm, paths in table:
            linears = [(f"layers.{layer}.{path}.weight", weight_view(block.get_submodule(path))) for path in paths
                       if _has(block, path)]
            if norm == "norm2" and layer in sites.moe_layers:
                linears += sites.moe_input_weights(layer)
            if not linears:
                raise NoSmoothingTable(f"layers.{layer} has none of {', '.join(paths)} after {norm}")
            groups.append((layer, f"layers.{layer}.{norm}", linears))
    return groups


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


@torch.no_grad()
def calibrate_input_maxima(loaded, ids: torch.Tensor, norm_sites: list[str], batch_size: int = 1
                           ) -> dict[str, torch.Tensor]:
    """Running per-channel max |x| of each norm's output over the calibration windows (streamed: one vector per
    site is all that is kept)."""
    maxima: dict[str, torch.Tensor] = {}

    def fold(site):
        def hook(output: torch.Tensor):
            current = output.detach().abs().float().reshape(-1, output.shape[-1]).amax(dim=0)
            maxima[site] = current if site not in maxima else torch.maximum(maxima[site], current)
        return hook

    with loaded.sites.hooks({f"{site}.out": fold(site) for site in norm_sites}):
        observe_windows(loaded, ids, batch_size, desc="smoothquant calibration")
    return maxima


def smoothing_factors(input_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), as SmoothQuant's smooth_ln_fcs."""
    return (input_max.clamp(min=EPSILON).pow(alpha) / weight_max.clamp(min=EPSILON).pow(1 - alpha)).clamp(min=EPSILON)
