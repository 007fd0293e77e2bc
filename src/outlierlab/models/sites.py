"""Named observation/edit points ("sites"), resolved per architecture family from one table.

Site names are stable and greppable; every probe and intervention addresses a site, never a module path:

    embed                          token embedding module
    final_norm                     norm before the LM head
    layers.{i}                     decoder block i
    layers.{i}.out                 residual stream after block i (hook point)
    layers.{i}.attn                self-attention module
    layers.{i}.attn.probs          attention probabilities [batch, heads, queries, keys] (hook point, read-only;
                                   also .logits (pre-softmax q.k*scale) and .values: see models/attention.py)
    layers.{i}.norm1 / .norm2      pre-attention / pre-MLP norm (".weight" for its gamma)
    layers.{i}.mlp.down_proj       the MLP's output projection (".in", ".out" hook points, ".weight" its matrix)
    layers.{i}.mlp.up_proj         the MLP projection that makes down_proj's input channels (".weight" its matrix)

Adding a family is one `Family` entry; nothing else in the code looks at model names.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from outlierlab.errors import UnsupportedArchitecture  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str  # attribute path from the CausalLM to the list of decoder blocks
    attn: str
    norm1: str | None  # None: the family has no such pre-norm (OLMo-2 normalizes sublayer outputs instead)
    norm2: str | None
    down_proj: str
    embed: str
    final_norm: str
    # The MLP's input projection whose output channels are down_proj's input channels (up_proj in gated MLPs,
    # the first linear elsewhere): where a super weight's input spike is made.
    up_proj: str | None = None
    # GPT-2's Conv1D stores weights as [in, out] (its MLP's c_fc and c_proj); every other family uses [out, in].
    down_proj_transposed: bool = False


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama-like",
        model_types=("llama", "mistral", "mixtral", "qwen2", "qwen3", "olmo", "gemma",
                     "phi3", "smollm3", "granite", "outlierlab_llama"),
        layers="model.layers", attn="self_attn", norm1="input_layernorm", norm2="post_attention_layernorm",
        down_proj="mlp.down_proj", embed="model.embed_tokens", final_norm="model.norm", up_proj="mlp.up_proj",
    ),
    Family(
        # Gemma-2/3 norm both sides of each sublayer: post_attention_layernorm normalizes the attention *output*;
        # the MLP's input norm is pre_feedforward_layernorm.
        name="gemma2-like", model_types=("gemma2", "gemma3_text"),
        layers="model.layers", attn="self_attn", norm1="input_layernorm", norm2="pre_feedforward_layernorm",
        down_proj="mlp.down_proj", embed="model.embed_tokens", final_norm="model.norm", up_proj="mlp.up_proj",
    ),
    Family(
        # OLMo-2 is post-norm: post_attention_layernorm / post_feedforward_layernorm normalize the sublayer outputs,
        # so it has no norm1/norm2 (input norms) to address.
        name="olmo2", model_types=("olmo2",),
        layers="model.layers", attn="self_attn", norm1=None, norm2=None,
        down_proj="mlp.down_proj", embed="model.embed_tokens", final_norm="model.norm", up_proj="mlp.up_proj",
    ),
    Family(
        name="gpt2", model_types=("gpt2",),
        layers="transformer.h", attn="attn", norm1="ln_1", norm2="ln_2",
        down_proj="mlp.c_proj", embed="transformer.wte", final_norm="transformer.ln_f", up_proj="mlp.c_fc",
        down_proj_transposed=True,
    ),
    Family(
        name="opt", model_types=("opt",),
        layers="model.decoder.layers", attn="self_attn", norm1="self_attn_layer_norm", norm2="final_layer_norm",
        down_proj="fc2", embed="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm", up_proj="fc1",
    ),
    Family(
        name="falcon", model_types=("falcon",),
        layers="transformer.h", attn="self_attention", norm1="input_layernorm", norm2="post_attention_layernorm",
        down_proj="mlp.dense_4h_to_h", embed="transformer.word_embeddings", final_norm="transformer.ln_f",
        up_proj="mlp.dense_h_to_4h",
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedArchitecture(
        f"architecture '{model_type}' has no site table; supported model types: {', '.join(supported_model_types())}")


def _getattr_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# The module types a "linear layer" is: GPT-2's Conv1D is a linear layer stored as [in, out].
LINEAR_TYPES = (nn.Linear, Conv1D)


def first_tensor(output):
    """Decoder blocks return a tensor in new transformers and a tuple in older/other ones."""
    return output[0] if isinstance(output, (tuple, list)) else output


_LAYER_SITE = re.compile(r"^layers\.(\d+)(?:\.(.+))?$")
_HOOK_SUFFIXES = ("in", "out")
_ATTENTION_POINT = re.compile(r"^(layers\.\d+\.attn)\.(probs|logits|values)$")


@dataclass
class WeightView:
    """A matrix addressed as (row = output channel, col = input channel), whatever its storage layout."""
    param: torch.nn.Parameter
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.param.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def index(self, row: int, col: int) -> tuple[int, int]:
        rows, cols = self.shape
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"(row={row}, col={col}) is outside the weight's shape ({rows}, {cols})")
        return (col, row) if self.transposed else (row, col)

    def as_out_in(self) -> torch.Tensor:
        """The matrix as [out, in] (a view, no copy)."""
        return self.param.data.t() if self.transposed else self.param.data


class Sites:
    """Resolves site names to modules, parameters and hook points for one loaded model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_for(model.config.model_type)
        self.layers: nn.ModuleList = _getattr_path(model, self.family.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def module(self, site: str) -> nn.Module:
        if site == "embed":
            return _getattr_path(self.model, self.family.embed)
        if site == "final_norm":
            return _getattr_path(self.model, self.family.final_norm)
        match = _LAYER_SITE.match(site)
        if not match:
            raise KeyError(f"unknown site '{site}'")
        layer = self._layer(int(match.group(1)), site)
        rest = match.group(2)
        if rest is None:
            return layer
        paths = {"attn": self.family.attn, "norm1": self.family.norm1, "norm2": self.family.norm2,
                 "mlp.down_proj": self.family.down_proj, "mlp.up_proj": self.family.up_proj}
        if rest not in paths:
            raise KeyError(f"unknown site '{site}' (layer sites: {', '.join(paths)}, out)")
        if paths[rest] is None:
            raise KeyError(f"site '{site}': {self.family.name} models have no {rest} (input norm) to address")
        return _getattr_path(layer, paths[rest])

    def _layer(self, index: int, site: str) -> nn.Module:
        if not 0 <= index < self.num_layers:
            raise KeyError(f"site '{site}': layer {index} does not exist (model has {self.num_layers} layers)")
        return self.layers[index]

    def weight(self, site: str) -> WeightView:
        """`layers.{i}.mlp.down_proj.weight` (or any module's .weight) -> WeightView (row = output channel,
        col = input channel)."""
        if not site.endswith(".weight"):
            raise KeyError(f"site '{site}' is not a weight site (it should end in .weight)")
        module = self.module(site[: -len(".weight")])
        transposed = self.family.down_proj_transposed and site.endswith(("mlp.down_proj.weight", "mlp.up_proj.weight"))
        return WeightView(module.weight, transposed)

    def down_proj(self, layer: int) -> WeightView:
        return self.weight(f"layers.{layer}.mlp.down_proj.weight")

    @contextmanager
    def hooks(self, hooks: Mapping[str, Callable] | Iterable[tuple[str, Callable]]):
        """The one way to hook: `with sites.hooks({site: fn, ...}): model(ids)` calls fn(tensor) at each hook point
        while the block runs; fn may return a replacement tensor. Every handle is removed on exit, even on error
        (TransformerLens's run_with_hooks). (site, fn) pairs may repeat a site.

        Hook points: `layers.{i}.out` (block output), `<module site>.in` (its first input), `<module site>.out`,
        and inside attention `layers.{i}.attn.probs|logits|values` (read-only; see models/attention.py).
        """
        pairs = hooks.items() if isinstance(hooks, Mapping) else hooks
        with ExitStack() as stack:
            for site, fn in pairs:
                stack.callback(self.register(site, fn).remove)
            yield

    def hook(self, site: str, fn):
        """`hooks({site: fn})` for one site."""
        return self.hooks({site: fn})

    def per_layer(self, pattern: str, make_hook: Callable[[int], Callable], layers: Iterable[int] | None = None
                  ) -> dict[str, Callable]:
        """{pattern with {i} = layer: make_hook(layer)} for every layer (or `layers`), for `hooks`:
        `sites.hooks(sites.per_layer("layers.{i}.out", fold))`."""
        return {pattern.format(i=layer): make_hook(layer)
                for layer in (range(self.num_layers) if layers is None else layers)}

    def block_linears(self, match: str | None = None) -> Iterator[tuple[str, nn.Module]]:
        """(`layers.{i}.<module path>.weight`, module) for every linear layer (nn.Linear or GPT-2's Conv1D) inside
        the decoder blocks whose weight name matches the regex `match`: the one enumeration of block linears."""
        pattern = re.compile(match) if match else None
        for layer in range(self.num_layers):
            for path, module in self.module(f"layers.{layer}").named_modules():
                if isinstance(module, LINEAR_TYPES):
                    name = f"layers.{layer}.{path}.weight"
                    if pattern is None or pattern.search(name):
                        yield name, module

    def register(self, site: str, fn):
        """Attach fn at a hook point and return the handle; for hooks that live as long as an edit session
        (EditSession.hook). Everything else uses `hooks`, which removes them."""
        attention = _ATTENTION_POINT.match(site)
        if attention:
            from outlierlab.models.attention import observe
            return observe(self.model, self.module(attention.group(1)), attention.group(2), fn)
        if site.startswith("layers.") and site.count(".") == 2 and site.endswith(".out"):
            module_site, point = site[: -len(".out")], "out"  # layers.{i}.out: the block's output
        else:
            module_site, _, point = site.rpartition(".")
            if point not in _HOOK_SUFFIXES:
                raise KeyError(f"site '{site}' is not a hook point (it should end in .in or .out)")
        module = self.module(module_site)
        if point == "in":
            def pre_hook(_module, args):
                replaced = fn(args[0])
                return None if replaced is None else (replaced, *args[1:])
            return module.register_forward_pre_hook(pre_hook)

        def post_hook(_module, _args, output):
            tensor = first_tensor(output)
            replaced = fn(tensor)
            if replaced is None:
                return None
            if isinstance(output, tuple):
                return (replaced, *output[1:])
            return replaced
        return module.register_forward_hook(post_hook)
