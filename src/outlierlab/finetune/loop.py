"""The fine-tuning loop: one optimizer (AdamW, warm-up + cosine, gradient clipping) for every method, resumable.

A checkpoint (`<output_dir>/checkpoint/`) holds the tensors the optimizer trains (LoRA: the adapters) plus
`trainer_state.pt` (step, optimizer, scheduler, RNG, history). Batches come from the task's `batch(step)`, which is
seeded by (seed, step), and LISA's layer schedule is fixed by the seed up front, so a resumed run continues the same
loss curve.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from outlierlab.train.loop import warmup_cosine, write_swapped

STATE_FILE = "trainer_state.pt"
TENSORS_FILE = "trainable.pt"


def masked_loss(logits: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the target positions loss_mask[:, 1:] marks."""
    targets = ids[:, 1:].reshape(-1)
    keep = loss_mask[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat[keep], targets[keep])


def _save(directory: Path, selection, state: dict) -> None:
    def write(staging: Path) -> None:
        staging.mkdir(parents=True)
        torch.save({n: p.detach().clone() for n, p in selection.params.items()}, staging / TENSORS_FILE)
        torch.save(state, staging / STATE_FILE)
    write_swapped(directory, write)


def _load(directory: Path, selection) -> dict:
    tensors = torch.load(directory / TENSORS_FILE, weights_only=True)
    if set(tensors) != set(selection.params):
        raise RuntimeError(f"checkpoint {directory} holds other parameters than method {selection.method} trains")
    with torch.no_grad():
        for name, tensor in tensors.items():
            selection.params[name].data.copy_(tensor)
    return torch.load(directory / STATE_FILE, weights_only=False)


def make_optimizer(selection, settings) -> torch.optim.Optimizer:
    """AdamW (weight decay on the matrices only); with selection.galore (OwLore), the GaLore-projected AdamW of
    finetune/galore.py, whose projected group is selection.galore["names"] and whose other groups are plain AdamW."""
    params = selection.params
    galore = selection.galore
    projected = set(galore["names"]) if galore else set()
    decay = [p for n, p in params.items() if p.dim() >= 2 and n not in projected]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if not galore:
        return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps)
    from outlierlab.finetune.galore import GaLoreAdamW
    groups.append({"params": [params[n] for n in galore["names"]], "weight_decay": settings.weight_decay,
                   "rank": int(galore["rank"]), "update_gap": int(galore["update_gap"]),
                   "scale": float(galore["scale"])})
    return GaLoreAdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps)


def finetune(selection, batch, settings, checkpoint: Path, resume: bool = True, stop_at: int | None = None,
             desc: str = "finetune") -> dict:
    """Train the selection for settings.steps steps; `batch(step)` -> (ids, attention_mask, loss_mask)."""
    checkpoint = Path(checkpoint)
    params = selection.params
    optimizer = make_optimizer(selection, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(settings.warmup_steps, settings.steps, settings.min_lr_ratio))
    step, history, resumed_from = 0, [], None
    if resume and (checkpoint / STATE_FILE).is_file():
        state = _load(checkpoint, selection)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, history, resumed_from = state["step"], state["history"], state["step"]
    selection.prepare()
    model = selection.model
    device = next(iter(params.values())).device
    last = settings.steps if stop_at is None else min(stop_at, settings.steps)
    model.train()
    started, tokens = time.time(), 0
    progress = tqdm(total=settings.steps, initial=step, desc=desc)
    try:
        while step < last:
            selection.activate(step)
            ids, attention, loss_mask = (t.to(device) for t in batch(step))
            loss = masked_loss(model(input_ids=ids, attention_mask=attention).logits, ids, loss_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            active = [p for p in params.values() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(active, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            selection.enforce()
            step += 1
            tokens += int(attention.sum())
            history.append({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                            "grad_norm": float(grad_norm),
                            "trainable": sum(p.numel() for p in active)})
            progress.update(1)
            progress.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            if step % settings.checkpoint_every == 0 or step == last:
                _save(checkpoint, selection, {"step": step, "optimizer": optimizer.state_dict(),
                                              "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                                              "history": history})
    finally:
        progress.close()
        selection.release()
        model.eval()
        for param in params.values():
            param.requires_grad_(False)
    elapsed = time.time() - started
    return {"history": history, "steps": step, "resumed_from": resumed_from, "checkpoint": str(checkpoint),
            "train_seconds": round(elapsed, 2), "tokens_this_call": tokens,
            "tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 and tokens else None}
