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
from outlierlab.probes.stats import DownProjStats

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


def detect_super_weights(loaded, prompt: str = DEFAULT_PROMPT, spike_ratio: float = 50.0,
                         min_share: float = 0.5, min_weight_zscore: float = 10.0, max_iterations: int = 10) -> dict:
    """Returns {"super_weights": [...], "iterations": [...], "stop_reason": ...}; the model is unchanged afterwards.

    Each iteration takes the largest spike that is not an already-found weight. It is a super weight when that one
    weight makes at least `min_share` of the spike (w * x[col] / y[row]) and is itself an outlier of its matrix
    (|w| >= `min_weight_zscore` standard deviations); otherwise, or when no layer spikes, detection stops. The
    z-score guard matters once a super weight is zeroed: its input spike still multiplies the ordinary weights of
    the same column, whose outputs can spike without any of them being special.
    """
    tokens = loaded.tokenizer.convert_ids_to_tokens(loaded.encode(prompt))
    found: list[dict] = []
    iterations = []
    stop_reason = f"reached max_iterations={max_iterations}"
    with EditSession(loaded) as session:
        for iteration in tqdm(range(max_iterations), desc="detect super weights", leave=False):
            profile = down_proj_profile(loaded, prompt)
            out_ratio = _ratios([layer["output_max"]["abs"] for layer in profile])
            input_reference = statistics.median([layer["input_max"]["abs"] for layer in profile]) or 1e-12
            in_ratio = [layer["input_at_output_peak"]["abs"] / input_reference for layer in profile]
            spikes = [l for l in range(len(profile)) if out_ratio[l] >= spike_ratio and in_ratio[l] >= spike_ratio]
            iterations.append({"iteration": iteration, "spiking_layers": spikes, "output_ratio": out_ratio,
                               "input_ratio": in_ratio, "profile": profile})
            known = {tuple(f["coord"]) for f in found}
            fresh = [l for l in spikes if (l, profile[l]["output_max"]["channel"],
                                           profile[l]["input_at_output_peak"]["channel"]) not in known]
            if not fresh:
                stop_reason = "no layer spikes" if not spikes else "only already-found super weights spike"
                break
            layer = max(fresh, key=lambda l: out_ratio[l])
            peak, feed = profile[layer]["output_max"], profile[layer]["input_at_output_peak"]
            weight = SuperWeight(layer, peak["channel"], feed["channel"])
            view = loaded.sites.down_proj(layer)
            index = view.index(weight.row, weight.col)
            value = float(view.param.data[index])
            share = value * feed["value"] / peak["value"]
            zscore = abs(value) / float(view.param.data.float().std())
            if share < min_share:
                stop_reason = f"largest remaining spike {weight} is not one weight's doing (share {share:.2f})"
                break
            if zscore < min_weight_zscore:
                stop_reason = f"largest remaining spike {weight} comes from an ordinary weight (z-score {zscore:.1f})"
                break
            found.append({
                "coord": list(weight), "label": str(weight), "value": value,
                "magnitude_rank": int((view.param.data.abs() > abs(value)).sum()) + 1,
                "output_spike": peak["value"], "input_spike": feed["value"], "position": peak["position"],
                "token": tokens[peak["position"]], "output_ratio": out_ratio[layer], "input_ratio": in_ratio[layer],
                "contribution_share": share, "weight_zscore": zscore, "iteration": iteration})
            session.set(view.param, index, 0.0)
    return {"prompt": prompt, "spike_ratio": spike_ratio, "min_share": min_share,
            "min_weight_zscore": min_weight_zscore, "super_weights": found,
            "stop_reason": stop_reason, "iterations": iterations}
