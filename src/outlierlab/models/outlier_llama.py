"""`outlierlab_llama`: transformers' LlamaForCausalLM with an attention variant in every block (the models of the
attention-variant study, loadable like any Hugging Face directory).

`OutlierLlamaForCausalLM` swaps every decoder block's `self_attn` for `OutlierAttention`
(models/variant_attention.py). Its config type `outlierlab_llama` is registered with AutoConfig and
AutoModelForCausalLM by `register_with_transformers()` (models/load.py calls it before reading a config), so a saved
variant model loads with `model.source=<checkpoint dir>`. Building, training and saving are in train/.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from outlierlab.models.variant_attention import ATTENTION_VARIANTS, OutlierAttention

MODEL_TYPE = "outlierlab_llama"


@strict
class OutlierLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE
    attention_variant: str = "vanilla"
    # paper QT's clipped softmax; the defaults are its code's "clipped(-.025:1)" preset (gamma=-0.025, zeta=1).
    clip_gamma: float = -0.025
    clip_zeta: float = 1.0
    # paper QT's gated attention: initial gate probability (the gate bias starts at logit(gate_init)).
    gate_init: float = 0.5

    def validate_architecture(self):
        super().validate_architecture()
        if self.attention_variant not in ATTENTION_VARIANTS:
            raise ValueError(f"attention_variant={self.attention_variant} is not one of: "
                             f"{', '.join(ATTENTION_VARIANTS)}")
        if not 0.0 < self.gate_init < 1.0:
            raise ValueError(f"gate_init={self.gate_init} must be strictly between 0 and 1")


class OutlierLlamaForCausalLM(LlamaForCausalLM):
    config_class = OutlierLlamaConfig

    def __init__(self, config: OutlierLlamaConfig):
        super().__init__(config)
        for index, layer in enumerate(self.model.layers):
            layer.self_attn = OutlierAttention(config, index)
        self.post_init()  # initialises the new projections like Llama's (the inner LlamaModel's _init_weights)
        for layer in self.model.layers:  # ... and the variant's own parameters, which Llama's init does not know
            layer.self_attn.reset_variant_parameters(config.initializer_range)


def register_with_transformers() -> None:
    """Teach transformers' Auto classes the `outlierlab_llama` type (idempotent); models/load.py calls it before it
    reads any config, so a saved variant loads like any Hugging Face directory."""
    AutoConfig.register(MODEL_TYPE, OutlierLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(OutlierLlamaConfig, OutlierLlamaForCausalLM, exist_ok=True)
