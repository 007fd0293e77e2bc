"""Do the outliers survive a rotation of the residual stream (QuaRot, arXiv 2404.00456)? The atlas probes on one
model as it is now (the recipe calls this on the original and again under the rotation edit):

    measure(loaded, windows, criteria)   one pass over the windows with every probe hooked:
        massive activations    the paper MA criterion on the residual stream (ResidualStats; Sun et al. 2024)
        channel outliers       LLM.int8 features at the norm outputs (what q/k/v and gate/up read)
        kurtosis               pooled kurtosis of the residual stream, of the q/k/v input and of the down_proj input
        attention sinks        Gu et al. 2024's sink rate
    ma_token(loaded, prompt, layer, position)   |h| over channels of one token: its norm (a rotation keeps it),
                                                 its largest channel and that channel's share of the norm
    super_weights(loaded, detection)   data-free SW detection, and the largest |w| of every down_proj with its
                                       z-score in its matrix (what "prune the largest weight" zeroes)
"""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from outlierlab.probes.massive_activations import MACriterion, find_massive_activations
from outlierlab.probes.moments import SiteMoments
from outlierlab.probes.outliers import ChannelCriterion, ChannelOutliers, SinkCriterion, SinkRate
from outlierlab.probes.stats import ResidualStats
from outlierlab.probes.super_weight import detect_super_weights
from outlierlab.tables import Reference

KURTOSIS_SITES = {"residual": "layers.{i}.out", "qkv_input": "layers.{i}.attn.in",
                  "down_proj_input": "layers.{i}.mlp.act.out"}


def _spec(spec: dict) -> dict:
    return {key: value for key, value in spec.items() if key != "provenance"}


@torch.no_grad()
def measure(loaded, windows, criteria: dict) -> dict:
    """criteria: {"massive_activation", "channel_outliers", "attention_sinks"} as the conf/probe presets."""
    sites = loaded.sites
    ma = MACriterion(min_abs=criteria["massive_activation"]["min_abs"],
                     median_ratio=criteria["massive_activation"]["min_ratio"])
    residual = ResidualStats(sites, k=1, exceedance=ma.exceedance())
    channels = ChannelOutliers(sites, ChannelCriterion(**_spec(criteria["channel_outliers"])))
    sinks = SinkRate(sites, SinkCriterion(**_spec(criteria["attention_sinks"]))) if sites.attention_observable else None
    moments = {name: SiteMoments(sites, site) for name, site in KURTOSIS_SITES.items()}
    with residual, channels, sinks or contextlib.nullcontext(), contextlib.ExitStack() as stack:
        for probe in moments.values():
            stack.enter_context(probe)
        for batch in tqdm(windows.ids.split(1), desc="rotation: probe pass"):
            residual.observe(batch)
            loaded.model(batch.to(loaded.device))
    summary = residual.summary()
    found = find_massive_activations(summary, residual.sequences, ma)
    channel_summary = channels.summary()
    return {
        "massive_activations": {
            "found": len(found), "channels": sorted({entry["channel"] for entry in found}),
            "layers": sorted({entry["layer"] for entry in found}),
            "max_abs": max(row["top"][0]["abs"] for row in summary),
            "max_abs_per_layer": [row["top"][0]["abs"] for row in summary],
            "top_channel_per_layer": [row["top"][0]["channel"] for row in summary],
            "median_per_layer": [row["mean_median"] for row in summary]},
        "channel_outliers": {"features": channel_summary["features"],
                             "count_per_layer": channel_summary["count_per_layer"]},
        "kurtosis": {name: {"per_layer": probe.kurtosis(), "mean": probe.summary()["avg_kurtosis"],
                            "max_abs": probe.summary()["max_inf_norm"]} for name, probe in moments.items()},
        "attention_sinks": ({"sink_rate": sinks.summary()["sink_rate"]} if sinks else
                            {"sink_rate": None, "reason": "attention not observable"}),
    }


