"""Paper SW Fig. 5: pruning the super weight shifts next-token probability towards stopwords.

1. Find the super weights (detection always runs; `exp.super_weights` picks detected or registry ones).
2. Each window's mean next-token distribution over the windows of the eval protocol `exp.protocol`, original and
   pruned.
3. The tokens that gain (and lose) the most mean probability, each marked stopword or not; the stopwords' total
   probability mass before and after; every gain, ratio and mass with its paired bootstrap interval over windows.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from outlierlab.evals.stopwords import probability_shift, window_next_token_probs
from outlierlab.studies.super_weights import SuperWeightChoice
from outlierlab.tables import Table, columns


def check(cfg, plan) -> None:
    protocols = list(cfg.eval.get("ppl") or {})
    if cfg.exp.protocol not in protocols:
        raise ValueError(f"exp.protocol={cfg.exp.protocol} is not a protocol of eval={cfg.eval.name} "
                         f"(it has: {', '.join(protocols) or 'none'})")
    if set(cfg.exp.variants) != {"original", "prune_sw"}:
        raise ValueError(f"exp.variants must be exactly original and prune_sw (got: {', '.join(cfg.exp.variants)})")
    if not isinstance(cfg.exp.top, int) or cfg.exp.top < 1:
        raise ValueError(f"exp.top={cfg.exp.top} must be a positive integer")


def _interval(entry: dict, key: str, spec: str, value: bool = True) -> str:
    low, high = entry[f"{key}_ci"]
    return (f"{entry[key]:{spec}} " if value else "") + f"[{low:{spec}}, {high:{spec}}]"


def run(ctx) -> dict:
    cfg = ctx.cfg.exp
    weights = SuperWeightChoice.of(ctx)
    if not weights.chosen:
        return {**weights.record(),
                "table": Table(columns("note"), [{"note": "skipped: no super weight"}]).to_dict()}

    windows = ctx.windows(cfg.protocol)
    batch_size = ctx.cfg.eval.ppl[cfg.protocol].batch_size
    probs = {}
    for variant, names in cfg.variants.items():
        with ctx.edit(list(names), weights.context):
            probs[variant] = window_next_token_probs(ctx.loaded.model, windows, batch_size, desc=f"{variant} probs")
    shift = probability_shift(ctx.loaded.tokenizer, probs["original"], probs["prune_sw"], cfg.stopwords, cfg.top,
                              focus=list(cfg.focus))

    rows = [{"token": repr(entry["text"]), "stopword": "yes" if entry["stopword"] else "", "p_original":
             entry["p_before"], "p_pruned": entry["p_after"], "gain": entry["gain"], "gain_ci": entry["gain_ci"],
             "x_original": entry["ratio"], "x_original_ci": entry["ratio_ci"]}
            for entry in shift["gainers"]]
    caption = (f"tokens gaining the most mean next-token probability when the super weights {weights.origin} "
               f"({', '.join(map(str, weights.chosen))}) are zeroed; {windows.meta['windows']} windows of "
               f"{windows.meta['seqlen']} tokens of {windows.meta['dataset']} {windows.meta['split']}; intervals: "
               f"paired bootstrap over the windows; stopword mass {shift['stopword_mass_before']:.3f} -> "
               f"{shift['stopword_mass_after']:.3f} (gain {_interval(shift, 'stopword_mass_gain', '.3f')}); "
               f"{100 * shift['stopword_share_of_top_gainers']:.0f}% of the top {cfg.top} gainers are stopwords "
               f"({_interval(shift, 'stopword_share_of_top_gainers', '.0%', value=False)}); "
               + ", ".join(f"{word!r} x{_interval(entry, 'ratio', '.2f')}" for word, entry in shift["focus"].items()))
    return {
        **weights.record(),
        "stopwords": {"name": cfg.stopwords.name, "provenance": cfg.stopwords.provenance},
        "shift": shift,
        "paper_reference": OmegaConf.to_container(cfg.reference) if cfg.get("reference") else None,
        "table": Table(columns("token", "stopword", ("p_original", "p original"), ("p_pruned", "p pruned"), "gain",
                               ("x_original", "x original")), rows, index="token", caption=caption).to_dict(),
    }
