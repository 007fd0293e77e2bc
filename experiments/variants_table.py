"""Which attention variants grow massive activations, and how well they quantize (papers MA, QT, RO).

For each variant trained by +exp=pretrain at one size preset:
1. load its checkpoint as a user would (model.source=<checkpoint dir>), with the BOS policy it was trained with;
2. one pass over the held-out validation windows: validation loss, layer-wise residual top-k / median (paper MA),
   attention-output max |x| and kurtosis (paper QT);
3. the same windows under simulated W8A8 (RTN of linear weights and inputs, exp.w8a8's protocol), undone afterwards;
4. one row per variant, paper QT Table 2 (OPT-125m) beside ours.
"""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from outlierlab.errors import ConfigError
from outlierlab.evals.ppl import ppl_interval, ratio_interval
from outlierlab.interventions.base import EditSession
from outlierlab.interventions.fake_quant import W8A8
from outlierlab.models.hashing import weights_sha256
from outlierlab.models.load import load_model
from outlierlab.tables import Column, Reference, Table, columns
from outlierlab.train.analysis import classify_massive, measure, validation_window_nll
from outlierlab.train.data import SINK, prepare, validation_windows
from outlierlab.train.modeling import read_metadata


def _directory(cfg, variant: str) -> Path:
    return Path(str(cfg.exp.checkpoints)).expanduser() / variant


def check(cfg, plan) -> None:
    variants = list(cfg.exp.train_variants or [])
    if not variants:
        raise ConfigError("exp.train_variants is empty: name at least one trained variant")
    missing = [v for v in variants if not (_directory(cfg, v) / "config.json").is_file()]
    if missing:
        raise ConfigError(f"exp.train_variants: no trained model for {', '.join(missing)} in {cfg.exp.checkpoints} "
                          f"(train it: python run.py +exp=pretrain train/size={cfg.train.size.name} "
                          f"train/variant={missing[0]})")
    W8A8(**cfg.exp.w8a8)  # validates the bit widths


def _variant(cfg, variant: str, streams) -> tuple[dict, dict]:
    """One trained checkpoint: FP and W8A8 validation loss, attention-output outliers, massive activations ->
    (table row, detail)."""
    exp, size = cfg.exp, cfg.train.size
    directory = _directory(cfg, variant)
    metadata = read_metadata(directory)
    model_cfg = OmegaConf.merge(cfg.model, {"name": f"{size.name}_{variant}", "source": str(directory),
                                            "bos": metadata.get("bos", "none")})
    loaded = load_model(model_cfg, cfg.paths.cache_dir)
    prefix = loaded.tokenizer.convert_tokens_to_ids(SINK) if model_cfg.bos == "prepend" else None
    windows = validation_windows(streams.val, size.seqlen, exp.val_windows, prefix)
    fp = measure(loaded, windows, exp.batch_size, exp.top_k)
    before = weights_sha256(loaded.model)
    with EditSession(loaded) as session:
        session.apply([W8A8(**exp.w8a8)])
        w8a8_nll = validation_window_nll(loaded.model, windows, exp.batch_size, desc=f"{variant} w8a8")
        w8a8_loss = sum(w8a8_nll) / len(w8a8_nll)  # windows of one length: the token mean
        edits = list(session.log)
    restored = weights_sha256(loaded.model) == before
    massive = classify_massive(fp["residual"], exp.massive.abs_min, exp.massive.ratio_min)
    attention = fp["attention_output"]
    row = {"variant": variant, "val_loss": fp["val_loss"], "fp_ppl": math.exp(fp["val_loss"]),
           "w8a8_ppl": math.exp(w8a8_loss), "max_inf_norm": attention["max_inf_norm"],
           "avg_kurtosis": attention["avg_kurtosis"], "max_abs_h": massive["max_abs"], "layer": massive["layer"],
           "top1_over_median": massive["ratio_to_median"], "peak": massive["kind"],
           "massive": "yes" if massive["massive"] else "no"}
    row["w8a8_over_fp"] = row["w8a8_ppl"] / row["fp_ppl"]
    # intervals over the validation windows: each PPL's bootstrap, W8A8 / FP paired over the same windows
    row.update({"fp_ppl_ci": ppl_interval(fp["window_nll"]), "w8a8_ppl_ci": ppl_interval(w8a8_nll),
                "w8a8_over_fp_ci": ratio_interval(w8a8_nll, fp["window_nll"])})
    detail = {"checkpoint": str(directory), "training": metadata, "model": loaded.info,
              "bos": model_cfg.bos, "windows": list(windows.shape), **fp, "massive": massive,
              "w8a8": {"val_loss": w8a8_loss, "edits": edits, "weights_restored": restored}}
    return row, detail


SHOWN = columns("variant", ("val_loss", "val loss"), ("fp_ppl", "FP ppl"), ("w8a8_ppl", "W8A8 ppl"),
                ("w8a8_over_fp", "W8A8 / FP"), ("max_inf_norm", "max inf-norm"), ("avg_kurtosis", "avg kurtosis"),
                ("max_abs_h", "max abs(h)"), "layer", ("top1_over_median", "top1/median"), "peak", "massive",
                *(Column(key, f"paper {label}", reference=True) for key, label in (
                    ("fp_ppl", "FP ppl"), ("max_inf_norm", "inf-norm"), ("avg_kurtosis", "kurtosis"),
                    ("w8a8_ppl", "W8A8 ppl"))))


def run(ctx) -> dict:
    cfg = ctx.cfg
    exp, size = cfg.exp, cfg.train.size
    streams = prepare(size.data, ctx.plan.data_dir, cfg.paths.cache_dir)
    reference = OmegaConf.to_container(exp.reference)
    rows, details = [], {}
    for variant in exp.train_variants:
        row, details[variant] = _variant(cfg, variant, streams)
        rows.append(row)
    paper = Reference(source=reference["source"], values={v: reference["values"][v] for v in details
                                                          if v in reference["values"]}, model=reference.get("model"))
    steps = {v: d["training"].get("step") for v, d in details.items()}
    devices = sorted({str(d["training"].get("device_name")) for d in details.values()})
    caption = (f"{size.name} preset ({', '.join(devices)}; steps {sorted(set(steps.values()))}), "
               f"{exp.val_windows} held-out windows x {size.seqlen} tokens. inf-norm and kurtosis: attention "
               f"outputs (after o_proj); max |h|: residual stream, peak layer; massive: |h| > {exp.massive.abs_min} "
               f"and >= {exp.massive.ratio_min}x median (paper MA). W8A8: symmetric RTN, "
               f"{W8A8(**exp.w8a8).protocol}. Paper columns: "
               f"{reference['source']} - a different model, data and scale.")
    model = {"name": cfg.model.name, "kind": "trained checkpoints", "dtype": "float32",
             "checkpoints": str(exp.checkpoints), "variants": list(details)}
    return {"model": model, "variants": details, "reference": reference,
            "table": Table(SHOWN, rows, index="variant", reference=paper, caption=caption).to_dict()}
