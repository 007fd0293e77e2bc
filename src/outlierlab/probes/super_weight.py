"""Data-free super-weight detection (paper SW, Sec. 3.1).

One prompt goes through the model while DownProjStats records, per layer, the max |output| of mlp.down_proj and
the max |input| at that output's position. A super weight sits where both spike: row = the output channel of the
spike, col = the input channel that feeds it. The detected weight is then zeroed and the prompt run again, until no
layer spikes (so models with several super weights, e.g. llama-30b, are found one by one).

What "spikes" means is a preset (conf/probe/sw_detection.yaml and sw_*.yaml, each with its provenance): the default
is scale-free (>= 100x the median |.| of the same layer's input and output on the prompt), so a model whose spike is
300x smaller than SmolLM2's 24,000 is judged like SmolLM2; the paper's authors' |x| > 50 and outlierlab's first
"50x the median over layers" are the other presets. One weight must then make the spike and be an outlier of its
matrix.
"""
from __future__ import annotations

import statistics

import torch
from tqdm.auto import tqdm

from outlierlab.models import offload
from outlierlab.models.edit import WeightEdits
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


def _one_sequence(tensor: torch.Tensor) -> torch.Tensor:
    """[positions, channels] of a one-sequence batch."""
    return tensor.detach().float().reshape(-1, tensor.shape[-1])


def _scale(tensor: torch.Tensor) -> float:
    """Median |x|, or mean |x| where more than half the entries are 0 (ReLU MLPs such as OPT's)."""
    magnitude = tensor.abs()
    median = float(magnitude.median())
    return median if median > 0 else float(magnitude.mean())


@torch.no_grad()
def spike_profile(loaded, ids: torch.Tensor) -> list[dict]:
    """Per layer, on one prompt: the largest |down_proj output| (channel, position), the input |x| at that position
    (its largest channel), and the median |.| of the layer's whole output and input: the scale a spike is judged by
    when no absolute threshold is trusted. Only these few numbers leave each hook."""
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def keep(point: str, layer: int):
        def fold(tensor: torch.Tensor):
            seen[(point, layer)] = _one_sequence(tensor)
        return fold

    sites = loaded.sites
    # Mixture-of-experts layers have no single down_proj (probes/expert_super_weights.py looks inside each expert):
    # their entry is flat, so it never spikes.
    dense = [layer for layer in range(sites.num_layers) if layer not in sites.moe_layers]
    with sites.hooks({**sites.per_layer("layers.{i}.mlp.down_proj.in", lambda layer: keep("in", layer), dense),
                      **sites.per_layer("layers.{i}.mlp.down_proj.out", lambda layer: keep("out", layer), dense)}):
        loaded.model(ids)
    profile = []
    for layer in range(loaded.sites.num_layers):
        flat = torch.ones(1, 1)
        out, inp = seen.pop(("out", layer), flat), seen.pop(("in", layer), flat)
        position, row = divmod(int(out.abs().argmax()), out.shape[1])
        col = int(inp[position].abs().argmax())
        profile.append({"layer": layer, "row": row, "col": col, "position": position,
                        "output": float(out[position, row]), "input": float(inp[position, col]),
                        "output_abs": abs(float(out[position, row])), "input_abs": abs(float(inp[position, col])),
                        "output_median": _scale(out), "input_median": _scale(inp)})
    return profile


