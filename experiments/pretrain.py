"""Pretrain one small Llama-style model with one attention variant (issue: which variants grow massive activations).

1. Data: the corpus (local Wikipedia sample by default), a BPE tokenizer trained on it, train/val token streams
   (all cached under paths.cache_dir).
2. Model: OutlierLlamaForCausalLM with the variant's attention (conf/train/variant: vanilla, kv_bias, softpick, ...)
   or norm (ssnorm); the sink variant starts every window with <|sink|>; the l1_gamma variant adds paper RO's L1
   term to the loss.
3. Train (AdamW, warm-up + cosine), validating and recording residual-stream statistics every eval_every steps;
   HF-format checkpoints, resumed when present. The final model is saved at train.output_dir, loadable with
   `model=trained model.source=<train.output_dir>`.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from outlierlab.errors import ConfigError
from outlierlab.tables import Table, columns
from outlierlab.models.outlier_llama import NORMS
from outlierlab.models.variant_attention import ATTENTION_VARIANTS
from outlierlab.train.data import (
    SINK,
    check_data,
    prepare,
    validation_windows,
    with_sink,
)
from outlierlab.train.loop import train
from outlierlab.train.modeling import build_model, resume_training


def check(cfg, plan) -> None:
    """Pre-flight (before any data is read or model built)."""
    size, variant = cfg.train.size, cfg.train.variant
    attention = variant.attention.attention_variant
    if attention not in ATTENTION_VARIANTS:
        raise ConfigError(f"train.variant.attention.attention_variant={attention} is not one of: "
                          f"{', '.join(ATTENTION_VARIANTS)}")
    norm = variant.attention.get("norm", "rmsnorm")
    if norm not in NORMS:
        raise ConfigError(f"train.variant.attention.norm={norm} is not one of: {', '.join(NORMS)}")
    for key in ("steps", "batch_size", "seqlen", "eval_every", "checkpoint_every", "val_windows", "eval_batch_size"):
        value = size[key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.size.{key}={value} must be a positive integer")
    if size.seqlen > size.architecture.max_position_embeddings:
        raise ConfigError(f"train.size.seqlen={size.seqlen} exceeds architecture.max_position_embeddings="
                          f"{size.architecture.max_position_embeddings}")
    if size.warmup_steps >= size.steps:
        raise ConfigError(f"train.size.warmup_steps={size.warmup_steps} must be smaller than steps={size.steps}")
    if size.precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.size.precision={size.precision} is not one of: bf16, fp32")
    if size.compile not in ("auto", "on", "off"):
        raise ConfigError(f"train.size.compile={size.compile} is not one of: auto, on, off")
    if variant.l1_gamma < 0:
        raise ConfigError(f"train.variant.l1_gamma={variant.l1_gamma} must be >= 0")
    check_data(size.data, plan.data_dir)


def run(ctx) -> dict:
    cfg = ctx.cfg
    size, variant = cfg.train.size, cfg.train.variant
    streams = prepare(size.data, ctx.plan.data_dir, cfg.paths.cache_dir)
    tokenizer = with_sink(streams.tokenizer) if variant.sink_token else streams.tokenizer
    prefix = tokenizer.convert_tokens_to_ids(SINK) if variant.sink_token else None

    model = build_model(OmegaConf.to_container(size.architecture), OmegaConf.to_container(variant.attention),
                        tokenizer, seed=cfg.exp.seed)
    device = "cuda" if torch.cuda.is_available() and cfg.model.device in ("auto", "cuda") else "cpu"
    model = model.to(device)
    val = validation_windows(streams.val, size.seqlen, size.val_windows, prefix)
    metadata = {"variant": variant.name, "size": size.name, "bos": "prepend" if variant.sink_token else "none",
                "attention": OmegaConf.to_container(variant.attention), "sink_token": bool(variant.sink_token),
                "l1_gamma": float(variant.l1_gamma), "seed": cfg.exp.seed, "device": device,
                "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "data": streams.meta}
    settings = OmegaConf.create({**OmegaConf.to_container(size), "seed": cfg.exp.seed, "l1_gamma": variant.l1_gamma})
    outcome = train(model, streams, tokenizer, settings, cfg.train.output_dir, metadata, val, prefix,
                    resume=resume_training(cfg.train.output_dir, cfg.exp.resume, cfg.get("overwrite", False)))

    history = outcome["history"]
    evaluations = [entry for entry in history if "val_loss" in entry]
    rows = [{"step": e["step"], "train_loss": e["loss"], "val_loss": e["val_loss"],
             "max_abs_h": e["peak"]["abs"], "at_layer": e["peak"]["layer"], "position": e["peak"]["position"],
             "channel": e["peak"]["channel"]} for e in evaluations]
    parameters = sum(p.numel() for p in model.parameters())
    caption = (f"{variant.name} ({size.name}: {parameters / 1e6:.2f}M parameters, {size.steps} steps x "
               f"{size.batch_size} x {size.seqlen} tokens) on {metadata['device_name']}; "
               f"model saved to {outcome['output_dir']}")
    return {
        "model": {"name": cfg.model.name, "source": outcome["output_dir"], "kind": "trained",
                  "dtype": "float32", "device": device, "num_parameters": parameters, **metadata},
        "training": {k: v for k, v in outcome.items() if k != "history"},
        "history": history,
        "table": Table(columns("step", ("train_loss", "train loss"), ("val_loss", "val loss"), ("max_abs_h", "max abs(h)"),
                               ("at_layer", "at layer"), "position", "channel"), rows, index="step",
                       caption=caption).to_dict(),
    }
