"""Simulated (fake) W8A8 quantization for the attention-variant table (paper QT reports FP vs W8A8 perplexity):
symmetric per-tensor round-to-nearest of every linear's weight and input. The RTN itself is quant/rtn.py's (the
same code as the super-weight study's quantizers, zero_point="symmetric"); what this intervention adds is its
target set, which includes the LM head.

    quantize_rtn(x, bits)   symmetric per-tensor RTN: scale = max|x| / (2^(bits-1) - 1), x -> round(x/scale)*scale
    W8A8(...)               an Intervention: every linear in the decoder blocks (and the LM head) gets its weight
                            quantized through EditSession.set (restored bit-exactly on exit) and its input quantized
                            per tensor, per forward, by a pre-hook (removed on exit).

Per-tensor dynamic activation ranges are the simplest W8A8 setting and the one most hurt by an outlier: one
massive value in a tensor sets the scale for every other value of that tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from outlierlab.interventions.base import EditSession, Intervention
from outlierlab.models import offload
from outlierlab.quant.rtn import fake_quantize_activation


def quantize_rtn(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-tensor round-to-nearest to `bits` bits, returned in x's dtype (fake quantization)."""
    return fake_quantize_activation(x, bits, granularity="tensor", zero_point="symmetric")


def _linears(session: EditSession) -> list[tuple[str, nn.Module]]:
    found = list(session.sites.block_linears())
    head = session.loaded.model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        found.append(("lm_head", head))
    return found


class W8A8(Intervention):
    """Per-tensor symmetric RTN of linear weights (weight_bits) and of linear inputs (activation_bits)."""

    def __init__(self, weight_bits: int | None = 8, activation_bits: int | None = 8):
        for key, value in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
            if value is not None and (not isinstance(value, int) or not 2 <= value <= 16):
                raise ValueError(f"{key}={value} must be an integer between 2 and 16, or null (not quantized)")
        self.weight_bits, self.activation_bits = weight_bits, activation_bits

    def apply(self, session: EditSession) -> None:
        linears = _linears(session)
        quantized_weights = set()
        for name, module in linears:
            if self.weight_bits is not None and id(module.weight) not in quantized_weights:
                # A tied LM head shares the embedding matrix: quantize it once.
                quantized_weights.add(id(module.weight))
                session.set(module.weight, (Ellipsis,), quantize_rtn(offload.values(module.weight), self.weight_bits))
            if self.activation_bits is not None:
                bits = self.activation_bits

                def pre_hook(_module, args, bits=bits):
                    return (quantize_rtn(args[0], bits), *args[1:])
                # one range per input tensor, i.e. over the whole batch: batch-dependent by definition
                session.add_hook(module.register_forward_pre_hook(pre_hook), batch_invariant=False)
        session.log.append({"edit": "w8a8_fake_quant", "weight_bits": self.weight_bits,
                            "activation_bits": self.activation_bits, "linears": len(linears),
                            "granularity": "per-tensor symmetric RTN, dynamic activation range"})
