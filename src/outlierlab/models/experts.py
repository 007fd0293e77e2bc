"""Per-expert observation inside transformers' fused experts: the experts forward outlierlab registers.

transformers 5 stores the experts of a mixture-of-experts block as fused 3-D parameters and dispatches their forward
through `transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS` by `config._experts_implementation` (as attention goes
through AttentionInterface); there is no per-expert module to hook. `OBSERVABLE` is registered there: it is
transformers' own grouped_mm forward (tokens sorted by expert, one grouped matmul per projection, the same layout
flags: transposed, biased, interleaved gate/up, post-expert norm), with taps where an expert's rows are contiguous:

    router.weights   the routing weights of each token's top-k experts [tokens, k] (a returned tensor replaces them)
    router.experts   the top-k expert indices [tokens, k] (read-only)
    {e}.in           expert e's down_proj input, act(gate) * up, for the tokens routed to it [n_e, I]
    {e}.out          expert e's down_proj output (bias included), before the routing weight [n_e, d]
    all.in / all.out the same for every expert at once: the rows of all (token, expert) pairs sorted by expert (the
                     order of `torch.sort(router.experts.flatten())`), for probes that fold every expert in a few
                     tensor operations instead of one call per expert

Taps are attached per experts module (`tap`); the model switches to OBSERVABLE when the first is attached and stays
there (it computes what grouped_mm computes, tested equal for every MoE family in tests/test_moe.py). An expert
tap sees only its routed tokens, in token order; a returned tensor replaces those rows.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _grouped_linear

from outlierlab.errors import UnsupportedArchitecture

OBSERVABLE = "outlierlab_observable"
ROUTER_POINTS = ("weights", "experts")
EXPERT_POINTS = ("in", "out")


def _taps(module: nn.Module) -> dict:
    return module.__dict__.setdefault("_outlierlab_taps", {})


def _call(module: nn.Module, key, tensor: torch.Tensor) -> torch.Tensor:
    for fn in list(_taps(module).get(key, ())):
        replaced = fn(tensor)
        if replaced is not None:
            tensor = replaced
    return tensor


def observable_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' grouped_mm_experts_forward (5.23) without expert parallelism, with the taps above."""
    if self._is_expert_parallel:  # experts sharded over devices: transformers' sentinel handling is not mirrored here
        raise UnsupportedArchitecture("per-expert observation of expert-parallel experts (sharded over devices) is not "
                                      "supported: load the model without expert parallelism")
    taps = _taps(self)
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    if taps:
        _call(self, "router.experts", top_k_index)
        top_k_weights = _call(self, "router.weights", top_k_weights)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    selected = hidden_states[perm // num_top_k]
    sample_weights = top_k_weights.reshape(-1)[perm]
    counts = torch.histc(expert_ids.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids.int(),
                         bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    weights, bias = (self.gate_up_proj, "gate_up_proj_bias") if self.has_gate else (self.up_proj, "up_proj_bias")
    out = _grouped_linear(selected, weights, offsets, bias=getattr(self, bias)[expert_ids] if self.has_bias else None,
                          is_transposed=self.is_transposed)
    out = self._apply_gate(out) if self.has_gate else self.act_fn(out)
    bounds = _expert_bounds(taps, offsets)
    _tap_rows(self, "in", out, bounds)
    out = _grouped_linear(out, self.down_proj, offsets,
                          bias=self.down_proj_bias[expert_ids] if self.has_bias else None,
                          is_transposed=self.is_transposed)
    _tap_rows(self, "out", out, bounds)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    weighted = out * sample_weights.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return weighted[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _expert_bounds(taps: dict, offsets: torch.Tensor) -> dict[int, tuple[int, int]]:
    """(first row, end row) of each tapped expert in the expert-sorted rows (one device sync, only when tapped)."""
    experts = {key[0] for key in taps if isinstance(key[0], int)}
    if not experts:
        return {}
    ends = offsets.tolist()
    return {e: (ends[e - 1] if e else 0, ends[e]) for e in experts}


def _tap_rows(module: nn.Module, point: str, rows: torch.Tensor, bounds: dict) -> None:
    if ("all", point) in _taps(module):
        rows[:] = _call(module, ("all", point), rows)
    for expert, (start, end) in bounds.items():
        if (expert, point) in _taps(module):
            rows[start:end] = _call(module, (expert, point), rows[start:end])


ALL_EXPERTS_FUNCTIONS.register(OBSERVABLE, observable_experts_forward)


class _Tap:
    def __init__(self, module: nn.Module, key, fn):
        self.module, self.key, self.fn = module, key, fn

    def remove(self) -> None:
        taps = _taps(self.module)
        fns = taps.get(self.key, [])
        if self.fn in fns:
            fns.remove(self.fn)
        if not fns:
            taps.pop(self.key, None)


def tap(model: nn.Module, experts: nn.Module, key, fn) -> _Tap:
    """fn at an experts module's point `key` ((expert, "in" | "out") or "router.weights" | "router.experts");
    returns a handle with remove()."""
    if model.config._experts_implementation != OBSERVABLE:
        model.set_experts_implementation(OBSERVABLE)
    _taps(experts).setdefault(key, []).append(fn)
    return _Tap(experts, key, fn)


def is_fused_experts(module) -> bool:
    """An experts module of transformers 5 (use_experts_implementation): fused 3-D down_proj, num_experts."""
    down_proj = getattr(module, "down_proj", None)
    return (isinstance(down_proj, torch.Tensor) and down_proj.dim() == 3 and hasattr(module, "num_experts")
            and hasattr(module, "is_transposed"))
