"""Data-free super-weight detection (paper SW, Sec. 3.1).

One prompt goes through the model while DownProjStats records, per layer, the max |output| of mlp.down_proj and
the max |input| at that output's position. A super weight sits where both spike: row = the output channel of the
spike, col = the input channel that feeds it. The detected weight is then zeroed and the prompt run again, until no
layer spikes (so models with several super weights, e.g. llama-30b, are found one by one).

"Spikes" is relative, so no threshold depends on a model's scale: a layer spikes when its max |output| is at
least `spike_ratio` times the median over layers of that max, and the same holds for the input.
"""
from __future__ import annotations

import statistics

import torch
from tqdm.auto import tqdm

from outlierlab.interventions.base import EditSession
from outlierlab.models.coords import SuperWeight
from outlierlab.probes.stats import DownProjStats, ResidualStats

# The prompt of the paper's Fig. 3 / the authors' notebook.
DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."


def _ratios(values: list[float]) -> list[float]:
    reference = statistics.median(values) or 1e-12
    return [value / reference for value in values]


@torch.no_grad()
def down_proj_profile(loaded, prompt: str) -> list[dict]:
    """Per layer: max |input| and |output| of down_proj on `prompt` (paper SW Fig. 3)."""
    ids = torch.tensor([loaded.encode(prompt)], device=loaded.device)
    with DownProjStats(loaded.sites) as stats:
        loaded.model(ids)
    return stats.summary()


def _spikes(profile: list[dict], spike_ratio: float) -> dict:
    """Per layer, down_proj's max |output| and the |input| at that position, each relative to the median over
    layers; the layers where both are at least `spike_ratio`."""
    out_ratio = _ratios([layer["output_max"]["abs"] for layer in profile])
    input_reference = statistics.median([layer["input_max"]["abs"] for layer in profile]) or 1e-12
    in_ratio = [layer["input_at_output_peak"]["abs"] / input_reference for layer in profile]
    spikes = [l for l in range(len(profile)) if out_ratio[l] >= spike_ratio and in_ratio[l] >= spike_ratio]
    return {"spiking_layers": spikes, "output_ratio": out_ratio, "input_ratio": in_ratio, "profile": profile}


def _candidate(loaded, spikes: dict, layer: int, tokens: list[str]) -> dict:
    """The weight at (layer, spiking output channel, input channel feeding it) and what decides whether it is a
    super weight: its share of the spike (w * x[col] / y[row]) and its z-score in its matrix."""
    profile = spikes["profile"]
    peak, feed = profile[layer]["output_max"], profile[layer]["input_at_output_peak"]
    weight = SuperWeight(layer, peak["channel"], feed["channel"])
    matrix = loaded.sites.down_proj(layer)
    value = float(matrix.param.data[matrix.index(weight.row, weight.col)])
    return {"coord": list(weight), "label": str(weight), "value": value,
            "magnitude_rank": int((matrix.param.data.abs() > abs(value)).sum()) + 1,
            "output_spike": peak["value"], "input_spike": feed["value"], "position": peak["position"],
            "token": tokens[peak["position"]], "output_ratio": spikes["output_ratio"][layer],
            "input_ratio": spikes["input_ratio"][layer], "contribution_share": value * feed["value"] / peak["value"],
            "weight_zscore": abs(value) / float(matrix.param.data.float().std())}


