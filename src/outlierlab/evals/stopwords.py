"""Which tokens gain probability when a super weight is pruned (paper SW Fig. 5: stopwords do).

The model's next-token distribution is averaged over every scored position of a set of windows (streamed: one
[vocab] running sum), before and after the edit; tokens are ranked by their gain in mean probability, and each is
marked as a stopword or not by the list in conf/eval/stopwords/.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from outlierlab.models import offload


@torch.no_grad()
def mean_next_token_probs(model: torch.nn.Module, windows, batch_size: int = 1, desc: str = "token probs"):
    """Mean over every position but the last of each window of softmax(logits): a [vocab] float64 tensor."""
    device = offload.execution_device(model)  # also when the first parameter is offloaded (meta)
    total, positions = None, 0
    for batch in tqdm(windows.ids.split(batch_size), desc=desc, leave=False):
        probs = model(batch.to(device)).logits[:, :-1].float().softmax(dim=-1)
        summed = probs.sum(dim=(0, 1)).double().cpu()
        total = summed if total is None else total + summed
        positions += probs.shape[0] * probs.shape[1]
    return total / positions


def is_stopword(text: str, words: set[str], whitespace: bool) -> bool:
    """A token is a stopword when its text, stripped and lower-cased, is in `words` (whitespace-only tokens too
    when `whitespace`)."""
    stripped = text.strip().lower()
    return (whitespace and stripped == "") or stripped in words


def probability_shift(tokenizer, before: torch.Tensor, after: torch.Tensor, stopwords, top: int,
                      focus: list[str] = ()) -> dict:
    """The `top` tokens that gain the most mean probability (after - before), the `top` that lose the most, the
    stopwords' total probability mass before and after, the share of stopwords among the top gainers, and for each
    word in `focus` the mass of every token spelling it (any case, any surrounding whitespace) before and after."""
    words = {str(word).lower() for word in stopwords.words}
    vocab = min(len(before), len(tokenizer))  # logits may be padded beyond the tokenizer's vocabulary
    before, after = before[:vocab], after[:vocab]
    texts = [tokenizer.decode([index]) for index in range(vocab)]
    flags = torch.tensor([is_stopword(text, words, stopwords.whitespace) for text in texts])
    gain = after - before

    def describe(indices) -> list[dict]:
        return [{"id": int(i), "text": texts[i], "stopword": bool(flags[i]), "p_before": float(before[i]),
                 "p_after": float(after[i]), "gain": float(gain[i]),
                 "ratio": float(after[i] / before[i]) if before[i] > 0 else float("inf")} for i in indices.tolist()]

    gainers = describe(gain.topk(top).indices)
    words_of = {}
    for word in focus:
        ids = [i for i, text in enumerate(texts) if text.strip().lower() == str(word).lower()]
        mass_before, mass_after = float(before[ids].sum()), float(after[ids].sum())
        words_of[str(word)] = {"tokens": len(ids), "p_before": mass_before, "p_after": mass_after,
                               "ratio": mass_after / mass_before if mass_before > 0 else float("inf")}
    return {"gainers": gainers, "losers": describe((-gain).topk(top).indices),
            "stopword_tokens": int(flags.sum()), "vocab": vocab,
            "stopword_mass_before": float(before[flags].sum()), "stopword_mass_after": float(after[flags].sum()),
            "stopword_share_of_top_gainers": sum(g["stopword"] for g in gainers) / len(gainers),
            "focus": words_of}
