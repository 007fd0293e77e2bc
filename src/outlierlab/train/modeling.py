"""The pretrained models of the attention-variant study, as transformers models.

`OutlierLlamaForCausalLM` is transformers' LlamaForCausalLM with every decoder block's `self_attn` swapped for
`OutlierAttention` (train/attention.py). Its config type `outlierlab_llama` is registered with AutoConfig and
AutoModelForCausalLM by `register_with_transformers()` (outlierlab.models.load calls it before reading a config), so a
saved variant model loads with `model.source=<checkpoint dir>` like any Hugging Face directory. A model whose attention is vanilla is
exported as a plain `LlamaForCausalLM` (identical parameter names and maths), loadable without outlierlab.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from outlierlab.train.attention import ATTENTION_VARIANTS, OutlierAttention

MODEL_TYPE = "outlierlab_llama"
METADATA_FILE = "outlierlab.json"  # beside config.json: variant, BOS policy, training summary


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


def build_model(architecture: dict, attention: dict, tokenizer, seed: int) -> OutlierLlamaForCausalLM:
    """A freshly initialised model: `architecture` = Llama config fields, `attention` = variant fields."""
    config = OutlierLlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **architecture, **attention)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return OutlierLlamaForCausalLM(config)


def exportable(model: OutlierLlamaForCausalLM) -> torch.nn.Module:
    """The model as it should be saved: a plain LlamaForCausalLM when the attention is vanilla, else itself."""
    if model.config.attention_variant != "vanilla":
        return model
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "attention_variant", "clip_gamma", "clip_zeta", "gate_init",
                           "transformers_version")}
    plain = LlamaForCausalLM(LlamaConfig(**fields))
    plain.load_state_dict(model.state_dict())
    return plain.to(next(model.parameters()).dtype)


def resume_training(output_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Whether a training run continues from its checkpoint. A run is finished once its final model (with
    METADATA_FILE) is saved; `overwrite=true` on a finished run trains again from step 0 (resuming would "rerun" by
    loading the last step and training nothing). The finished marker is removed first, so a requeued job of that
    new run resumes its own checkpoint."""
    marker = Path(output_dir) / METADATA_FILE
    if overwrite and marker.is_file():
        marker.unlink()
        return False
    return resume


def save_pretrained(model: OutlierLlamaForCausalLM, tokenizer, directory: Path, metadata: dict) -> Path:
    """HF-format directory: config.json + model.safetensors + tokenizer files + outlierlab.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    exportable(model).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    return directory


def read_metadata(directory: str | Path) -> dict:
    path = Path(directory) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
