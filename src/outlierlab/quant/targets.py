"""Which weights and inputs a quantizer acts on: the linear layers inside the decoder blocks.

Named `layers.{i}.<module path>.weight` (e.g. `layers.3.self_attn.q_proj.weight`), addressed through WeightView as
(row = output channel, col = input channel) whatever the storage (GPT-2's Conv1D is [in, out]).

Left out, as in the SW authors' quantization code (LLMSuperWeight, outliers/model.py skips "norm", "embed_tokens"
and "lm_head"): the token embedding and the LM head (a lookup table and the output projection, usually kept at
higher precision; SmolLM2 ties the two), and every norm (vectors, not matrices).
"""
from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from outlierlab.models.sites import LINEAR_TYPES, WeightView  # noqa: F401 (LINEAR_TYPES re-exported)


def linear_modules(sites, match: str | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every linear layer of every decoder block whose weight name matches `match` (regex)."""
    return sites.block_linears(match)


def weight_view(module: nn.Module) -> WeightView:
    return WeightView(module.weight, transposed=isinstance(module, Conv1D))


def check_match(match: str | None) -> None:
    if match is not None:
        try:
            re.compile(match)
        except re.error as error:
            raise ValueError(f"match={match!r} is not a regular expression ({error})") from None
