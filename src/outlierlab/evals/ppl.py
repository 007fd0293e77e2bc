"""Token-level perplexity: PPL = exp(mean next-token NLL) over fixed-length windows.

This is the GPTQ/SmoothQuant/MA/SW metric; lm-eval's `wikitext` task (document-level rolling word perplexity) is a
different number. Two ways to cut windows, both config:
    sequential  documents joined by `join`, tokenized once, cut into non-overlapping windows (WikiText-2 protocol)
    random      seeded random windows inside documents long enough to hold one (GPTQ's C4 protocol)
With BOS policy "prepend" every window is BOS + (seqlen - 1) text tokens; with "none" it is seqlen text tokens.
Either way seqlen - 1 tokens per window are scored.

Uncertainty: every window scores the same number of tokens, so PPL = exp(mean of the per-window NLLs) and a
percentile bootstrap over windows (evals/bootstrap.py, recorded in the result as `ci_method`) gives its interval
(`ppl_ci`); `ratio_interval` is the paired bootstrap of PPL_a / PPL_b over the same windows (same resampled indices
for both), the interval of "x original".
"""
from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from outlierlab.errors import ConfigError
from outlierlab.evals.bootstrap import BOOTSTRAP, interval
from outlierlab.evals.data import Corpus, DataError, check_corpus
from outlierlab.models import offload

SAMPLING = ("sequential", "random")
BOS_CHOICES = ("model", "prepend", "none")  # "model": the model's own policy (model.bos)


def check_protocol(key: str, protocol, data_dir: str | None, *, min_seqlen: int = 2, all_windows: bool = True) -> None:
    """The one check of a window protocol (eval.ppl.*, exp.data.*, exp.calibration, ...), before any weights load.
    `min_seqlen`: windows must hold at least this many tokens; `all_windows`: windows=null (every window) is allowed."""
    def choice(name, allowed):
        if protocol[name] not in allowed:
            raise ConfigError(f"{key}.{name}={protocol[name]} is not one of: {', '.join(allowed)}")
    choice("sampling", SAMPLING)
    choice("bos", BOS_CHOICES)
    if not isinstance(protocol.seqlen, int) or protocol.seqlen < min_seqlen:
        raise ConfigError(f"{key}.seqlen={protocol.seqlen} must be an integer >= {min_seqlen}")
    if protocol.windows is None and not all_windows:
        raise ConfigError(f"{key}.windows must be a positive integer")
    if protocol.windows is not None and (not isinstance(protocol.windows, int) or protocol.windows < 1):
        raise ConfigError(f"{key}.windows={protocol.windows} must be a positive integer or null (all)")
    if protocol.sampling == "random" and protocol.windows is None:
        raise ConfigError(f"{key}.windows must be set for random sampling")
    check_corpus(protocol.dataset, protocol.split, data_dir)


@dataclass
class Windows:
    ids: torch.Tensor  # [n, seqlen] int64
    meta: dict


def _bos_policy(protocol, loaded) -> str:
    from outlierlab.models.load import resolve_bos
    return loaded.bos if protocol.bos == "model" else resolve_bos(protocol.bos, loaded.tokenizer)


