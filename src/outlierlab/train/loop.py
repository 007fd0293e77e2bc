"""The pretraining loop: AdamW, linear warm-up then cosine decay, bf16 autocast on GPU, optional torch.compile,
periodic validation loss and massive-activation statistics, HF-format checkpoints that resume exactly.

A checkpoint directory is a Hugging Face model directory (config.json, model.safetensors, tokenizer files,
outlierlab.json) plus `trainer_state.pt` (step, optimizer, scheduler, RNG states, history). Batches are drawn from a
generator seeded by (seed, step), so a resumed run sees the same batches as an uninterrupted one and continues the
same loss curve.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from outlierlab.models.sites import Sites
from outlierlab.probes.stats import ResidualStats
from outlierlab.train.data import TokenStreams, sample_batch
from outlierlab.train.modeling import save_pretrained

STATE_FILE = "trainer_state.pt"
CHECKPOINT = "checkpoint"  # <output_dir>/checkpoint: the latest resumable state; <output_dir> itself: the final model


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR factor: linear from 1/warmup to 1 over `warmup_steps`, then cosine down to `min_ratio` at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def make_optimizer(model: torch.nn.Module, settings) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, the k'/v' biases or gate biases), the usual GPT recipe."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, fused=fused)


def norm_gammas(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every RMSNorm gain (pre-attention, pre-MLP, final) of a Llama-layout model."""
    sites = Sites(model)
    gammas = [sites.module(f"layers.{i}.{norm}").weight for i in range(sites.num_layers) for norm in ("norm1", "norm2")]
    return [*gammas, sites.module("final_norm").weight]


def l1_gamma_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Paper RO's regulariser: sum over norms of mean |gamma| (pushes norm gains, where channel outliers start,
    towards small sparse values)."""
    return sum(gamma.abs().mean() for gamma in norm_gammas(model))


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _autocast(device: torch.device, precision: str):
    enabled = device.type == "cuda" and precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, precision: str = "fp32", top_k: int = 8) -> dict:
    """Validation loss and the layer-wise residual-stream statistics (paper MA's top-k and median |h|)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with ResidualStats(Sites(model), k=top_k) as residual:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            residual.observe(batch)
            with _autocast(device, precision):
                logits = model(batch).logits
            loss = next_token_loss(logits, batch)
            nll += float(loss) * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
    model.train(was_training)
    layers = residual.summary()
    return {"val_loss": nll / count, "max_abs": [layer["top"][0]["abs"] for layer in layers],
            "mean_top1": [layer["mean_topk"][0] for layer in layers],
            "mean_median": [layer["mean_median"] for layer in layers],
            "peak": max((layer["top"][0] | {"layer": layer["layer"]} for layer in layers), key=lambda e: e["abs"])}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def write_swapped(directory: Path, write) -> None:
    """`write(staging)` fills a directory beside `directory`, which then replaces it: an interrupted save never
    leaves half a checkpoint."""
    directory = Path(directory)
    staging = directory.with_name(directory.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(directory: Path, model, tokenizer, metadata: dict, state: dict) -> None:
    """The whole checkpoint (HF directory + trainer state), written beside the old one, then swapped in."""
    def write(staging: Path) -> None:
        save_pretrained(model, tokenizer, staging, metadata)
        torch.save(state, staging / STATE_FILE)
    write_swapped(directory, write)


def load_checkpoint(directory: Path, model) -> dict:
    """Load the weights of a checkpoint into `model` (tied LM head allowed) and return its trainer state."""
    weights = load_file(Path(directory) / "model.safetensors", device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    return torch.load(Path(directory) / STATE_FILE, weights_only=False)


def _resume(checkpoint: Path, model, optimizer, scheduler) -> dict:
    """Load the checkpoint's weights, optimizer, scheduler and RNG state; returns the state (step, history)."""
    state = load_checkpoint(checkpoint, model)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def _optimizer_step(model, forward, optimizer, scheduler, batch: torch.Tensor, settings, l1_weight: float) -> dict:
    """One step on `batch`; its log entry: loss, lr, grad norm (and the L1 gamma penalty when it is on)."""
    with _autocast(batch.device, settings.precision):
        loss = next_token_loss(forward(batch, use_cache=False).logits, batch)
    total = loss + l1_weight * l1_gamma_penalty(model) if l1_weight else loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    scheduler.step()
    entry = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
    if l1_weight:
        with torch.no_grad():
            entry["l1_gamma"] = float(l1_gamma_penalty(model))
    return entry


def train(model, streams: TokenStreams, tokenizer, settings, output_dir: Path, metadata: dict,
          val_windows: torch.Tensor, prefix: int | None, resume: bool = True, stop_at: int | None = None) -> dict:
    """Train `model` up to settings.steps steps; returns the history and where the model was saved.

    `stop_at`: end this call after that step with a checkpoint (a time-limited job; the next call resumes)."""
    output_dir = Path(output_dir)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(settings.warmup_steps, settings.steps, settings.min_lr_ratio))
    checkpoint = output_dir / CHECKPOINT
    step, history, resumed_from = 0, [], None
    if resume and (checkpoint / STATE_FILE).is_file():
        state = _resume(checkpoint, model, optimizer, scheduler)
        step, history, resumed_from = state["step"], state["history"], state["step"]
    compile_on = settings.compile == "on" or (settings.compile == "auto" and device.type == "cuda")
    forward = torch.compile(model) if compile_on else model
    l1_weight = float(settings.l1_gamma)

    def state_now() -> dict:
        return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "history": history}

    model.train()
    started, tokens = time.time(), 0
    progress = tqdm(total=settings.steps, initial=step, desc=f"pretrain {metadata.get('variant', '')}")
    last = settings.steps if stop_at is None else min(stop_at, settings.steps)
    while step < last:
        batch = sample_batch(streams.train, settings.batch_size, settings.seqlen, settings.seed, step, prefix)
        batch = batch.to(device, non_blocking=True)
        entry = {"step": step + 1, **_optimizer_step(model, forward, optimizer, scheduler, batch, settings, l1_weight)}
        step += 1
        tokens += batch.numel()
        if step % settings.eval_every == 0 or step == settings.steps:
            entry.update(evaluate(model, val_windows, settings.eval_batch_size, settings.precision))
        history.append(entry)
        progress.update(1)
        progress.set_postfix(loss=f"{entry['loss']:.3f}", val=entry.get("val_loss", ""))
        if step % settings.checkpoint_every == 0 or step == last:
            save_checkpoint(checkpoint, model, tokenizer, {**metadata, "step": step}, state_now())
    progress.close()
    elapsed = time.time() - started
    if step == settings.steps:
        save_pretrained(model, tokenizer, output_dir, {**metadata, "step": step})
    return {"history": history, "output_dir": str(output_dir), "checkpoint": str(checkpoint), "steps": step,
            "resumed_from": resumed_from, "train_seconds": round(elapsed, 2),
            "tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 and tokens else None}