def detect_super_weights(loaded, prompt: str = DEFAULT_PROMPT, spike_ratio: float = 50.0,
                         min_share: float = 0.5, min_weight_zscore: float = 10.0, max_iterations: int = 10) -> dict:
    """Returns {"super_weights": [...], "rejected": {...} | None, "iterations": [...], "stop_reason": ...}; the model
    is unchanged afterwards. Each super weight (and the rejected last candidate) carries its value (for GGUF models a
    dequantized block-quantized value), its magnitude rank in its matrix, z-score, and the input/output spikes.

    Each iteration takes the largest spike that is not an already-found weight. It is a super weight when that one
    weight makes at least `min_share` of the spike (w * x[col] / y[row]) and is itself an outlier of its matrix
    (|w| >= `min_weight_zscore` standard deviations); otherwise, or when no layer spikes, detection stops. The
    z-score guard matters once a super weight is zeroed: its input spike still multiplies the ordinary weights of
    the same column, whose outputs can spike without any of them being special.
    """
    tokens = loaded.tokenizer.convert_ids_to_tokens(loaded.encode(prompt))
    found: list[dict] = []
    rejected = None  # the spike that stopped detection, when it was one weight's location but not a super weight
    iterations = []
    stop_reason = f"reached max_iterations={max_iterations}"
    with EditSession(loaded) as session:
        for iteration in tqdm(range(max_iterations), desc="detect super weights", leave=False):
            spikes = _spikes(down_proj_profile(loaded, prompt), spike_ratio)
            iterations.append({"iteration": iteration, **spikes})
            known = {tuple(f["coord"]) for f in found}
            profile, spiking = spikes["profile"], spikes["spiking_layers"]
            fresh = [l for l in spiking if (l, profile[l]["output_max"]["channel"],
                                            profile[l]["input_at_output_peak"]["channel"]) not in known]
            if not fresh:
                stop_reason = "no layer spikes" if not spiking else "only already-found super weights spike"
                break
            candidate = {**_candidate(loaded, spikes, max(fresh, key=lambda l: spikes["output_ratio"][l]), tokens),
                         "iteration": iteration}
            weight = SuperWeight(*candidate["coord"])
            share, zscore = candidate["contribution_share"], candidate["weight_zscore"]
            if share < min_share:
                stop_reason = f"largest remaining spike {weight} is not one weight's doing (share {share:.2f})"
                rejected = {**candidate, "reason": stop_reason}
                break
            if zscore < min_weight_zscore:
                stop_reason = f"largest remaining spike {weight} comes from an ordinary weight (z-score {zscore:.1f})"
                rejected = {**candidate, "reason": stop_reason}
                break
            found.append(candidate)
            matrix = loaded.sites.down_proj(weight.layer)
            session.set(matrix.param, matrix.index(weight.row, weight.col), 0.0)
    return {"prompt": prompt, "spike_ratio": spike_ratio, "min_share": min_share,
            "min_weight_zscore": min_weight_zscore, "super_weights": found, "rejected": rejected,
            "stop_reason": stop_reason, "iterations": iterations}


def choose_super_weights(mode: str, detected: list[SuperWeight], registry: list[SuperWeight]):
    """Which super weights a study edits: `detect` (data-free detection), `registry` (model.super_weights) or `auto`
    (the registry when the model YAML lists some, else detect). Returns (weights, origin)."""
    if mode == "detect":
        return detected, "detected"
    if mode == "registry":
        return registry, "registry"
    if mode == "auto":
        return (registry, "registry") if registry else (detected, "detected")
    raise ValueError(f"exp.super_weights={mode} is not one of: auto, detect, registry")


def super_weights_for_study(loaded, detection: dict, mode: str, registry: list[SuperWeight]):
    """What every SW study starts with: detection always runs (its trace goes into the result) and `mode` picks
    the weights the study edits. Returns (detection trace, detected weights, chosen weights, origin)."""
    trace = detect_super_weights(loaded, **detection)
    detected = [SuperWeight(*entry["coord"]) for entry in trace["super_weights"]]
    return trace, detected, *choose_super_weights(mode, detected, registry)