def _spiking(profile: list[dict], spike_min_abs, spike_layer_ratio, spike_ratio) -> tuple[list[int], dict]:
    """Layers whose down_proj input and output both spike under every criterion that is set (None = not used):
    spike_min_abs      |x| > this on input and output (paper SW, the authors' code: 50)
    spike_layer_ratio  >= this x the median |.| of that layer's own input / output on the prompt (scale-free)
    spike_ratio        >= this x the median over layers of the max |.| (outlierlab's first criterion, 50)."""
    over_layers_out = statistics.median([p["output_abs"] for p in profile]) or 1e-12
    over_layers_in = statistics.median([p["input_abs"] for p in profile]) or 1e-12
    ratios = {"output_layer_ratio": [p["output_abs"] / (p["output_median"] or 1e-12) for p in profile],
              "input_layer_ratio": [p["input_abs"] / (p["input_median"] or 1e-12) for p in profile],
              "output_ratio": [p["output_abs"] / over_layers_out for p in profile],
              "input_ratio": [p["input_abs"] / over_layers_in for p in profile]}
    spikes = []
    for layer, p in enumerate(profile):
        tests = []
        if spike_min_abs is not None:
            tests += [p["output_abs"] > spike_min_abs, p["input_abs"] > spike_min_abs]
        if spike_layer_ratio is not None:
            tests += [ratios["output_layer_ratio"][layer] >= spike_layer_ratio,
                      ratios["input_layer_ratio"][layer] >= spike_layer_ratio]
        if spike_ratio is not None:
            tests += [ratios["output_ratio"][layer] >= spike_ratio, ratios["input_ratio"][layer] >= spike_ratio]
        if tests and all(tests):
            spikes.append(layer)
    return spikes, ratios


def detect_super_weights(loaded, prompt: str = DEFAULT_PROMPT, spike_layer_ratio: float | None = 100.0,
                         spike_min_abs: float | None = None, spike_ratio: float | None = None,
                         min_share: float = 0.5, min_weight_zscore: float = 10.0, max_iterations: int = 10,
                         preset: str | None = None, provenance: str | None = None) -> dict:
    """Returns {"super_weights": [...], "rejected": {...} | None, "iterations": [...], "stop_reason": ...}; the model
    is unchanged afterwards. Each super weight (and the rejected last candidate) carries its value (for GGUF models a
    dequantized block-quantized value), its magnitude rank in its matrix, z-score, and the input/output spikes.

    A layer is a candidate when its down_proj input and output spike (`_spiking`; presets in conf/probe/sw_*.yaml).
    Each iteration takes the candidate not already found with the largest |output spike| (`_largest_new_spike`: as
    the paper takes the largest spike; ranking within one model needs no scale); it is a super weight when that one
    weight makes at least `min_share` of the spike and is an outlier of its matrix (`_rejection`): it is zeroed and
    detection runs again. Otherwise detection stops (`rejected` says why). Detected is not important: the studies
    measure importance separately.
    """
    ids = torch.tensor([loaded.encode(prompt)], device=loaded.device)
    tokens = loaded.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    found: list[dict] = []
    rejected = None  # the spike that stopped detection, when it was one weight's location but not a super weight
    iterations = []
    stop_reason = f"reached max_iterations={max_iterations}"
    # Detection edits the model (each super weight found is zeroed so the next can show); the session undoes it.
    with WeightEdits(loaded) as session:
        for iteration in tqdm(range(max_iterations), desc="detect super weights", leave=False):
            profile = spike_profile(loaded, ids)
            spikes, ratios = _spiking(profile, spike_min_abs, spike_layer_ratio, spike_ratio)
            iterations.append({"iteration": iteration, "spiking_layers": spikes, **ratios, "profile": profile})
            layer = _largest_new_spike(spikes, profile, found)
            if layer is None:
                stop_reason = "no layer spikes" if not spikes else "only already-found super weights spike"
                break
            candidate = _candidate(loaded, profile[layer], {key: ratios[key][layer] for key in ratios}, tokens)
            candidate["iteration"] = iteration
            reason = _rejection(candidate, min_share, min_weight_zscore)
            if reason is not None:
                stop_reason, rejected = reason, {**candidate, "reason": reason}
                break
            found.append(candidate)
            view = loaded.sites.down_proj(layer)
            session.set(view.param, view.index(*candidate["coord"][1:]), 0.0)
    return {"prompt": prompt, "preset": preset, "provenance": provenance, "spike_layer_ratio": spike_layer_ratio,
            "spike_min_abs": spike_min_abs, "spike_ratio": spike_ratio, "min_share": min_share,
            "min_weight_zscore": min_weight_zscore, "super_weights": found, "rejected": rejected,
            "stop_reason": stop_reason, "iterations": iterations}


