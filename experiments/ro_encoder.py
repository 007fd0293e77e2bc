"""The encoder case of paper RO: BERT Busters (Kovaleva et al. 2021, arXiv 2105.06990) on a post-LN encoder.

An encoder has no LM head, so there is no perplexity: the damage of an edit is measured on what the model is used
for, its sentence embeddings (mean-pooled last hidden states over the tokens, the all-MiniLM-L6-v2 pooling),
against the unedited model's, on exp.sentences (sentences sampled from a local corpus, [CLS]/[SEP] added as the
tokenizer does by default, each run alone: no padding).

1. Gain (and bias) outliers of every LayerNorm (BERT Busters: > sigma standard deviations from the norm's mean,
   both tails, in >= layer_share of the layers; probes/channel_outliers.py), and whether they coincide with the
   channel-wise activation outliers at that norm's output (LLM.int8's |x| >= 6 rule and the relative rule).
2. Per value (exp.values: one, mean, zero = BERT Busters' disabling), the outlier dimensions' gain and beta (with
   exp.bias=false the gain only) reset in every layer, and the same number of random channels per norm for each
   seed of exp.control_seeds: channel
   outliers again, and embedding fidelity: cosine of each sentence's embedding to the original one (mean, 5th
   percentile), the share of sentences whose nearest neighbour in the sample is unchanged, and self-retrieval@1
   (the edited embedding's nearest original embedding is its own). Every edit is undone; the runner checks the hash.
"""
from __future__ import annotations

import hashlib
import random
import re
import statistics

import torch

from outlierlab.errors import ConfigError
from outlierlab.evals.data import check_corpus, load_corpus
from outlierlab.interventions.norm_gamma import ResetNormGamma
from outlierlab.models.load import check_layout
from outlierlab.probes.channel_outliers import (
    ChannelStats,
    channel_outliers,
    channel_points,
    coincidence,
    criteria_from_config,
    gamma_outliers,
    gamma_outliers_record,
)
from outlierlab.tables import Column, Table, columns, std_key

VALUES = ResetNormGamma.VALUES
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def criteria(cfg):
    return criteria_from_config(cfg.exp)


def check(cfg, plan) -> None:
    criteria(cfg)
    exp = cfg.exp
    # the runner's preflight has checked the layout already: check_layout returns its Family from the cache
    family = check_layout(cfg.model, plan.source) if plan.source is not None else None
    if plan.source is not None and (plan.source.kind == "gguf" or (family is not None and not family.encoder)):
        raise ConfigError(f"+exp=ro_encoder needs an encoder (the site table's bert family); model "
                          f"'{cfg.model.name}' is a decoder: use +exp=ro_gamma")
    s = exp.sentences
    for key in ("count", "min_words", "max_tokens"):
        value = s.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"exp.sentences.{key}={value} must be a positive integer")
    if not isinstance(exp.get("bias"), bool):
        raise ConfigError(f"exp.bias={exp.get('bias')} must be true or false")
    if isinstance(s.get("seed"), bool) or not isinstance(s.get("seed"), int):
        raise ConfigError(f"exp.sentences.seed={s.get('seed')} must be an integer")
    check_corpus(s.dataset, s.split, plan.data_dir)
    values = list(exp["values"])
    unknown = [v for v in values if v not in VALUES]
    if not values or unknown:
        raise ConfigError(f"exp.values={values}: {unknown or 'empty'}; use a list of {', '.join(VALUES)}")
    seeds = list(exp.control_seeds)
    if not seeds or not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds):
        raise ConfigError(f"exp.control_seeds={seeds} must be a non-empty list of integers")


def sample_sentences(spec, data_dir) -> tuple[list[str], dict]:
    """`count` sentences of >= min_words words from the corpus (headings dropped), sampled with `seed`."""
    corpus = load_corpus(spec.dataset, spec.split, data_dir)
    pool = []
    for document in corpus.documents:
        text = document.strip()
        if not text or text.startswith("="):  # WikiText headings: " = Title = "
            continue
        pool += [s.strip() for s in _SENTENCE_END.split(text) if len(s.split()) >= spec.min_words]
    if len(pool) < spec.count:
        raise ConfigError(f"exp.sentences: {spec.dataset} {spec.split} has {len(pool)} sentences of >= "
                          f"{spec.min_words} words, fewer than count={spec.count}")
    chosen = random.Random(spec.seed).sample(pool, spec.count)
    meta = {"dataset": spec.dataset, "split": spec.split, "count": spec.count, "min_words": spec.min_words,
            "max_tokens": spec.max_tokens, "seed": spec.seed, "pool": len(pool),
            "sha256": hashlib.sha256("\n".join(chosen).encode("utf-8")).hexdigest(), "corpus": corpus.provenance}
    return chosen, meta


