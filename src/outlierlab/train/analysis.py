"""What the variants table measures on a trained model, in one pass over the validation windows:
validation loss, paper MA's layer-wise residual statistics, and paper QT's attention-output inf-norm and kurtosis.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from tqdm.auto import tqdm

from outlierlab.evals.ppl import window_nll_sums
from outlierlab.probes.moments import SiteMoments
from outlierlab.probes.stats import ResidualStats
from outlierlab.train.loop import next_token_loss


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """Each window's mean next-token NLL (the unit a bootstrap over windows resamples), as the PPL evaluation has it."""
    return (window_nll_sums(logits, ids) / (ids.shape[1] - 1)).tolist()


@torch.no_grad()
def validation_window_nll(model, windows: torch.Tensor, batch_size: int, desc: str = "val") -> list[float]:
    device = next(model.parameters()).device
    nll = []
    for batch in tqdm(windows.split(batch_size), desc=desc, leave=False):
        batch = batch.to(device)
        nll += window_nll(model(batch).logits, batch)
    return nll


@torch.no_grad()
def validation_loss(model, windows: torch.Tensor, batch_size: int, desc: str = "val") -> float:
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc, leave=False):
        batch = batch.to(device)
        loss = next_token_loss(model(batch).logits, batch)
        nll += float(loss) * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    return nll / count


@torch.no_grad()
def measure(loaded, windows: torch.Tensor, batch_size: int, top_k: int = 8) -> dict:
    """Loss + ResidualStats (layers.{i}.out) + SiteMoments (layers.{i}.attn.out) in the same forward passes."""
    device = loaded.device
    nll, count, windows_nll = 0.0, 0, []
    with ResidualStats(loaded.sites, k=top_k) as residual, SiteMoments(loaded.sites, "layers.{i}.attn.out") as attn:
        for batch in tqdm(windows.split(batch_size), desc="measure", leave=False):
            batch = batch.to(device)
            residual.observe(batch)
            logits = loaded.model(batch).logits
            loss = next_token_loss(logits, batch)
            nll += float(loss) * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
            windows_nll += window_nll(logits, batch)
    return {"val_loss": nll / count, "window_nll": windows_nll, "residual": residual.summary(),
            "attention_output": attn.summary()}


def classify_massive(residual: list[dict], abs_min: float, ratio_min: float) -> dict:
    """Where the largest residual activation sits and whether it is massive by paper MA's criterion
    (|h| > abs_min and about ratio_min x the layer's median |h|).

    kind: "position-0 spike" when most of the peak layer's top-k entries are at position 0, "channel outlier" when
    most share one channel at other positions, "scattered" otherwise."""
    peak_layer = max(residual, key=lambda layer: layer["mean_topk"][0])
    top = peak_layer["top"]
    at_zero = sum(entry["position"] == 0 for entry in top) / len(top)
    channel, channel_count = Counter(entry["channel"] for entry in top).most_common(1)[0]
    if at_zero >= 0.5:
        kind = "position-0 spike"
    elif channel_count / len(top) >= 0.5:
        kind = "channel outlier"
    else:
        kind = "scattered"
    median = peak_layer["mean_median"]
    ratio = peak_layer["mean_topk"][0] / median if median > 0 else math.inf
    massive_layers = [layer["layer"] for layer in residual
                      if layer["mean_topk"][0] > abs_min
                      and layer["mean_topk"][0] >= ratio_min * max(layer["mean_median"], 1e-30)]
    return {"layer": peak_layer["layer"], "max_abs": top[0]["abs"], "mean_top1": peak_layer["mean_topk"][0],
            "median": median, "ratio_to_median": ratio, "kind": kind, "position0_share": at_zero,
            "channel": channel, "channel_share": channel_count / len(top), "massive": bool(massive_layers),
            "massive_layers": massive_layers, "criterion": {"abs_min": abs_min, "ratio_min": ratio_min}}
