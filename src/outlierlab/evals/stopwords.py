"""Which tokens gain probability when a super weight is pruned (paper SW Fig. 5: stopwords do).

Each window's next-token distribution is averaged over its scored positions, before and after the edit; every
window scores the same number of positions, so the mean over windows is the mean over every position. Tokens are
ranked by their gain in mean probability and marked stopword or not by the list in conf/eval/stopwords/. Each gain,
ratio and stopword mass carries a paired bootstrap interval over the windows (evals/bootstrap.py: before and after
resampled at the same windows), and so does the share of stopwords among the top gainers (the top is re-ranked in
every resample).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from outlierlab.evals.bootstrap import BOOTSTRAP, percentile_interval, resample_weights
from outlierlab.models import offload

RESAMPLE_CHUNK = 100  # resamples of the whole [vocab] gain at a time: 100 x 128k float64 is 100 MB


@torch.no_grad()
def window_next_token_probs(model: torch.nn.Module, windows, batch_size: int = 1, desc: str = "token probs"):
    """Each window's mean over every position but the last of softmax(logits): [windows, vocab] float64."""
    device = offload.execution_device(model)  # also when the first parameter is offloaded (meta)
    means = []
    for batch in tqdm(windows.ids.split(batch_size), desc=desc, leave=False):
        probs = model(batch.to(device)).logits[:, :-1].float().softmax(dim=-1)
        means.append(probs.mean(dim=1).double().cpu())
    return torch.cat(means)


def is_stopword(text: str, words: set[str], whitespace: bool) -> bool:
    """A token is a stopword when its text, stripped and lower-cased, is in `words` (whitespace-only tokens too
    when `whitespace`)."""
    stripped = text.strip().lower()
    return (whitespace and stripped == "") or stripped in words


class _Resampled:
    """Paired bootstrap over the windows of [windows, k] per-window values: resampled means, [resamples, k]."""

    def __init__(self, windows: int, method: dict):
        self.method = method
        self.weights = torch.from_numpy(resample_weights(windows, method) / windows) if windows >= 2 else None

    def means(self, per_window: torch.Tensor) -> torch.Tensor | None:
        return None if self.weights is None else self.weights @ per_window

    def interval(self, samples: torch.Tensor | None) -> list[float]:
        return [math.nan, math.nan] if samples is None else percentile_interval(samples.numpy(), self.method)

    def ratio_interval(self, after: torch.Tensor, before: torch.Tensor) -> list[float]:
        """after / before of two [windows] series (their means' ratio)."""
        if self.weights is None:
            return [math.nan, math.nan]
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.interval(self.means(after) / self.means(before))


def probability_shift(tokenizer, before: torch.Tensor, after: torch.Tensor, stopwords, top: int,
                      focus: list[str] = (), method: dict = BOOTSTRAP) -> dict:
    """From per-window mean distributions ([windows, vocab], the same windows before and after the edit): the `top`
    tokens that gain the most mean probability (after - before), the `top` that lose the most, the stopwords' total
    probability mass before and after, the share of stopwords among the top gainers, and for each word in `focus`
    the mass of every token spelling it (any case, any surrounding whitespace) before and after; each with its
    paired bootstrap interval over the windows (`<key>_ci`)."""
    words = {str(word).lower() for word in stopwords.words}
    vocab = min(before.shape[-1], len(tokenizer))  # logits may be padded beyond the tokenizer's vocabulary
    before, after = before[:, :vocab].double(), after[:, :vocab].double()
    texts = [tokenizer.decode([index]) for index in range(vocab)]
    flags = torch.tensor([is_stopword(text, words, stopwords.whitespace) for text in texts])
    mean_before, mean_after = before.mean(0), after.mean(0)
    gain = mean_after - mean_before
    resampled = _Resampled(before.shape[0], method)

    def describe(indices) -> list[dict]:
        indices = indices.tolist()
        gain_samples = resampled.means(after[:, indices] - before[:, indices])
        rows = []
        for column, i in enumerate(indices):
            rows.append({"id": int(i), "text": texts[i], "stopword": bool(flags[i]),
                         "p_before": float(mean_before[i]), "p_after": float(mean_after[i]),
                         "gain": float(gain[i]),
                         "gain_ci": resampled.interval(None if gain_samples is None else gain_samples[:, column]),
                         "ratio": float(mean_after[i] / mean_before[i]) if mean_before[i] > 0 else math.inf,
                         "ratio_ci": resampled.ratio_interval(after[:, i], before[:, i])})
        return rows

    gainers = describe(gain.topk(top).indices)
    mass_before, mass_after = before[:, flags].sum(1), after[:, flags].sum(1)
    words_of = {}
    for word in focus:
        ids = [i for i, text in enumerate(texts) if text.strip().lower() == str(word).lower()]
        word_before, word_after = before[:, ids].sum(1), after[:, ids].sum(1)
        p_before, p_after = float(word_before.mean()), float(word_after.mean())
        words_of[str(word)] = {"tokens": len(ids), "p_before": p_before, "p_after": p_after,
                               "ratio": p_after / p_before if p_before > 0 else math.inf,
                               "ratio_ci": resampled.ratio_interval(word_after, word_before)}
    return {"gainers": gainers, "losers": describe((-gain).topk(top).indices),
            "stopword_tokens": int(flags.sum()), "vocab": vocab, "windows": before.shape[0],
            "stopword_mass_before": float(mass_before.mean()),
            "stopword_mass_before_ci": resampled.interval(resampled.means(mass_before)),
            "stopword_mass_after": float(mass_after.mean()),
            "stopword_mass_after_ci": resampled.interval(resampled.means(mass_after)),
            "stopword_mass_gain": float((mass_after - mass_before).mean()),
            "stopword_mass_gain_ci": resampled.interval(resampled.means(mass_after - mass_before)),
            "stopword_share_of_top_gainers": sum(g["stopword"] for g in gainers) / len(gainers),
            "stopword_share_of_top_gainers_ci": resampled.interval(_top_share(resampled, after - before, flags, top)),
            "focus": words_of, "ci_method": method}


def _top_share(resampled: _Resampled, gains: torch.Tensor, flags: torch.Tensor, top: int) -> torch.Tensor | None:
    """The stopwords' share of the `top` gainers, re-ranked in every resample: [resamples]."""
    if resampled.weights is None:
        return None
    shares = []
    for weights in resampled.weights.split(RESAMPLE_CHUNK):
        ranked = (weights @ gains).topk(top, dim=1).indices
        shares.append(flags[ranked].double().mean(1))
    return torch.cat(shares)