@torch.no_grad()
def describe_weights(loaded, weights: list[SuperWeight], prompt: str = DEFAULT_PROMPT) -> list[dict]:
    """For each (layer, row, col): its value (for GGUF models a dequantized block-quantized value), magnitude rank
    in its down_proj matrix (1 = largest |w|), z-score, and on `prompt` (one forward of the model as it is) the
    down_proj output y[row] and input x[col] at the token where |y[row]| peaks: the "output/input spike" of Fig. 3.
    Only the addressed channels are kept from each forward."""
    ids = torch.tensor([loaded.encode(prompt)], device=loaded.device)
    tokens = loaded.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    channels = {layer: (sorted({w.row for w in weights if w.layer == layer}),
                        sorted({w.col for w in weights if w.layer == layer}))
                for layer in sorted({w.layer for w in weights})}
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def keep(point: str, layer: int, picked: list[int]):
        def fold(tensor: torch.Tensor):
            seen[(point, layer)] = tensor[0, :, picked].detach().float().cpu()
        return fold

    hooks = {}
    for layer, (rows, cols) in channels.items():
        hooks[f"layers.{layer}.mlp.down_proj.in"] = keep("in", layer, cols)
        hooks[f"layers.{layer}.mlp.down_proj.out"] = keep("out", layer, rows)
    with loaded.sites.hooks(hooks):
        loaded.model(ids)
    described = []
    for weight in weights:
        view = loaded.sites.down_proj(weight.layer)
        matrix = view.param.data
        value = float(matrix[view.index(weight.row, weight.col)])
        rows, cols = channels[weight.layer]
        output = seen[("out", weight.layer)][:, rows.index(weight.row)]
        position = int(output.abs().argmax())
        described.append({
            "coord": list(weight), "label": str(weight), "value": value,
            "magnitude_rank": int((matrix.abs() > abs(value)).sum()) + 1,
            "weight_zscore": abs(value) / float(matrix.float().std()),
            "output_spike": float(output[position]),
            "input_spike": float(seen[("in", weight.layer)][position, cols.index(weight.col)]),
            "position": position, "token": tokens[position]})
    return described


@torch.no_grad()
def massive_activation(loaded, prompt: str = DEFAULT_PROMPT, min_abs: float = 100.0,
                       min_ratio: float = 1000.0) -> dict:
    """The residual stream's largest |h| over layers on `prompt` (ResidualStats), and whether it is a massive
    activation in the MA paper's sense (|h| >= min_abs and >= min_ratio x that layer's median |h|). Its channel is
    the one a super weight's row should equal."""
    ids = torch.tensor([loaded.encode(prompt)], device=loaded.device)
    with ResidualStats(loaded.sites, k=1) as stats:
        stats.observe(ids)
        loaded.model(ids)
    per_layer = [{"layer": s["layer"], "channel": s["top"][0]["channel"], "abs": s["top"][0]["abs"],
                  "value": s["top"][0]["value"], "position": s["top"][0]["position"], "median": s["mean_median"]}
                 for s in stats.summary()]
    peak = max(per_layer, key=lambda entry: entry["abs"])
    ratio = peak["abs"] / (peak["median"] or 1e-12)
    massive = peak["abs"] >= min_abs and ratio >= min_ratio
    layers_with_channel = [e["layer"] for e in per_layer
                           if e["channel"] == peak["channel"] and e["abs"] >= min_abs
                           and e["abs"] >= min_ratio * (e["median"] or 1e-12)]
    token = loaded.tokenizer.convert_ids_to_tokens([int(ids[0, peak["position"]])])[0]
    return {"prompt": prompt, "min_abs": min_abs, "min_ratio": min_ratio, "massive": massive,
            "channel": peak["channel"], "layer": peak["layer"], "value": peak["value"], "abs": peak["abs"],
            "ratio_to_median": ratio, "position": peak["position"], "token": token,
            "layers": layers_with_channel, "per_layer": per_layer}


@torch.no_grad()
def residual_profile(loaded, prompts: list[str]) -> list[dict]:
    """Per layer: max |residual| (`layers.{i}.out`) over `prompts`, its channel and position, and the median |h|
    (paper SW Fig. 4: the super activation appears where the super weight sits and is carried to the end)."""
    with ResidualStats(loaded.sites, k=1) as stats:
        for prompt in tqdm(prompts, desc="residual profile", leave=False):
            ids = torch.tensor([loaded.encode(prompt)], device=loaded.device)
            stats.observe(ids)
            loaded.model(ids)
    return [{"layer": s["layer"], "max_abs": s["top"][0]["abs"], "value": s["top"][0]["value"],
             "channel": s["top"][0]["channel"], "sequence": s["top"][0]["sequence"],
             "position": s["top"][0]["position"], "median": s["mean_median"]} for s in stats.summary()]
