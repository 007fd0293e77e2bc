"""Observation points inside attention: `layers.{i}.attn.logits`, `layers.{i}.attn.values`, `layers.{i}.attn.probs`.

transformers computes attention in a function it looks up by name (`config._attn_implementation`) in its public
`AttentionInterface` registry, and passes it the query, key and value states after every projection, norm and rotary
embedding. We register one more name, `outlierlab_observed`: it calls the model file's own `eager_attention_forward`
(the function transformers itself uses for attn_implementation="eager"; nothing of it is copied here) and hands its
inputs and its attention probabilities to the callbacks registered for that attention module. While at least one such
callback is registered the model runs with this implementation; when the last is removed, the model's previous
implementation (usually "sdpa") is restored. Eager and SDPA attention agree to float rounding (~1e-7 in float32).

What each callback receives (all [batch, heads, ...], keys/values repeated to one per query head for GQA/MQA):
    logits  q.k^T * scaling, before the causal/padding mask and before softmax: [batch, heads, queries, keys].
            `scaling` is what the model passes (1/sqrt(head_dim) for the families here). softmax(logits + mask)
            equals `probs` (tests check it); models that soft-cap or add learned sink logits inside their eager
            function (Gemma-2, GPT-OSS) would differ, and logits are then the pre-cap values.
    values  value states: [batch, heads, keys, head_dim]
    probs   the attention probabilities eager attention used: [batch, heads, queries, keys]
Within one attention call they are delivered in that order (logits, values, probs), so a probe can join them.
Callbacks are read-only: a returned value is ignored.
"""
from __future__ import annotations

import sys
import weakref

import torch

from outlierlab.errors import UnsupportedArchitecture

IMPLEMENTATION = "outlierlab_observed"
KINDS = ("logits", "values", "probs")

# attention module -> {kind: [callbacks]}; weak, so a dropped model frees its entries
_CALLBACKS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, list]] = weakref.WeakKeyDictionary()
# model -> (implementation before we switched, number of live handles)
_MODELS: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()


class AttentionNotObservable(UnsupportedArchitecture):
    """A study asked for attention observations of a model whose attention cannot deliver them (one line, exit 2)."""


def _repeat_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, kv_heads, length, dim] -> [batch, heads, length, dim], as transformers' repeat_kv does."""
    groups = heads // states.shape[1]
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _eager_for(module: torch.nn.Module):
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise AttentionNotObservable(f"{type(module).__name__} has no eager_attention_forward in its modeling file")
    return eager


def observable(module: torch.nn.Module) -> bool:
    """Whether this attention module can be observed: it delivers observations itself, or its modeling file has the
    eager function transformers' AttentionInterface dispatches to."""
    if getattr(module, "delivers_observations", False):
        return True
    try:
        _eager_for(module)
        return True
    except AttentionNotObservable:
        return False


def observed(module: torch.nn.Module) -> bool:
    """Whether any callback is registered on `module` (for attention modules that deliver observations themselves)."""
    callbacks = _CALLBACKS.get(module)
    return bool(callbacks) and any(callbacks.values())


def deliver(module: torch.nn.Module, logits: torch.Tensor, values: torch.Tensor, probs: torch.Tensor) -> None:
    """For attention modules that compute attention themselves (`delivers_observations = True`, e.g. the
    pretraining variants' OutlierAttention): hand their logits / values / probs ([batch, heads, ...], one key per
    query head) to the callbacks, in the order the module docstring promises."""
    callbacks = _CALLBACKS.get(module) or {}
    with torch.no_grad():
        for kind, tensor in (("logits", logits), ("values", values), ("probs", probs)):
            for callback in callbacks.get(kind, []):
                callback(tensor)


def _observed_attention(module, query, key, value, attention_mask, **kwargs):
    output, probs = _eager_for(module)(module, query, key, value, attention_mask, **kwargs)
    callbacks = _CALLBACKS.get(module)
    if callbacks:
        heads = query.shape[1]
        with torch.no_grad():
            if callbacks["logits"]:
                scaling = kwargs.get("scaling")
                scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
                logits = torch.matmul(query, _repeat_heads(key, heads).transpose(2, 3)) * scaling
                for callback in callbacks["logits"]:
                    callback(logits)
            if callbacks["values"]:
                values = _repeat_heads(value, heads)
                for callback in callbacks["values"]:
                    callback(values)
            for callback in callbacks["probs"]:
                callback(probs)
    return output, probs


def _register_implementation() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(IMPLEMENTATION, _observed_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # eager attention takes an additive float mask


class AttentionHandle:
    """Returned by `observe`; `remove()` unregisters the callback (and restores the model's attention when last)."""

    def __init__(self, model, module, kind, callback):
        self._model, self._module, self._kind, self._callback = model, module, kind, callback
        self._live = True

    def remove(self) -> None:
        if not self._live:
            return
        self._live = False
        _CALLBACKS[self._module][self._kind].remove(self._callback)
        state = _MODELS[self._model]
        state[1] -= 1
        if state[1] == 0:
            self._model.set_attn_implementation(state[0])
            del _MODELS[self._model]


def observe(model: torch.nn.Module, module: torch.nn.Module, kind: str, callback) -> AttentionHandle:
    """Call `callback(tensor)` with `kind` (logits | values | probs) of `module` on every forward."""
    if kind not in KINDS:
        raise KeyError(f"attention observation '{kind}' is not one of {', '.join(KINDS)}")
    if not getattr(module, "delivers_observations", False):
        # Attention that does not go through transformers' AttentionInterface would never call the callback:
        # say so now rather than observe nothing.
        try:
            _eager_for(module)
        except AttentionNotObservable as error:
            raise AttentionNotObservable(f"{error}: its attention does not go through transformers' "
                                         "AttentionInterface, so it cannot be observed") from None
    if model not in _MODELS:
        _register_implementation()
        previous = model.config._attn_implementation
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:
            raise AttentionNotObservable(f"{type(model).__name__} does not dispatch attention through "
                                         "transformers' AttentionInterface, so its attention cannot be observed")
        _MODELS[model] = [previous, 0]
    _MODELS[model][1] += 1
    _CALLBACKS.setdefault(module, {k: [] for k in KINDS})[kind].append(callback)
    return AttentionHandle(model, module, kind, callback)