@torch.no_grad()
def embed(loaded, encoded: list[torch.Tensor]) -> torch.Tensor:
    """Mean-pooled last hidden state per sentence (one sentence per forward: no padding), float32 on the CPU."""
    rows = []
    for ids in encoded:
        hidden = loaded.model(ids.to(loaded.device)[None]).last_hidden_state[0]
        rows.append(hidden.float().mean(0).cpu())
    return torch.stack(rows)


def fidelity(edited: torch.Tensor, original: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(edited.double(), original.double(), dim=-1)
    a = torch.nn.functional.normalize(edited.double(), dim=-1)
    b = torch.nn.functional.normalize(original.double(), dim=-1)

    def neighbours(x):
        sims = x @ x.T
        sims.fill_diagonal_(-float("inf"))
        return sims.argmax(-1)
    return {"cos_mean": float(cos.mean()), "cos_p05": float(torch.quantile(cos, 0.05)), "cos_min": float(cos.min()),
            "nn_agree": float((neighbours(a) == neighbours(b)).double().mean()),
            "self_retrieval": float(((a @ b.T).argmax(-1) == torch.arange(len(a))).double().mean())}


def _measure(ctx, interventions, encoded, criterion, original):
    sites = ctx.loaded.sites
    with ctx.edit(interventions) as session:
        with ChannelStats(sites, channel_points(sites), criterion) as stats:
            embeddings = embed(ctx.loaded, encoded)
        edits = list(session.log)
    summary = stats.summary()
    features = {which: channel_outliers(summary, criterion, which) for which in ("absolute", "relative")}
    norm_points = [p for p in summary if ".norm" in p]
    detail = {"interventions": [i.describe() for i in interventions], "edits": edits,
              "channels": {"summary": summary, "features": features},
              "max_abs_x_norm_out": max((summary[p]["max_abs"] for p in norm_points), default=None),
              "int8_features": len(features["absolute"]["hidden"]["features"]),
              "relative_features": len(features["relative"]["hidden"]["features"])}
    detail["fidelity"] = fidelity(embeddings, embeddings if original is None else original)
    return detail, embeddings


def _row(variant: str, details: list[dict]) -> dict:
    """One table row; for a random control the mean over its seeds with their standard deviation (`<key>_sd`) and
    the worst seed's cosine."""
    row = {"variant": variant, "seeds": len(details) if variant.startswith("random") else None,
           "channels_reset": sum(e.get("channels_reset", 0) for e in details[0]["edits"])}
    values = {key: [d[key] for d in details] for key in ("int8_features", "relative_features", "max_abs_x_norm_out")}
    values.update({key: [d["fidelity"][key] for d in details]
                   for key in ("cos_mean", "cos_p05", "nn_agree", "self_retrieval")})
    for key, seen in values.items():
        row[key] = statistics.fmean(seen)
        if len(seen) >= 2:
            row[std_key(key)] = statistics.stdev(seen)
    row["cos_mean_worst"] = min(values["cos_mean"])
    return row


def _encode(ctx) -> tuple[list[torch.Tensor], dict]:
    """exp.sentences tokenized as the tokenizer does by default ([CLS]/[SEP] added), and their provenance."""
    spec = ctx.cfg.exp.sentences
    sentences, data_meta = sample_sentences(spec, ctx.plan.data_dir)
    tokenizer = ctx.loaded.tokenizer
    encoded = [torch.tensor(tokenizer(s, truncation=True, max_length=spec.max_tokens)["input_ids"]) for s in sentences]
    data_meta.update(tokens=sum(len(e) for e in encoded), special_tokens="tokenizer default (add_special_tokens)")
    return encoded, data_meta


def _variants(ctx, encoded, outlier, gamma_rule) -> tuple[dict, list[dict]]:
    """The original, then per exp.values the outlier reset and its random controls: (details, table rows)."""
    exp = ctx.cfg.exp
    original, base = _measure(ctx, [], encoded, outlier, None)
    details, rows = {"original": original}, [_row("original", [original])]
    reset = {"channels": "consistent", "tail": "both", "bias": exp.bias, "sigma": gamma_rule.sigma}
    for value in exp["values"]:
        details[f"reset_{value}"], _ = _measure(ctx, [ResetNormGamma(value=value, **reset)], encoded, outlier, base)
        rows.append(_row(f"reset_{value}", [details[f"reset_{value}"]]))
        controls = [_measure(ctx, [ResetNormGamma(value=value, control="random", seed=seed, **reset)], encoded,
                             outlier, base)[0] for seed in exp.control_seeds]
        details[f"random_{value}"] = {"seeds": list(exp.control_seeds), "per_seed": controls}
        rows.append(_row(f"random_{value}", controls))
    return details, rows


SHOWN = columns("variant", Column("seeds", "seeds", fmt="d"), Column("channels_reset", "channels reset", fmt="d"),
                Column("int8_features", "int8 features", fmt="g"),
                Column("relative_features", "relative features", fmt="g"),
                ("max_abs_x_norm_out", "max |x| LN out"), Column("cos_mean", "cos mean", fmt=".4f"),
                Column("cos_mean_worst", "cos mean, worst seed", fmt=".4f"), Column("cos_p05", "cos p05", fmt=".4f"),
                Column("nn_agree", "NN unchanged", fmt=".3f"), Column("self_retrieval", "self-retrieval@1", fmt=".3f"))


def _caption(ctx, gammas, outlier, gamma_rule, data_meta) -> str:
    exp = ctx.cfg.exp
    consistent = {role: found["consistent"] for role, found in gammas.items()}
    both = {role: found["gain_and_bias"] for role, found in gammas.items()}
    return (f"{ctx.cfg.model.name} (encoder, post-LN): BERT Busters' outlier dimensions (LayerNorm gain > "
            f"{gamma_rule.sigma:g} sigma from its mean, both tails, in >= {gamma_rule.layer_share:.0%} of the "
            f"layers): " + "; ".join(f"{role} {chs} (also beta: {both[role]})" for role, chs in consistent.items())
            + f". reset_<value>: their gain{' and beta' if exp.bias else ' (beta kept)'} set to 1"
            f"{' and 0' if exp.bias else ''} (one), to the other channels' mean (mean) or to 0"
            f"{' and 0' if exp.bias else ''} (zero: BERT Busters' disabling), in every layer; random_<value>: as "
            f"many random channels "
            f"per norm, mean ± standard deviation over {len(exp.control_seeds)} seeds. int8 / relative features: hidden-size channels "
            f"with |x| >= {outlier.min_abs:g} (or >= {outlier.median_ratio:g} x the token's median |x|) at >= "
            f"{outlier.position_share:.0%} of positions in >= {outlier.layer_share:.0%} of the layers, over every "
            f"LN output and linear input. Embedding fidelity vs the unedited model on {data_meta['count']} "
            f"{data_meta['dataset']} {data_meta['split']} sentences ({data_meta['tokens']} tokens): cosine of the "
            f"mean-pooled embeddings; NN unchanged: share whose nearest neighbour in the sample is the same; "
            f"self-retrieval@1: the edited embedding's nearest original one is its own.")


def _norm_weights(sites) -> dict:
    """Every norm's gain (the family's reading) and bias, rounded to 6 decimals."""
    def rounded(tensor):
        return [round(v, 6) for v in tensor.tolist()]
    def bias(norm):
        module = sites.module(norm)
        return None if module.bias is None else rounded(module.bias.detach().float())
    return {norm: {"gain": rounded(sites.norm_gain(norm)), "bias": bias(norm)} for norm in sites.all_norms()}


def run(ctx) -> dict:
    exp, sites = ctx.cfg.exp, ctx.loaded.sites
    outlier, gamma_rule = criteria(ctx.cfg)
    encoded, data_meta = _encode(ctx)
    gammas = gamma_outliers(sites, gamma_rule, tail="both")
    details, rows = _variants(ctx, encoded, outlier, gamma_rule)
    summary, features = details["original"]["channels"]["summary"], details["original"]["channels"]["features"]
    overlap = {which: coincidence(gammas, summary, which) for which in ("absolute", "relative")}
    features_at = {which: {kind: found["features"] for kind, found in features[which].items()}
                   for which in ("absolute", "relative")}
    return {"reset_bias": exp.bias,
            "gamma_outliers": gamma_outliers_record(gammas, gamma_rule, sites.family.norm_gain_offset, tail="both"),
            "norm_weights": _norm_weights(sites),
            "activation_features": features_at, "coincidence": overlap["absolute"],
            "coincidence_relative": overlap["relative"], "criterion": vars(outlier), "sentences": data_meta,
            "pooling": "mean over tokens ([CLS] and [SEP] included), one sentence per forward",
            "variants": details,
            "table": Table(SHOWN, rows, index="variant", caption=_caption(ctx, gammas, outlier, gamma_rule,
                                                                          data_meta)).to_dict()}
