"""Paper SW Fig. 7: plain RTN vs SW-aware RTN of the weights, across block sizes and bit widths.

1. Find the super weights (detected or from the model YAML), as in prune_sw.
2. Score the float model once.
3. For every bits x block x method of the exp config: quantize the original weights, score, undo.
4. One row per (bits, block), one column per method and protocol, quantization error beside the scores.
"""
from __future__ import annotations

import hydra
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from outlierlab.quant.rtn import spec_from_label
from outlierlab.studies.super_weights import SuperWeightChoice
from outlierlab.studies.variants import percent
from outlierlab.tables import Column, Table


def sweep(exp) -> list[tuple[int, str, str, object]]:
    """[(bits, block, method, QuantizeWeights)] in the config's order; ValueError names the bad key."""
    if not exp.get("methods"):
        raise ValueError("exp.methods is empty: give at least one weight quantizer (e.g. rtn, sw_aware)")
    runs = []
    for bits in exp.bits:
        for block in exp.blocks:
            try:
                spec_from_label(block, bits)
            except ValueError as error:
                raise ValueError(f"exp.bits/exp.blocks: {error}") from None
            for method, spec in exp.methods.items():
                try:
                    quantizer = hydra.utils.instantiate(spec, bits=bits, block=str(block))
                except (InstantiationException, ValueError, TypeError) as error:
                    cause = error.__cause__ or error
                    raise ValueError(f"exp.methods.{method}: {str(cause).splitlines()[0]}") from None
                runs.append((int(bits), str(block), method, quantizer))
    return runs


def check(cfg, plan) -> None:
    """Before any weights load (called by the runner's preflight)."""
    sweep(cfg.exp)


def _scores(ctx, label: str) -> dict:
    ppl = ctx.perplexities(label=label)
    zeroshot = ctx.zeroshot(label=label)
    scores = {key: result["ppl"] for key, result in ppl.items()}
    if zeroshot:
        scores["zeroshot_mean"] = percent(zeroshot["mean"])
    return {"scores": scores, "ppl": ppl, "zeroshot": zeroshot}


def run(ctx) -> dict:
    exp = ctx.cfg.exp
    weights = SuperWeightChoice.of(ctx)

    original = _scores(ctx, "original")
    runs = []
    for bits, block, method, quantizer in tqdm(sweep(exp), desc="quantized variants"):
        with ctx.edit([quantizer], weights.context) as session:
            scored = _scores(ctx, f"int{bits} {block} {method}")
            edit = session.log[-1]
        runs.append({"bits": bits, "block": block, "method": method, "quantizer": quantizer.describe(),
                     "summary": edit["summary"], "restored_super_weights": edit["restored_super_weights"],
                     "tensors": edit["tensors"], **scored})

    metrics = list(original["scores"])
    methods = list(exp.methods)
    rows = [{"bits": "float", "block": "-", **{f"{m}_{k}": original["scores"][k] for m in methods for k in metrics}}]
    for bits in exp.bits:
        for block in map(str, exp.blocks):
            row = {"bits": f"INT{bits}", "block": block}
            for entry in runs:
                if entry["bits"] == bits and entry["block"] == block:
                    for key in metrics:
                        row[f"{entry['method']}_{key}"] = entry["scores"][key]
                    row[f"{entry['method']}_rel_error"] = entry["summary"]["mean_relative_error"]
            rows.append(row)
    columns = [Column("bits", "bits"), Column("block", "block"),
               *[Column(f"{m}_{k}", f"{m} {k}") for k in metrics for m in methods],
               *[Column(f"{m}_rel_error", f"{m} rel. error") for m in methods]]
    caption = (f"Weight-only RTN of every decoder-block linear ({ctx.cfg.eval.name} protocols); rel. error = mean over "
               f"tensors of ||W^-W||/||W||; super weights {weights.describe()}")
    if ctx.loaded.info.get("kind") == "gguf":
        caption += "; the float weights are themselves dequantized GGUF blocks"
    return {
        **weights.record(),
        "original": original,
        "runs": runs,
        "methods": {name: OmegaConf.to_container(spec) for name, spec in exp.methods.items()},
        "reference": OmegaConf.to_container(exp.reference) if exp.get("reference") else None,
        "table": Table(columns, rows, index=["bits", "block"], caption=caption).to_dict(),
    }