@torch.no_grad()
def ma_token(loaded, prompt: str, layer: int, position: int) -> dict:
    """The residual vector after block `layer` at `position` of the prompt: |h| per channel and how spread it is."""
    ids = torch.tensor([loaded.encode(prompt)], device=loaded.device)
    seen = {}
    with loaded.sites.hook(f"layers.{layer}.out", lambda h: seen.__setitem__("h", h[0, position].detach().float())):
        loaded.model(ids)
    vector = seen["h"].cpu()
    norm = float(vector.norm())
    top = int(vector.abs().argmax())
    return {"layer": layer, "position": position, "norm": norm, "max_abs": float(vector.abs().max()),
            "top_channel": top, "top_share_of_norm": float(vector.abs().max()) / norm if norm else None,
            "abs_per_channel": vector.abs().tolist()}


@torch.no_grad()
def super_weights(loaded, detection: dict) -> dict:
    """Detected super weights and each down_proj's largest |w| (row, col, value, z-score in its matrix)."""
    found = detect_super_weights(loaded, **detection)
    largest = []
    for layer in range(loaded.sites.num_layers):
        matrix = loaded.sites.down_proj(layer).as_out_in().double()
        flat = int(matrix.abs().argmax())
        row, col = divmod(flat, matrix.shape[1])
        value = float(matrix[row, col])
        largest.append({"layer": layer, "row": row, "col": col, "value": value,
                        "zscore": (abs(value) - float(matrix.abs().mean())) / float(matrix.abs().std())})
    return {"detected": [entry["coord"] for entry in found["super_weights"]],
            "detected_values": [entry.get("value") for entry in found["super_weights"]],
            "stop_reason": found.get("stop_reason"), "largest_down_proj": largest}


# What the recipe records beside the measurements: the quantization protocol, the paper reference, the caption.
def quant_protocol(exp) -> dict:
    """What "W8A8" etc. mean in this result (recorded with it)."""
    weights, activations = exp.quant.weights, exp.quant.activations
    return {"weights": f"per_{weights.block}" if weights.block in ("channel", "tensor") else weights.block,
            "weights_zero_point": weights.zero_point,
            "activations": f"per_{activations.granularity}", "activations_zero_point": activations.zero_point,
            "activations_range": "dynamic", "targets": "every decoder-block linear (embedding and LM head float)",
            "settings": {name: {"weight_bits": bits[0], "activation_bits": bits[1]}
                         for name, bits in exp.settings.items()}}


def reference_block(entries: list[dict]) -> Reference | None:
    """The table's reference block: the published rows that map onto one of ours and have WikiText-2 PPL."""
    values = {entry["row"]: {key: entry[key] for key in ("wikitext2", "zero_shot_mean") if key in entry}
              for entry in entries if entry.get("row") and "wikitext2" in entry}
    if not values:
        return None
    sources = sorted({f"{e['source']}: {e['model']} {e['setting']} {e['method']}" for e in entries
                      if e.get("row") in values and "wikitext2" in e})
    return Reference(source="; ".join(sources), model="(not ours)", values=values,
                     provenance="quoted in issue 25; every published number is in tables/rotation_reference")


def caption(cfg, protocol: dict, calibration: dict) -> str:
    settings = ", ".join(f"{name} = W{s['weight_bits']}A{s['activation_bits']}"
                         for name, s in protocol["settings"].items())
    protocols = ", ".join(f"{key} {p.windows} x {p.seqlen}" for key, p in cfg.eval.ppl.items())
    return (f"{cfg.model.name}, PPL ({cfg.eval.name} protocols, {protocols}). "
            f"Simulated quantization of every decoder-block linear: weights {protocol['weights_zero_point']} RTN "
            f"{protocol['weights']}, activations {protocol['activations_zero_point']} dynamic RTN "
            f"{protocol['activations']}; {settings}. rotated = QuaRot-style fused randomized Hadamard of the residual "
            f"stream + online Hadamard before down_proj; sw_aware = z-score clipping "
            f"(z {cfg.exp.quant.sw_aware.clip_zscore}) with the super weights restored + the largest |x| per token "
            f"held out; SmoothQuant alpha {cfg.exp.interventions.smoothquant.alpha} calibrated on "
            f"{calibration['windows']} x {calibration['seqlen']} C4 tokens. prune_largest = zero the largest |w| over "
            "all down_projs. Paper columns: other models.")
