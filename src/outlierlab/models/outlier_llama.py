"""`outlierlab_llama`: transformers' LlamaForCausalLM with an attention variant in every block (the models of the
attention-variant study, loadable like any Hugging Face directory).

`OutlierLlamaForCausalLM` swaps every decoder block's `self_attn` for `OutlierAttention`
(models/variant_attention.py) and, with `norm: ssnorm`, every RMSNorm for `SSNorm`. Its config type
`outlierlab_llama` is registered with AutoConfig and AutoModelForCausalLM by `register_with_transformers()`
(models/load.py calls it before reading a config), so a saved variant model loads with
`model.source=<checkpoint dir>`. Building, training and saving are in train/.
"""
from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from outlierlab.models.variant_attention import ATTENTION_VARIANTS, OutlierAttention

MODEL_TYPE = "outlierlab_llama"
NORMS = ("rmsnorm", "ssnorm")


class SSNorm(LlamaRMSNorm):
    """Outlier-Safe Pre-training's single-scale RMSNorm (Park et al. 2025, arXiv 2506.19697, "SSNorm"):
    gamma * x / sqrt(mean(x^2) + eps) with ONE learnable gamma for all channels (RMSNorm has one per channel), so no
    channel can be amplified on its own. gamma starts at 1 (RMSNorm's initialisation). Followed: the paper's
    description (a single scale shared across dimensions) and the equivalent form sqrt(d) * gamma * x / ||x||_2 of an
    open re-implementation; the paper's other two parts (Muon, embedding projection) are not done here.
    It is Llama's RMSNorm with a one-element `weight`: the same maths by broadcasting, the same parameter name (sites,
    the L1-on-gamma penalty and checkpoints see `weight`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps)
        self.weight = nn.Parameter(torch.ones(1))


@strict
class OutlierLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE
    attention_variant: str = "vanilla"
    # paper QT's clipped softmax; the defaults are its code's "clipped(-.025:1)" preset (gamma=-0.025, zeta=1).
    clip_gamma: float = -0.025
    clip_zeta: float = 1.0
    # paper QT's gated attention: initial gate probability (the gate bias starts at logit(gate_init)).
    gate_init: float = 0.5
    # softpick (Zuhri et al. 2025): the denominator's epsilon (their reference code's 1e-8).
    softpick_eps: float = 1e-8
    # sigmoid attention (Ramapuram et al. 2024): b = -log(n), n = this (null: max_position_embeddings).
    sigmoid_bias_length: int | None = None
    # rmsnorm (Llama's, one gain per channel) | ssnorm (OSP's single-scale RMSNorm, one gain per norm).
    norm: str = "rmsnorm"

    def validate_architecture(self):
        super().validate_architecture()
        if self.attention_variant not in ATTENTION_VARIANTS:
            raise ValueError(f"attention_variant={self.attention_variant} is not one of: "
                             f"{', '.join(ATTENTION_VARIANTS)}")
        if not 0.0 < self.gate_init < 1.0:
            raise ValueError(f"gate_init={self.gate_init} must be strictly between 0 and 1")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm} is not one of: {', '.join(NORMS)}")
        if self.sigmoid_bias_length is not None and self.sigmoid_bias_length < 1:
            raise ValueError(f"sigmoid_bias_length={self.sigmoid_bias_length} must be a positive integer")


# The fields OutlierLlamaConfig adds to LlamaConfig (dropped when a vanilla model is saved as a plain Llama).
VARIANT_FIELDS = tuple(OutlierLlamaConfig.__annotations__)


class OutlierLlamaForCausalLM(LlamaForCausalLM):
    config_class = OutlierLlamaConfig

    def __init__(self, config: OutlierLlamaConfig):
        super().__init__(config)
        for index, layer in enumerate(self.model.layers):
            layer.self_attn = OutlierAttention(config, index)
        if config.norm == "ssnorm":
            for layer in self.model.layers:
                layer.input_layernorm = SSNorm(config.hidden_size, config.rms_norm_eps)
                layer.post_attention_layernorm = SSNorm(config.hidden_size, config.rms_norm_eps)
            self.model.norm = SSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()  # initialises the new projections like Llama's (the inner LlamaModel's _init_weights)
        for layer in self.model.layers:  # ... and the variant's own parameters, which Llama's init does not know
            layer.self_attn.reset_variant_parameters(config.initializer_range)


def register_with_transformers() -> None:
    """Teach transformers' Auto classes the `outlierlab_llama` type (idempotent); models/load.py calls it before it
    reads any config, so a saved variant loads like any Hugging Face directory."""
    AutoConfig.register(MODEL_TYPE, OutlierLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(OutlierLlamaConfig, OutlierLlamaForCausalLM, exist_ok=True)
