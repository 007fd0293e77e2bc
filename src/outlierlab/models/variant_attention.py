"""One attention module for every pretraining variant: scaled-dot-product attention with an explicit boolean mask.

Variants (config `attention_variant`):
    vanilla          softmax(q k^T / sqrt(d) + mask) v through torch's SDPA; matches transformers' Llama attention.
    kv_bias          paper MA (Sun et al. 2024, Sec. "explicit attention bias"): one learnable key k' and value v' per
                     head, visible to every query, appended as an extra key column with no position:
                     softmax(q [K; k']^T / sqrt(d)) [V; v'].  Still SDPA: the extra column is one more True in the mask.
    clipped_softmax  paper QT (Bondarenko et al. 2023, Eq. 4.1): P = clip((zeta - gamma) * softmax(s) + gamma, 0, 1).
                     SDPA fuses the softmax and gives no access to the probabilities, so this variant computes
                     q k^T, the softmax and P v explicitly (same mask, same scale).
    gated            paper QT (Sec. 4.2, "conditional per token" gate of their code): each head's output is multiplied by
                     sigmoid(G_h(x_h)), G_h a linear map from that head's slice of the attention input to one logit.

The sink-token and L1-on-gamma variants of the study change the data and the loss, not the attention (train/loop.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from outlierlab.models import attention as observation

ATTENTION_VARIANTS = ("vanilla", "kv_bias", "clipped_softmax", "gated")


def clipped_softmax(scores: torch.Tensor, gamma: float, zeta: float, dim: int = -1) -> torch.Tensor:
    """Paper QT: clip((zeta - gamma) * softmax(scores) + gamma, 0, 1). gamma < 0 lets a probability be exactly 0
    without an infinite logit; zeta > 1 lets one be exactly 1."""
    probs = torch.softmax(scores, dim=dim, dtype=torch.float32)
    return torch.clamp((zeta - gamma) * probs + gamma, 0.0, 1.0)


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
    """softmax-free reference path: probabilities(q k^T * scale with masked entries at -inf) @ v."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = probabilities(scores)
    return torch.matmul(probs.to(value.dtype), value)


class OutlierAttention(nn.Module):
    """Drop-in for transformers' LlamaAttention (same projections and parameter names, same forward signature).

    Observable like the HF modules (`layers.{i}.attn.logits|values|probs`, models/attention.py): while a callback
    is registered it computes the attention explicitly and delivers what it used. For kv_bias the extra key k' is
    delivered as the LAST key column, so key 0 is still the first token (what attention-sink metrics look at)."""

    delivers_observations = True

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.variant = config.attention_variant
        if self.variant not in ATTENTION_VARIANTS:
            raise ValueError(f"attention_variant={self.variant} is not one of: {', '.join(ATTENTION_VARIANTS)}")
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
        if self.variant == "kv_bias":
            self.k_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
            self.v_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
        if self.variant == "gated":
            self.gate_weight = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
            self.gate_bias = nn.Parameter(torch.zeros(self.num_heads))

    def reset_variant_parameters(self, std: float) -> None:
        """Initialisation of the variant's own parameters (called by the model's _init_weights)."""
        with torch.no_grad():
            if self.variant == "kv_bias":
                self.k_bias.normal_(0.0, std)
                self.v_bias.normal_(0.0, std)
            if self.variant == "gated":
                self.gate_weight.normal_(0.0, std)
                # QT initialises the gate bias to logit(pi_init) so every gate starts open by pi_init.
                pi = self.config.gate_init
                self.gate_bias.fill_(math.log(pi / (1.0 - pi)))

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

        if self.variant == "kv_bias":
            # k' carries no rotary position: every query sees the same extra key, wherever it stands.
            extra_key = self.k_bias.to(key.dtype)[None, :, None, :].expand(batch, -1, 1, -1)
            extra_value = self.v_bias.to(value.dtype)[None, :, None, :].expand(batch, -1, 1, -1)
            key = torch.cat([extra_key, key], dim=2)
            value = torch.cat([extra_value, value], dim=2)
            visible = torch.ones(*mask.shape[:-1], 1, dtype=torch.bool, device=mask.device)
            mask = torch.cat([visible, mask], dim=-1)

        if self.variant == "clipped_softmax":
            gamma, zeta = self.config.clip_gamma, self.config.clip_zeta
            probabilities = lambda scores: clipped_softmax(scores, gamma, zeta)  # noqa: E731
        else:
            probabilities = lambda scores: torch.softmax(scores, dim=-1, dtype=torch.float32)  # noqa: E731
        if observation.observed(self):
            logits = torch.matmul(query, key.transpose(-1, -2)).float() * self.scaling
            probs = probabilities(logits.masked_fill(~mask, float("-inf")))
            output = torch.matmul(probs.to(value.dtype), value)
            order = (lambda t: torch.cat([t[..., 1:], t[..., :1]], dim=-1)) if self.variant == "kv_bias" else None
            observation.deliver(self, order(logits) if order else logits,
                                torch.cat([value[:, :, 1:], value[:, :, :1]], dim=2) if order else value,
                                order(probs) if order else probs)
        elif self.variant == "clipped_softmax":
            output = explicit_attention(query, key, value, mask, self.scaling, probabilities)
        else:
            output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scaling)

        if self.variant == "gated":
            heads = hidden_states.view(batch, length, self.num_heads, self.head_dim)
            logits = torch.einsum("bthd,hd->bht", heads, self.gate_weight.to(heads.dtype))
            logits = logits + self.gate_bias.to(logits.dtype)[None, :, None]
            output = output * torch.sigmoid(logits)[..., None].to(output.dtype)

        output = output.transpose(1, 2).reshape(batch, length, -1).contiguous()
        return self.o_proj(output), None