def _largest_new_spike(spikes: list[int], profile: list[dict], found: list[dict]) -> int | None:
    """The spiking layer with the largest |output| whose (layer, row, col) is not a super weight found already."""
    known = {tuple(entry["coord"]) for entry in found}
    fresh = [layer for layer in spikes if (layer, profile[layer]["row"], profile[layer]["col"]) not in known]
    return max(fresh, key=lambda layer: profile[layer]["output_abs"], default=None)


def _candidate(loaded, spike: dict, ratios: dict, tokens: list[str]) -> dict:
    """The weight at a spike's (layer, row, col): its value, rank and z-score in its matrix, and the share of the
    spike it makes alone (w * x[col] / y[row])."""
    weight = SuperWeight(spike["layer"], spike["row"], spike["col"])
    view = loaded.sites.down_proj(weight.layer)
    matrix = offload.values(view.param)
    value = float(matrix[view.index(weight.row, weight.col)])
    return {"coord": weight.coord, "label": str(weight), "value": value,
            "magnitude_rank": int((matrix.abs() > abs(value)).sum()) + 1,
            "output_spike": spike["output"], "input_spike": spike["input"], "position": spike["position"],
            "token": tokens[spike["position"]], **ratios,
            "contribution_share": value * spike["input"] / spike["output"] if spike["output"] else 0.0,
            "weight_zscore": abs(value) / float(matrix.float().std())}


def _rejection(candidate: dict, min_share: float, min_weight_zscore: float) -> str | None:
    """Why the candidate is not a super weight (None: it is). The z-score guard matters once a super weight is
    zeroed: its input spike still multiplies the ordinary weights of the same column, whose outputs can spike
    without any of them being special."""
    label, share, zscore = candidate["label"], candidate["contribution_share"], candidate["weight_zscore"]
    if share < min_share:
        return f"largest remaining spike {label} is not one weight's doing (share {share:.2f})"
    if zscore < min_weight_zscore:
        return f"largest remaining spike {label} comes from an ordinary weight (z-score {zscore:.1f})"
    return None


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
def describe_weights(loaded, weights: list[SuperWeight], prompt: str = DEFAULT_PROMPT, ids=None) -> list[dict]:
    """For each (layer, row, col): its value (for GGUF models a dequantized block-quantized value), magnitude rank
    in its down_proj matrix (1 = largest |w|), z-score, and on `prompt` (one forward of the model as it is) the
    down_proj output y[row] and input x[col] at the token where |y[row]| peaks: the "output/input spike" of Fig. 3.
    Only the addressed channels are kept from each forward."""
    ids = torch.tensor([loaded.encode(prompt)], device=loaded.device) if ids is None else ids
    tokens = loaded.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    channels = {layer: (sorted({w.row for w in weights if w.layer == layer}),
                        sorted({w.col for w in weights if w.layer == layer}))
                for layer in sorted({w.layer for w in weights})}
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def keep(point: str, layer: int, picked: list[int]):
        def fold(tensor: torch.Tensor):
            seen[(point, layer)] = _one_sequence(tensor)[:, picked].cpu()
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
        matrix = offload.values(view.param)
        value = float(matrix[view.index(weight.row, weight.col)])
        rows, cols = channels[weight.layer]
        output = seen[("out", weight.layer)][:, rows.index(weight.row)]
        position = int(output.abs().argmax())
        described.append({
            "coord": weight.coord, "label": str(weight), "value": value,
            "magnitude_rank": int((matrix.abs() > abs(value)).sum()) + 1,
            "weight_zscore": abs(value) / float(matrix.float().std()),
            "output_spike": float(output[position]),
            "input_spike": float(seen[("in", weight.layer)][position, cols.index(weight.col)]),
            "position": position, "token": tokens[position]})
    return described


@torch.no_grad()
def massive_activation(loaded, prompt: str = DEFAULT_PROMPT, min_abs: float = 100.0,
                       min_ratio: float = 1000.0, provenance: str | None = None) -> dict:
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
