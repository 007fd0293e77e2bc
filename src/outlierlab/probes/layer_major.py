"""Observe-only passes over many windows, window-major (one forward per batch) or layer-major (each block once).

With offloaded weights (models/offload.py) a forward per batch reads every offloaded block from its store once per
batch. Layer-major reads block i once per pass: every batch's hidden state goes through block i, the hidden states
(windows x seqlen x d) are kept, and the block is dropped before block i + 1 (the Super Experts code streams
DeepSeek-R1 the same way). Probes keep working unchanged: they hook Sites points inside the blocks, and each block
still runs on each batch, only in another order; `before(batch)` (a probe's `observe`) is called before every
batch's block, so a probe that labels the current batch sees the right one.

What a block needs besides its hidden state (position embeddings, attention masks, per-layer masks of sliding and
global attention) is captured from the model's own forward, in which every block is replaced by a recorder: only
the embedding runs. The order is chosen per model (`model.pass_order`: auto = layer-major when offloaded) and
recorded in `loaded.info["passes"]`.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
from tqdm.auto import tqdm

from outlierlab.models import offload
from outlierlab.models.hooks import first_tensor

PASS_ORDERS = ("auto", "window", "layer")


class _Captured(Exception):
    """Raised by the last block's recorder: the rest of the model (final norm, LM head) need not run."""


def pass_order(loaded) -> str:
    """"layer" or "window" for this model: model.pass_order, auto = layer-major when weights are offloaded."""
    chosen = loaded.info.get("pass_order_config", "auto")
    if chosen == "auto":
        return "layer" if offload.is_offloaded(loaded.model) else "window"
    return chosen


def _without_cache(model) -> dict:
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def block_inputs(loaded, batch: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """(hidden state entering block 0, [(args, kwargs) of each block's call]) from the model's own forward."""
    layers, calls = loaded.sites.layers, []

    def recorder(*args, **kwargs):
        calls.append((args[1:], kwargs) if args else ((), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        if len(calls) == len(layers):
            raise _Captured
        return args[0] if args else kwargs["hidden_states"]

    first: list[torch.Tensor] = []
    saved = [(layer._forward_hooks, layer._forward_pre_hooks, layer.__dict__.get("forward")) for layer in layers]
    for number, layer in enumerate(layers):  # the blocks' own hooks belong to their real call, not this one
        layer._forward_hooks, layer._forward_pre_hooks = OrderedDict(), OrderedDict()
        layer.forward = recorder if number else _keeping(first, recorder)
    try:
        loaded.model(batch.to(loaded.device), **_without_cache(loaded.model))
    except _Captured:
        pass
    finally:
        for layer, (hooks, pre_hooks, forward) in zip(layers, saved):
            layer._forward_hooks, layer._forward_pre_hooks = hooks, pre_hooks
            del layer.forward
            if forward is not None:
                layer.forward = forward
    return first[0], calls


def _keeping(first: list, recorder):
    def record_first(*args, **kwargs):
        first.append(args[0] if args else kwargs["hidden_states"])
        return recorder(*args, **kwargs)
    return record_first


@torch.no_grad()
def observe_windows(loaded, ids: torch.Tensor, batch_size: int = 1, desc: str = "probe", before=None) -> str:
    """Run [n, seqlen] windows through the model for the probes hooked around this call, in the order
    `pass_order` chooses; `before(batch)` runs before each batch goes through (each block, layer-major).
    Returns the order used (also recorded in loaded.info["passes"][desc])."""
    order = pass_order(loaded)
    loaded.info.setdefault("passes", {})[desc] = f"{order}-major"
    batches = ids.split(batch_size)
    if order == "window":
        for batch in tqdm(batches, desc=desc, leave=False):
            if before is not None:
                before(batch)
            loaded.model(batch.to(loaded.device), **_without_cache(loaded.model))
        return order
    captured = [block_inputs(loaded, batch) for batch in tqdm(batches, desc=f"{desc} (inputs)", leave=False)]
    hidden = [first for first, _ in captured]
    for number, layer in enumerate(tqdm(loaded.sites.layers, desc=f"{desc} (layer-major)", leave=False)):
        with offload.resident(layer):
            for index, batch in enumerate(batches):
                if before is not None:
                    before(batch)
                args, kwargs = captured[index][1][number]
                hidden[index] = first_tensor(layer(hidden[index], *args, **kwargs))
    return order
