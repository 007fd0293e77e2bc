"""One attention module for every pretraining variant: scaled-dot-product attention with an explicit boolean mask.

Variants (config `attention_variant`; s = q k^T / sqrt(d) with masked entries at -inf, one row per query):
    vanilla            softmax(s) v through torch's SDPA; matches transformers' Llama attention.
    kv_bias            paper MA (Sun et al. 2024, Sec. "explicit attention bias"): one learnable key k' and value v'
                       per head, visible to every query, appended as an extra key column with no position:
                       softmax(q [K; k']^T / sqrt(d)) [V; v']. Still SDPA: the extra column is one more True in the
                       mask.
    clipped_softmax    paper QT (Bondarenko et al. 2023, Eq. 4.1): P = clip((zeta - gamma) * softmax(s) + gamma, 0, 1).
    gated              paper QT (Sec. 4.2, "conditional per token" gate of their code): each head's output is
                       multiplied by sigmoid(G_h(x_h)), G_h a linear map from that head's slice of the attention input
                       to one logit.
    gated_elementwise  Qiu et al. 2025, "Gated Attention for LLMs" (arXiv 2505.06708), position G1, the variant
                       Qwen3-Next uses: Y' = Y * sigmoid(X W_theta), X the attention input (after the pre-norm),
                       W_theta: hidden -> heads x head_dim, so every head and channel of the SDPA output Y has its own
                       query-dependent gate. Followed: the paper's Eq. (G1, elementwise, head-specific, sigmoid,
                       multiplicative). Ours: a bias in the gate projection, initialised to 0 (at initialisation the
                       gate is the paper's sigmoid(X W_theta)); it lets the tests open the gate fully (bias -> +inf is
                       vanilla attention). Still SDPA: the gate acts on its output.
    softpick           Zuhri et al. 2025 (arXiv 2504.20966): P_i = ReLU(e^{s_i} - 1) / (sum_j |e^{s_j} - 1| + eps),
                       a rectified softmax whose row need not sum to one (a query can attend to nothing), computed as
                       the authors' reference code does (shifted by the row maximum m: e^{s-m} - e^{-m}; masked keys
                       count in neither sum), eps = 1e-8 as there. Explicit (SDPA fuses softmax only).
    sigmoid            Ramapuram et al. 2024 (arXiv 2409.04431), sigmoid attention: P = sigmoid(s + b), elementwise,
                       with the paper's bias b = -log(n). n is fixed to the training window (config
                       `sigmoid_bias_length`, default max_position_embeddings), so a cached step and a full forward
                       agree. Left out: the paper's stabilisers for large models (LayerScale, hybrid norm, QK norm).
                       Explicit.
The variants that change the softmax are computed explicitly (q k^T, weights, P v; same mask, same scale).
Outlier-Safe Pre-training's single-scale RMSNorm (SSNorm) changes the norms, not the attention: OutlierLlamaConfig.norm
(models/outlier_llama.py). The sink-token and L1-on-gamma variants change the data and the loss (train/loop.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from outlierlab.models import attention as observation


def clipped_softmax(scores: torch.Tensor, gamma: float, zeta: float, dim: int = -1) -> torch.Tensor:
    """Paper QT: clip((zeta - gamma) * softmax(scores) + gamma, 0, 1). gamma < 0 lets a probability be exactly 0
    without an infinite logit; zeta > 1 lets one be exactly 1."""
    probs = torch.softmax(scores, dim=dim, dtype=torch.float32)
    return torch.clamp((zeta - gamma) * probs + gamma, 0.0, 1.0)


def softpick(scores: torch.Tensor, eps: float = 1e-8, dim: int = -1) -> torch.Tensor:
    """Zuhri et al. 2025: ReLU(e^x - 1) / (sum |e^x - 1| + eps), shifted by the row maximum m for stability (both sums
    scale by e^{-m}). Masked entries (-inf) count in neither sum; a fully masked row gives zeros."""
    scores = scores.float()
    top = scores.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    shifted = torch.exp(scores - top) - torch.exp(-top)
    magnitude = torch.where(torch.isfinite(scores), shifted.abs(), torch.zeros_like(shifted))
    return F.relu(shifted) / (magnitude.sum(dim=dim, keepdim=True) + eps)


def sigmoid_weights(scores: torch.Tensor, bias: float) -> torch.Tensor:
    """Ramapuram et al. 2024: sigmoid(scores + b), elementwise; masked entries (-inf) give 0."""
    return torch.sigmoid(scores.float() + bias)


def softmax(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def sigmoid_bias(config) -> float:
    """The sigmoid variant's b = -log(n), n = config.sigmoid_bias_length or max_position_embeddings."""
    return -math.log(getattr(config, "sigmoid_bias_length", None) or config.max_position_embeddings)


