"""Building, exporting and saving the pretrained models of the attention-variant study (the model itself is
models/outlier_llama.py). A model whose attention is vanilla and whose norms are RMSNorm is exported as a plain
`LlamaForCausalLM` (identical parameter names and maths), loadable without outlierlab.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from outlierlab.models.outlier_llama import (  # noqa: F401 (re-exported)
    MODEL_TYPE,
    VARIANT_FIELDS,
    OutlierLlamaConfig,
    OutlierLlamaForCausalLM,
    register_with_transformers,
)

METADATA_FILE = "outlierlab.json"  # beside config.json: variant, BOS policy, training summary


def build_model(architecture: dict, attention: dict, tokenizer, seed: int) -> OutlierLlamaForCausalLM:
    """A freshly initialised model: `architecture` = Llama config fields, `attention` = the variant's
    OutlierLlamaConfig fields (attention_variant and its parameters, norm)."""
    config = OutlierLlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **architecture, **attention)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return OutlierLlamaForCausalLM(config)


def exportable(model: OutlierLlamaForCausalLM) -> torch.nn.Module:
    """The model as it should be saved: a plain LlamaForCausalLM when the attention is vanilla and the norms are
    RMSNorm, else itself."""
    if model.config.attention_variant != "vanilla" or model.config.norm != "rmsnorm":
        return model
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", *VARIANT_FIELDS)}
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