def build_windows(protocol, corpus: Corpus, loaded) -> Windows:
    bos = _bos_policy(protocol, loaded)
    body = protocol.seqlen - (1 if bos == "prepend" else 0)
    tokenizer = loaded.tokenizer
    if protocol.sampling == "sequential":
        text, text_sha256 = corpus.joined(protocol.join)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        available = len(ids) // body
        count = available if protocol.windows is None else min(protocol.windows, available)
        if count == 0:
            raise DataError(f"{protocol.name}: the corpus has {len(ids)} tokens, fewer than one window of {body}")
        rows = [ids[i * body:(i + 1) * body] for i in range(count)]
        corpus_tokens = len(ids)
    else:
        rng = random.Random(protocol.seed)
        _, text_sha256 = corpus.joined("\n")
        tokenized: dict[int, list[int]] = {}
        rows = []
        for _ in range(protocol.windows):
            for _attempt in range(100 * len(corpus.documents)):
                index = rng.randint(0, len(corpus.documents) - 1)
                if index not in tokenized:
                    tokenized[index] = tokenizer(corpus.documents[index], add_special_tokens=False)["input_ids"]
                if len(tokenized[index]) > body:
                    break
            else:
                raise DataError(f"{protocol.name}: no document is longer than {body} tokens")
            start = rng.randint(0, len(tokenized[index]) - body - 1)
            rows.append(tokenized[index][start:start + body])
        corpus_tokens = None
    if bos == "prepend":
        rows = [[tokenizer.bos_token_id, *row] for row in rows]
    ids_tensor = torch.tensor(rows, dtype=torch.long)
    meta = {"protocol": protocol.name, "dataset": corpus.name, "split": corpus.split, "sampling": protocol.sampling,
            "seqlen": protocol.seqlen, "windows": len(rows), "bos": bos, "seed": protocol.seed,
            "join": protocol.join, "text_sha256": text_sha256, "corpus_tokens": corpus_tokens,
            "windows_sha256": hashlib.sha256(ids_tensor.numpy().tobytes()).hexdigest(),
            "data": corpus.provenance}
    return Windows(ids=ids_tensor, meta=meta)


def _exp(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(values)


def _resampled_means(window_nll, indices: np.ndarray) -> np.ndarray:
    return np.asarray(window_nll, dtype=np.float64)[indices].mean(axis=1)


def ppl_interval(window_nll: list[float], method: dict = BOOTSTRAP) -> list[float]:
    """[low, high] of exp(mean window NLL) by a seeded percentile bootstrap over windows."""
    return interval(lambda indices: _exp(_resampled_means(window_nll, indices)), len(window_nll), method)


def ratio_interval(window_nll: list[float], baseline_nll: list[float], method: dict = BOOTSTRAP) -> list[float]:
    """[low, high] of PPL / baseline PPL by a paired bootstrap: both resampled at the same windows."""
    if len(window_nll) != len(baseline_nll):
        return [math.nan, math.nan]
    def ratios(indices):
        return _exp(_resampled_means(window_nll, indices) - _resampled_means(baseline_nll, indices))
    return interval(ratios, len(window_nll), method)


@torch.no_grad()
def window_nll_sums(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each window's summed next-token NLL (float64), one window at a time (the log-softmax buffer is one window's)."""
    targets = ids[:, 1:]
    return torch.stack([F.cross_entropy(logits[row, :-1].float(), targets[row], reduction="none").double().sum()
                        for row in range(ids.shape[0])])


def perplexity(model: torch.nn.Module, windows: Windows, batch_size: int = 1, desc: str = "ppl") -> dict:
    """exp(mean NLL of every scored token); inf and NaN are results, not errors.

    Windows go through the model `batch_size` at a time (padding-free: all have seqlen tokens); each window's NLL
    is computed on its own, so the result equals batch 1 to float rounding of the forward (and the log-softmax
    buffer is one window's). `tokens_per_s` counts input tokens (windows x seqlen) over the evaluation's wall time.
    `ppl_ci` is the bootstrap interval over windows (method in `ci_method`)."""
    device = offload.execution_device(model)  # also when the first parameter is offloaded (meta)
    nll_total, scored = 0.0, 0
    window_nll = []
    start = time.perf_counter()
    for batch in tqdm(windows.ids.split(batch_size), desc=desc, leave=False):
        batch = batch.to(device)
        nll = window_nll_sums(model(batch).logits, batch)
        window_nll.extend((nll / (batch.shape[1] - 1)).tolist())
        nll_total += nll.sum().item()
        scored += batch[:, 1:].numel()
    seconds = time.perf_counter() - start
    mean_nll = nll_total / scored
    ppl = math.exp(mean_nll) if mean_nll < 709.0 else (math.nan if math.isnan(mean_nll) else math.inf)
    return {"ppl": ppl, "ppl_ci": ppl_interval(window_nll), "ci_method": BOOTSTRAP, "nll": mean_nll,
            "tokens_scored": scored, "window_nll": window_nll,
            "batch_size": batch_size, "eval_seconds": seconds, "tokens_per_s": windows.ids.numel() / seconds,
            **windows.meta}