@dataclass(frozen=True)
class Variant:
    """What a variant changes. `weights(config)` returns its map from masked scores to attention weights (None:
    softmax, which SDPA fuses); `sums_to_one`: whether every row of those weights sums to one."""
    weights: Callable | None = None
    sums_to_one: bool = True
    extra_key: bool = False  # paper MA's k'/v'
    gate: str | None = None  # "head" (paper QT) | "elementwise" (G1)


VARIANTS: dict[str, Variant] = {
    "vanilla": Variant(),
    "kv_bias": Variant(extra_key=True),
    "clipped_softmax": Variant(weights=lambda c: partial(clipped_softmax, gamma=c.clip_gamma, zeta=c.clip_zeta),
                               sums_to_one=False),
    "gated": Variant(gate="head"),
    "gated_elementwise": Variant(gate="elementwise"),
    "softpick": Variant(weights=lambda c: partial(softpick, eps=c.softpick_eps), sums_to_one=False),
    "sigmoid": Variant(weights=lambda c: partial(sigmoid_weights, bias=sigmoid_bias(c)), sums_to_one=False),
}
ATTENTION_VARIANTS = tuple(VARIANTS)


def key_last(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Key column 0 (k') moved to the end along `dim`."""
    return torch.cat([tensor.narrow(dim, 1, tensor.shape[dim] - 1), tensor.narrow(dim, 0, 1)], dim=dim)


def explicit_mask(attention_mask: torch.Tensor | None, queries: int, keys: int, device) -> torch.Tensor:
    """Boolean [batch or 1, 1, queries, keys] mask, True = may attend. Causal over the last `queries` of `keys`
    positions (a KV cache holds the first keys - queries), AND-ed with whatever mask transformers passed in
    (boolean, or additive float where 0 means visible)."""
    causal = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)[None, None]
    if attention_mask is None:
        return causal
    given = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return causal & given[..., -queries:, -keys:]


def explicit_attention(query, key, value, mask, scale: float, probabilities) -> torch.Tensor:
    """The reference path for weights SDPA cannot fuse: probabilities(q k^T * scale with masked entries at -inf) @ v."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    probs = masked_weights(probabilities, scores, mask)
    return torch.matmul(probs.to(value.dtype), value)


def masked_weights(probabilities, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """probabilities(scores with masked entries at -inf), then exactly 0 wherever masked: a query that sees no key
    at all (left padding) gets zero weights instead of softmax's NaN, which P v would spread to every query."""
    return probabilities(scores.masked_fill(~mask, float("-inf"))).masked_fill(~mask, 0.0)


class OutlierAttention(nn.Module):
    """Drop-in for transformers' LlamaAttention (same projections and parameter names, same forward signature).

    Observable like the HF modules (`layers.{i}.attn.logits|values|probs`, models/attention.py): while a callback
    is registered it computes the attention explicitly and delivers what it used (for softpick and sigmoid the
    weights it delivers as `probs` need not sum to one). For kv_bias the extra key k' is delivered as the LAST key
    column, so key 0 is still the first token (what attention-sink metrics look at)."""

    delivers_observations = True

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        if config.attention_variant not in VARIANTS:
            raise ValueError(f"attention_variant={config.attention_variant} is not one of: "
                             f"{', '.join(ATTENTION_VARIANTS)}")
        self.variant = config.attention_variant
        self.spec = VARIANTS[self.variant]
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if self.spec.extra_key:
            self.k_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
            self.v_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
        if self.spec.gate == "head":
            self.gate_weight = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
            self.gate_bias = nn.Parameter(torch.zeros(self.num_heads))
        if self.spec.gate == "elementwise":
            # a Linear: initialised by the model's _init_weights like q_proj (normal, std initializer_range), bias 0
            self.gate_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.weighting = self.spec.weights(config) if self.spec.weights else softmax

    def reset_variant_parameters(self, std: float) -> None:
        """Initialisation of the variant's own parameters (called by the model's _init_weights)."""
        with torch.no_grad():
            if self.spec.extra_key:
                self.k_bias.normal_(0.0, std)
                self.v_bias.normal_(0.0, std)
            if self.spec.gate == "head":
                self.gate_weight.normal_(0.0, std)
                # QT initialises the gate bias to logit(pi_init) so every gate starts open by pi_init.
                pi = self.config.gate_init
                self.gate_bias.fill_(math.log(pi / (1.0 - pi)))
            if self.spec.gate == "elementwise":
                self.gate_proj.weight.normal_(0.0, std)
                self.gate_proj.bias.zero_()

    def gate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The gate's values, [batch, heads, length, 1 (head) or head_dim (elementwise)], from the attention input."""
        batch, length, _ = hidden_states.shape
        if self.spec.gate == "head":
            heads = hidden_states.view(batch, length, self.num_heads, self.head_dim)
            logits = torch.einsum("bthd,hd->bht", heads, self.gate_weight.to(heads.dtype))
            return torch.sigmoid(logits + self.gate_bias.to(logits.dtype)[None, :, None])[..., None]
        logits = self.gate_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        return torch.sigmoid(logits)

    def with_extra_key(self, key, value, mask):
        """Paper MA's k'/v' as key/value column 0, visible to every query. k' carries no rotary position: every
        query sees the same extra key, wherever it stands."""
        batch = key.shape[0]
        extra_key = self.k_bias.to(key.dtype)[None, :, None, :].expand(batch, -1, 1, -1)
        extra_value = self.v_bias.to(value.dtype)[None, :, None, :].expand(batch, -1, 1, -1)
        visible = torch.ones(*mask.shape[:-1], 1, dtype=torch.bool, device=mask.device)
        return (torch.cat([extra_key, key], dim=2), torch.cat([extra_value, value], dim=2),
                torch.cat([visible, mask], dim=-1))

    def observed_attention(self, query, key, value, mask) -> torch.Tensor:
        """The attention computed explicitly, its logits / values / weights delivered to the observers (k' moved to
        the last key column)."""
        logits = torch.matmul(query, key.transpose(-1, -2)).float() * self.scaling
        probs = masked_weights(self.weighting, logits, mask)
        output = torch.matmul(probs.to(value.dtype), value)
        if self.spec.extra_key:
            logits, value, probs = key_last(logits, -1), key_last(value, 2), key_last(probs, -1)
        observation.deliver(self, logits, value, probs)
        return output

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None,
                **kwargs):
        # transformers >= 5.24 passes the KV cache as `cache` (`past_key_values` is deprecated until 5.40): take
        # either, so cached generation stays right on the locked and the newest release.
        cache = cache if cache is not None else past_key_values
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        mask = explicit_mask(attention_mask, length, key.shape[2], hidden_states.device)
        # no padding and no earlier keys (training): the mask is plain causal, and SDPA's is_causal=True takes its
        # flash kernel, which accepts no explicit mask
        plain_causal = attention_mask is None and key.shape[2] == length and not self.spec.extra_key

        if self.spec.extra_key:
            key, value, mask = self.with_extra_key(key, value, mask)

        # torch.compile traces training, where nothing observes: the registry lookup would only break its graph
        if not torch.compiler.is_compiling() and observation.observed(self):
            output = self.observed_attention(query, key, value, mask)
        elif self.spec.weights is not None:
            output = explicit_attention(query, key, value, mask, self.scaling, self.weighting)
        elif plain_causal:
            output = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=self.scaling)
        else:
            output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scaling)

        if self.spec.gate:
            output = output * self.gate(hidden_states).to(output.dtype)

        output = output.transpose(1, 2).reshape(batch, length, -1).contiguous()
        return self.o_proj(output), None
