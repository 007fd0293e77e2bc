"""Simulated (fake) W8A8 quantization for the attention-variant table (paper QT reports FP vs W8A8 perplexity):
symmetric round-to-nearest of every linear's weight and input. The RTN itself is quant/rtn.py's (the same code as
the super-weight study's quantizers, zero_point="symmetric"); what this intervention adds is its target set, which
includes the LM head.

    quantize_rtn(x, bits)   symmetric per-tensor RTN: scale = max|x| / (2^(bits-1) - 1), x -> round(x/scale)*scale
    W8A8(...)               an Intervention: every linear in the decoder blocks (and the LM head) gets its weight
                            quantized through EditSession.set (restored bit-exactly on exit) and its input quantized
                            dynamically, per forward, by a pre-hook (removed on exit).

The protocol (recorded in the session log as {"weights": "per_channel", "activations": "per_token"}):
    weights       channel (one range per output channel; default) | tensor (one range per matrix)
    activations   token (one range per token; default) | tensor (one range per sequence) | batch (one range over
                  the whole batch tensor: the protocol before issue 25, batch-dependent)
Per-tensor dynamic activation ranges are the simplest W8A8 setting and the one most hurt by an outlier: one
massive value in a tensor sets the scale for every other value of that tensor (on SmolLM2 it ruins the model before
any edit), so the default is per token, which tells methods apart on small models.
"""
from __future__ import annotations

import torch
from torch import nn

from outlierlab.interventions.base import EditSession, Intervention
from outlierlab.quant.rtn import QuantSpec, fake_quantize, fake_quantize_activation
from outlierlab.quant.targets import weight_view

WEIGHT_GRANULARITIES = ("channel", "tensor")
ACTIVATION_GRANULARITIES = ("token", "tensor", "batch")


def quantize_rtn(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-tensor round-to-nearest to `bits` bits, returned in x's dtype (fake quantization)."""
    return fake_quantize_activation(x, bits, granularity="tensor", zero_point="symmetric")


def _linears(session: EditSession) -> list[tuple[str, nn.Module]]:
    found = list(session.sites.block_linears())
    head = session.loaded.model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        found.append(("lm_head", head))
    return found


def _quantize_input(x: torch.Tensor, bits: int, activations: str) -> torch.Tensor:
    if activations == "batch":
        return quantize_rtn(x, bits)
    if activations == "tensor" and x.dim() > 2:  # one range per sequence, as with batch 1
        return torch.cat([quantize_rtn(part, bits) for part in x.split(1)])
    return fake_quantize_activation(x, bits, granularity=activations, zero_point="symmetric")


class W8A8(Intervention):
    """Symmetric RTN of linear weights (weight_bits, per `weights` range) and of linear inputs (activation_bits, per
    `activations` range)."""

    def __init__(self, weight_bits: int | None = 8, activation_bits: int | None = 8, weights: str = "channel",
                 activations: str = "token"):
        for key, value in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
            if value is not None and (not isinstance(value, int) or not 2 <= value <= 16):
                raise ValueError(f"{key}={value} must be an integer between 2 and 16, or null (not quantized)")
        for key, value, allowed in (("weights", weights, WEIGHT_GRANULARITIES),
                                    ("activations", activations, ACTIVATION_GRANULARITIES)):
            if value not in allowed:
                raise ValueError(f"{key}={value} is not one of: {', '.join(allowed)}")
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.weights, self.activations = weights, activations

    @property
    def protocol(self) -> dict:
        return {"weights": f"per_{self.weights}", "activations": f"per_{self.activations}", "zero_point": "symmetric",
                "weight_bits": self.weight_bits, "activation_bits": self.activation_bits}

    def apply(self, session: EditSession) -> None:
        linears = _linears(session)
        quantized_weights = set()
        for name, module in linears:
            if self.weight_bits is not None and id(module.weight) not in quantized_weights:
                # A tied LM head shares the embedding matrix: quantize it once.
                quantized_weights.add(id(module.weight))
                spec = QuantSpec(self.weight_bits, self.weights, None, "symmetric")
                view = weight_view(module)  # rows = output channels, whatever the storage (GPT-2's Conv1D)
                quantized = fake_quantize(view.as_out_in(), spec)[0]
                session.set(module.weight, (Ellipsis,), quantized.t() if view.transposed else quantized)
            if self.activation_bits is not None:
                bits, activations = self.activation_bits, self.activations

                def pre_hook(_module, args, bits=bits):
                    return (_quantize_input(args[0], bits, activations), *args[1:])
                # "batch": one range over the whole batch tensor, batch-dependent by definition
                session.add_hook(module.register_forward_pre_hook(pre_hook), batch_invariant=activations != "batch")
        session.log.append({"edit": "w8a8_fake_quant", "weight_bits": self.weight_bits,
                            "activation_bits": self.activation_bits, "linears": len(linears),
                            "protocol": self.protocol, "activation_range": "dynamic"})
