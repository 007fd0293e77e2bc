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
    layers.{i}.norm_attn_out / .norm_mlp_out   norms of the sublayer outputs (Gemma-2/3 sandwich norms, OLMo-2)
    layers.{i}.norm_after_attn / .norm_after_mlp   post-LN norms of the residual sum, LN(x + sublayer(x)), after the
                                   attention / MLP add (BERT's attention.output.LayerNorm and output.LayerNorm): they
                                   normalise the residual stream itself, so .norm_after_mlp.out is the block output
    layers.{i}.mlp.down_proj       the MLP's output projection (".in", ".out" hook points, ".weight" its matrix)
    layers.{i}.mlp.gate_proj / .up_proj / layers.{i}.attn.o_proj   the other linears the RO study reads

Mixture-of-experts blocks (`Sites.moe_layers`; the experts are fused 3-D parameters, observed inside the experts
forward of models/experts.py; a dense block of an MoE model has the dense sites above):

    layers.{i}.mlp.experts                      the fused experts module; layers.{i}.mlp.router its router
    layers.{i}.mlp.experts.{e}.down_proj.in     expert e's activation act(gate) * up (its down_proj input) for the
                                                tokens routed to it, [routed tokens, intermediate] (hook point)
    layers.{i}.mlp.experts.{e}.down_proj.out    expert e's down_proj output before the routing weight, [routed, d]
    layers.{i}.mlp.experts.down_proj.in|out     the same for all experts at once: [routed pairs, .] sorted by expert
                                                (the order of torch.sort(router.experts.flatten()))
    layers.{i}.mlp.experts.{e}.down_proj.weight expert e's slice of the fused down_proj (WeightView, expert=e)
    layers.{i}.mlp.router.weights               routing weights of each token's top-k experts [tokens, k] (a returned
                                                tensor replaces them: the router mask of interventions/experts.py)
    layers.{i}.mlp.router.experts               the top-k expert indices [tokens, k] (read-only: load per expert)
    layers.{i}.mlp.out                          the sparse block's output (routed experts + shared expert)

Hook points inside a block, in forward order (BLOCK_POINTS; the paper-RO label is our reading of its figure, not
the paper's text: it fixes only y6 = the down_proj input of Llama/Qwen blocks and y4 = the second MLP linear's input
of GPT blocks; we number the points before them in forward order and skip the residual after attention, which
gives both anchors; `Sites.paper_label`):

    layers.{i}.attn.in             normalised attention input (norm1's output)                y1
    layers.{i}.attn.out            attention output (before any output norm)                  y2
                                   (BERT: the heads' context, before attention.output.dense = attn.o_proj.in)
    layers.{i}.norm_after_attn.out post-LN residual after attention (BERT; the MLP's input there)
    layers.{i}.mid                 residual after attention (norm2's input; observation only: a hook that returns a
                                   tensor changes what norm2 reads, not the residual carried on)
    layers.{i}.mlp.in              normalised MLP input (norm2's output)                      y3
    layers.{i}.mlp.gate_proj.out   gate output (gated MLPs)                                   y4
    layers.{i}.mlp.up_proj.out     up output (GPT-2 c_fc, OPT fc1)                            y5 (ungated: none)
    layers.{i}.mlp.act.out         activation output act(gate) * up = down_proj's input      y6 (ungated: y4)
    layers.{i}.mlp.out             MLP output (down_proj's output, before any output norm)
    layers.{i}.norm_after_mlp.out  post-LN residual after the MLP (BERT; equals the block output)
    layers.{i}.out                 block output

Adding a family is one `Family` entry in `models/families.py` (the data); this module resolves sites through it,
`models/hooks.py` attaches the functions. Nothing else in the code looks at model names. An entry is chosen by the
config's model_type and, where a type has several block layouts, by config attributes (`Family.when`); when a model
loads, `Sites` checks every module its entry names in every block, so a layout the table does not describe fails in
one line instead of giving wrong numbers.
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
from outlierlab.models import experts as fused
from outlierlab.models import offload
from outlierlab.models.families import (  # noqa: F401 (FAMILIES, Family, supported_model_types re-exported)
    ATTENTION_NORM_ROLES,
    FAMILIES,
    NORM_ROLES,
    ROLES,
    Family,
    family_for,
    supported_model_types,
)
from outlierlab.models.hooks import Handles, attach, first_tensor

# Hook points inside a block that are another module's input or output: name -> (module role, point).
BLOCK_ALIASES = {"attn.in": ("norm1", "out"), "mid": ("norm2", "in"), "mlp.in": ("norm2", "out"),
                 "mlp.act.out": ("mlp.down_proj", "in"), "mlp.out": ("mlp.down_proj", "out")}
# Every hook point inside block i, in forward order (those a model has: `Sites.block_points`).
BLOCK_POINTS = ("attn.in", "attn.out", "norm_attn_out.out", "norm_after_attn.out", "mid", "mlp.in", "mlp.gate_proj.out",
                "mlp.up_proj.out", "mlp.act.out", "mlp.out", "norm_mlp_out.out", "norm_after_mlp.out", "out")
# The points paper RO numbers y1, y2, ... (our reading; see the module docstring).
_PAPER_POINTS = ("attn.in", "attn.out", "mlp.in", "mlp.gate_proj.out", "mlp.up_proj.out", "mlp.act.out")


def _getattr_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has_path(root: nn.Module, path: str) -> bool:
    try:
        return _getattr_path(root, path) is not None
    except AttributeError:
        return False


# The module types a "linear layer" is: GPT-2's Conv1D is a linear layer stored as [in, out].
LINEAR_TYPES = (nn.Linear, Conv1D)


_LAYER_SITE = re.compile(r"^layers\.(\d+)(?:\.(.+))?$")
_HOOK_SUFFIXES = ("in", "out")
_ATTENTION_POINT = re.compile(r"^(layers\.\d+\.attn)\.(probs|logits|values)$")
_EXPERT_POINT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.(in|out)$")
_EXPERT_WEIGHT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_up_proj|up_proj)\.weight$")
_ALL_EXPERTS_POINT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.down_proj\.(in|out)$")
_ROUTER_POINT = re.compile(r"^layers\.(\d+)\.mlp\.router\.(weights|experts)$")
_EXPERT_POINTS = (_EXPERT_POINT, _ALL_EXPERTS_POINT, _ROUTER_POINT)  # hook points inside the experts forward
_MOE_MODULES = {"mlp.experts": "experts", "mlp.router": "router", "mlp.shared_expert": "shared_expert"}


@dataclass
class WeightView:
    """A matrix addressed as (row = output channel, col = input channel), whatever its storage layout."""
    param: torch.nn.Parameter
    transposed: bool
    expert: int | None = None  # one expert's matrix inside a fused 3-D parameter [experts, ., .]

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.param.shape[-2:]
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def whole(self) -> tuple:
        """The index of the whole matrix in `param` (every element, or one expert's slice)."""
        return (Ellipsis,) if self.expert is None else (self.expert,)

    def index(self, row: int, col: int) -> tuple:
        rows, cols = self.shape
        if not (0 <= row < rows and 0 <= col < cols):
            raise IndexError(f"(row={row}, col={col}) is outside the weight's shape ({rows}, {cols})")
        index = (col, row) if self.transposed else (row, col)
        return index if self.expert is None else (self.expert, *index)

    def as_out_in(self) -> torch.Tensor:
        """The matrix as [out, in]: a view of a weight in memory; of an offloaded one, a copy of it with its edits
        (models/offload.py). Edits go through WeightEdits.set, never through this tensor."""
        data = offload.values(self.param)
        matrix = data if self.expert is None else data[self.expert]
        return matrix.t() if self.transposed else matrix

    def stored(self, out_in: torch.Tensor) -> torch.Tensor:
        """An [out, in] matrix in this weight's storage layout (for `WeightEdits.set(param, view.whole, ...)`)."""
        return out_in.t() if self.transposed else out_in


class Sites:
    """Resolves site names to modules, parameters and hook points for one loaded model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_for(model.config)
        self.layers: nn.ModuleList = _getattr_path(model, self.family.layers)
        self._names: dict[int, str] | None = None
        self._validate()

    def _validate(self) -> None:
        """Every module the family's table names exists in every block, and down_proj is a linear layer (or, in an
        MoE family, the block holds fused experts and a router): a layout the table does not describe (a renamed
        norm, an MoE block in a dense family) fails here, in one line, when the
        model loads, not as a wrong number later."""
        model_type, family = self.model.config.model_type, self.family
        for site, path in (("embed", family.embed), ("final_norm", family.final_norm)):
            if path is not None and not _has_path(self.model, path):
                raise UnsupportedArchitecture(f"this {model_type} model has no {path} (the {family.name} table's "
                                              f"{site}); its layout is not the one models/sites.py describes")
        self.moe_layers: list[int] = []
        for layer in range(self.num_layers):
            for role in family.required_roles():
                if not _has_path(self.layers[layer], family.path(role)):
                    raise UnsupportedArchitecture(
                        f"this {model_type} model's layers.{layer} has no {family.path(role)} (the {family.name} "
                        f"table's {role}); its layout is not the one models/sites.py describes")
            if family.moe and self._validate_moe(layer):
                self.moe_layers.append(layer)
                continue
            down_proj = _getattr_path(self.layers[layer], family.down_proj)
            if not isinstance(down_proj, LINEAR_TYPES):
                raise UnsupportedArchitecture(
                    f"this {model_type} model's layers.{layer}.{family.down_proj} is a {type(down_proj).__name__}, "
                    "not a linear layer (a mixture-of-experts MLP has no single down_proj)")

    def _validate_moe(self, layer: int) -> bool:
        """Whether block `layer` of an MoE family is sparse (fused experts and a router) rather than dense (a linear
        down_proj); neither fails in one line."""
        block, family = self.layers[layer], self.family
        if _has_path(block, family.down_proj) and isinstance(_getattr_path(block, family.down_proj), LINEAR_TYPES):
            return False
        for role, path in (("experts", family.experts), ("router", family.router)):
            if not _has_path(block, path):
                raise UnsupportedArchitecture(
                    f"this {self.model.config.model_type} model's layers.{layer} has neither a linear "
                    f"{family.down_proj} nor {path} (the {family.name} table's {role})")
        if not fused.is_fused_experts(_getattr_path(block, family.experts)):
            raise UnsupportedArchitecture(
                f"this {self.model.config.model_type} model's layers.{layer}.{family.experts} is not a fused experts "
                "module (3-D down_proj, transformers' use_experts_implementation)")
        return True

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def num_experts(self, layer: int) -> int:
        """The number of routed experts of MoE block `layer`."""
        return self._experts(layer, f"layers.{layer}.mlp.experts").num_experts

    def _experts(self, layer: int, site: str) -> nn.Module:
        self._layer(layer, site)
        if layer not in self.moe_layers:
            kind = "dense" if self.family.moe else f"a {self.family.name} block, not a mixture of experts"
            raise KeyError(f"site '{site}': layers.{layer} is {kind} (MoE layers: {self.moe_layers or 'none'})")
        return _getattr_path(self.layers[layer], self.family.experts)

    def _expert(self, layer: int, expert: int, site: str) -> nn.Module:
        experts = self._experts(layer, site)
        if not 0 <= expert < experts.num_experts:
            raise KeyError(f"site '{site}': expert {expert} does not exist (layers.{layer} has "
                           f"{experts.num_experts} experts)")
        return experts

    def super_weight_view(self, weight) -> WeightView:
        """The matrix a super weight (models/coords.SuperWeight) lives in: down_proj, or an expert's down_proj."""
        if getattr(weight, "expert", None) is None:
            return self.down_proj(weight.layer)
        return self.weight(f"layers.{weight.layer}.mlp.experts.{weight.expert}.down_proj.weight")

    @property
    def attention_observable(self) -> bool:
        """Whether `layers.{i}.attn.probs|logits|values` can be observed (models/attention.py): the attention goes
        through transformers' AttentionInterface. Recorded when the model loads; observing fails in one line."""
        from outlierlab.models.attention import observable
        return observable(self.module("layers.0.attn"))

    def module(self, site: str) -> nn.Module:
        if site == "embed":
            return _getattr_path(self.model, self.family.embed)
        if site == "final_norm":
            if self.family.final_norm is None:
                raise KeyError(f"site 'final_norm': {self.family.name} models have no norm before the LM head")
            return _getattr_path(self.model, self.family.final_norm)
        match = _LAYER_SITE.match(site)
        if not match:
            raise KeyError(f"unknown site '{site}'")
        layer = self._layer(int(match.group(1)), site)
        rest = match.group(2)
        if rest is None:
            return layer
        family = self.family
        if rest in _MOE_MODULES and family.moe:
            path = getattr(family, _MOE_MODULES[rest])
            if path is None or not _has_path(layer, path):
                raise KeyError(f"site '{site}': this model's layers.{match.group(1)} has no {rest}")
            return _getattr_path(layer, path)
        if rest not in ROLES:
            raise KeyError(f"unknown site '{site}' (layer sites: {', '.join(ROLES)}, out)")
        path = family.path(rest)
        if path is None:
            raise KeyError(f"site '{site}': {family.name} models have no {rest} to address")
        try:
            return _getattr_path(layer, path)
        except AttributeError:
            raise KeyError(f"site '{site}': this {self.model.config.model_type} model has no {path} "
                           f"(the {family.name} table's {rest})") from None

    def has(self, site: str) -> bool:
        """Whether `site` (a module site or a hook point) exists in this model."""
        try:
            match = _LAYER_SITE.match(site)
            if any(point.match(site) for point in _EXPERT_POINTS):
                self._expert_target(site)
            elif _EXPERT_WEIGHT.match(site):
                self.weight(site)
            elif site.endswith((".in", ".out")) or (match and match.group(2) in BLOCK_ALIASES):
                self._hook_target(site)
            else:
                self.module(site)
            return True
        except KeyError:
            return False

    def block_points(self, layer: int) -> list[str]:
        """The hook points inside block `layer` that this model has, in forward order (BLOCK_POINTS)."""
        return [f"layers.{layer}.{point}" for point in BLOCK_POINTS if self.has(f"layers.{layer}.{point}")]

    def paper_label(self, point: str) -> str | None:
        """Paper RO's y1..y6 for a block point (`mlp.act.out` or `layers.3.mlp.act.out`); our reading."""
        point = _LAYER_SITE.match(point).group(2) if point.startswith("layers.") else point
        numbered = [p for p in _PAPER_POINTS if self.has(f"layers.0.{p}")]
        if "mlp.gate_proj.out" not in numbered:  # ungated MLP: its first linear + activation are one point, y4
            numbered = [p for p in numbered if p != "mlp.up_proj.out"]
        return f"y{numbered.index(point) + 1}" if point in numbered else None

    def norms(self, layer: int) -> list[str]:
        """The norm sites of block `layer` that this model has and that have a learned gain, in forward order."""
        sites = [f"layers.{layer}.{role}" for role in NORM_ROLES if self.has(f"layers.{layer}.{role}")]
        return [site for site in sites if self._has_gain(site)]

    def all_norms(self, attention: bool = False) -> list[str]:
        """The one enumeration of a model's norms with a learned gain, in forward order: every block's `norms`
        (with `attention`, then that block's query/key norms), then final_norm. Probes, the atlas, fine-tuning and
        the RO study all take their norms from here."""
        found = []
        for layer in range(self.num_layers):
            found += self.norms(layer)
            if attention:
                found += [site for role in ATTENTION_NORM_ROLES
                          if self.has(site := f"layers.{layer}.{role}") and self._has_gain(site)]
        if self.family.final_norm is not None and self._has_gain("final_norm"):
            found.append("final_norm")
        return found

    def _has_gain(self, site: str) -> bool:
        return getattr(self.module(site), "weight", None) is not None

    def module_name(self, site: str) -> str:
        """A module site's name in model.named_modules() (`layers.3.norm2` -> `model.layers.3.post_attention_layernorm`),
        the key records and optimizers use."""
        if self._names is None:
            self._names = {id(module): name for name, module in self.model.named_modules()}
        return self._names[id(self.module(site))]

    @staticmethod
    def layer_of(site: str) -> int | None:
        """The block a site is in (`layers.3.norm2` -> 3), None for a model-level site (embed, final_norm)."""
        match = _LAYER_SITE.match(site)
        return int(match.group(1)) if match else None

    def norm_gain(self, site: str) -> torch.Tensor:
        """The gain a norm multiplies by, norm_gain_offset + w, as float32 (a new tensor): the one gain reading."""
        return offload.values(self.module(site).weight).detach().float() + self.family.norm_gain_offset

    def _layer(self, index: int, site: str) -> nn.Module:
        if not 0 <= index < self.num_layers:
            raise KeyError(f"site '{site}': layer {index} does not exist (model has {self.num_layers} layers)")
        return self.layers[index]

    def weight(self, site: str) -> WeightView:
        """`layers.{i}.mlp.down_proj.weight` (or any module's .weight) -> WeightView (row = output channel,
        col = input channel)."""
        if not site.endswith(".weight"):
            raise KeyError(f"site '{site}' is not a weight site (it should end in .weight)")
        expert = _EXPERT_WEIGHT.match(site)
        if expert:
            layer, index, name = int(expert.group(1)), int(expert.group(2)), expert.group(3)
            experts = self._expert(layer, index, site)
            if not isinstance(getattr(experts, name, None), torch.Tensor):
                raise KeyError(f"site '{site}': layers.{layer}'s experts have no fused {name}")
            return WeightView(getattr(experts, name), experts.is_transposed, index)
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
        the block points of BLOCK_POINTS (`layers.{i}.attn.in|mid|mlp.in|mlp.act.out|mlp.out`), and inside
        attention `layers.{i}.attn.probs|logits|values` (read-only; see models/attention.py).
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

    def block_weights(self, match: str | None = None) -> Iterator[tuple[str, WeightView]]:
        """(weight site, WeightView) of every matrix inside the decoder blocks whose site matches the regex `match`:
        the linears of `block_linears` and, in MoE blocks, each expert's slice of the fused gate_up_proj / down_proj
        (`layers.{i}.mlp.experts.{e}.gate_up_proj.weight`); for edits that treat every matrix alike (RTN)."""
        pattern = re.compile(match) if match else None
        for name, module in self.block_linears(match):
            yield name, WeightView(module.weight, transposed=isinstance(module, Conv1D))
        for layer in self.moe_layers:
            experts = self._experts(layer, f"layers.{layer}.mlp.experts")
            for matrix in ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj"):
                for expert in range(experts.num_experts):
                    name = f"layers.{layer}.mlp.experts.{expert}.{matrix}.weight"
                    if pattern is None or pattern.search(name):
                        yield name, self.weight(name)

    def moe_input_weights(self, layer: int) -> list[tuple[str, WeightView]]:
        """The matrices that read MoE block `layer`'s input (the MLP norm's output): the router, every expert's
        gate_up_proj (or up_proj), the shared expert's input projections and any other linear of the sparse block
        (SmoothQuant scales them together)."""
        experts = self._experts(layer, f"layers.{layer}.mlp.experts")
        router = self.module(f"layers.{layer}.mlp.router")
        weights = [(f"layers.{layer}.mlp.router.weight", WeightView(router.weight, transposed=False))]
        matrix = "gate_up_proj" if experts.has_gate else "up_proj"
        weights += [(name, self.weight(name)) for name in
                    (f"layers.{layer}.mlp.experts.{e}.{matrix}.weight" for e in range(experts.num_experts))]
        if self.family.shared_expert is not None:
            shared = self.module(f"layers.{layer}.mlp.shared_expert")
            weights += [(f"layers.{layer}.mlp.shared_expert.{name}.weight", WeightView(linear.weight, False))
                        for name, linear in shared.named_children() if name in ("gate_proj", "up_proj")]
        block = _getattr_path(self.layers[layer], self.family.moe_block)
        weights += [(f"layers.{layer}.{self.family.moe_block}.{name}.weight", WeightView(linear.weight, False))
                    for name, linear in block.named_children()  # Qwen2-MoE's shared_expert_gate reads it too
                    if isinstance(linear, nn.Linear) and linear is not router]
        return weights

    def _hook_target(self, site: str) -> tuple[nn.Module, str, str | None]:
        """(module, "in" | "out", block role or None) that hook point `site` reads."""
        match = _LAYER_SITE.match(site)
        if match and match.group(2) == "mid" and self.family.parallel_blocks:
            raise KeyError(f"site '{site}': {self.family.name} blocks run attention and the MLP in parallel on the "
                           "block input; there is no residual after attention")
        if match and match.group(2) in ("mlp.out", "mlp.act.out") and int(match.group(1)) in self.moe_layers:
            if match.group(2) == "mlp.act.out":
                raise KeyError(f"site '{site}': layers.{match.group(1)} is a mixture of experts; each expert's "
                               "activation is layers.{i}.mlp.experts.{e}.down_proj.in")
            return _getattr_path(self.layers[int(match.group(1))], self.family.moe_block), "out", None
        if match and match.group(2) in BLOCK_ALIASES:
            role, point = BLOCK_ALIASES[match.group(2)]
            return self.module(f"layers.{match.group(1)}.{role}"), point, role
        if match and match.group(2) == "out":
            return self.module(site[: -len(".out")]), "out", None  # layers.{i}.out: the block's output
        module_site, _, point = site.rpartition(".")
        if point not in _HOOK_SUFFIXES:
            raise KeyError(f"site '{site}' is not a hook point (it should end in .in or .out)")
        role = _LAYER_SITE.match(module_site)
        return self.module(module_site), point, role.group(2) if role else None

    def register(self, site: str, fn):
        """Attach fn at a hook point and return the handle; for hooks that live as long as an edit session
        (EditSession.hook). Everything else uses `hooks`, which removes them."""
        attention = _ATTENTION_POINT.match(site)
        if attention:
            from outlierlab.models.attention import observe
            return observe(self.model, self.module(attention.group(1)), attention.group(2), fn)
        if any(point.match(site) for point in _EXPERT_POINTS):
            experts, key = self._expert_target(site)
            return fused.tap(self.model, experts, key, fn)
        module, point, role = self._hook_target(site)
        if self.family.flat_mlp and role in _FLAT_MLP_ROLES:
            return self._register_unflattened(int(_LAYER_SITE.match(site).group(1)), module, point, fn)
        return attach(module, point, fn)

    def _expert_target(self, site: str) -> tuple[nn.Module, object]:
        """(experts module, tap key) of an expert or router site (models/experts.py)."""
        router = _ROUTER_POINT.match(site)
        if router:
            return self._experts(int(router.group(1)), site), f"router.{router.group(2)}"
        every = _ALL_EXPERTS_POINT.match(site)
        if every:
            return self._experts(int(every.group(1)), site), ("all", every.group(2))
        layer, expert, point = _EXPERT_POINT.match(site).groups()
        return self._expert(int(layer), int(expert), site), (int(expert), point)

    def register_linear(self, name: str, point: str, fn):
        """`register` for a linear of `block_linears` by its weight name (`layers.{i}.<path>.weight`) at its "in" or
        "out": fn gets [batch, positions, channels] on every family (OPT's flattened MLP included)."""
        match = _LAYER_SITE.match(name.removesuffix(".weight"))
        layer, path = int(match.group(1)), match.group(2)
        module = self.layers[layer].get_submodule(path)
        flattened = {self.family.path(role) for role in _FLAT_MLP_ROLES} if self.family.flat_mlp else set()
        if path in flattened:
            return self._register_unflattened(layer, module, point, fn)
        return attach(module, point, fn)

    def _register_unflattened(self, layer: int, module: nn.Module, point: str, fn):
        """A hook on a flattened MLP module (OPT) that hands fn [batch, positions, channels], the shape of the block
        input this forward, and flattens fn's replacement back."""
        shape: list[tuple[int, int]] = []

        def remember(_block, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            shape[:] = [tuple(hidden.shape[:2])]

        def unflattened(tensor: torch.Tensor):
            replaced = fn(tensor.view(*shape[0], tensor.shape[-1]))
            return None if replaced is None else replaced.reshape(tensor.shape)

        handles = [self.layers[layer].register_forward_pre_hook(remember, with_kwargs=True)]
        if point == "in":
            handles.append(module.register_forward_pre_hook(
                lambda _module, args: None if (r := unflattened(args[0])) is None else (r, *args[1:])))
        else:
            handles.append(module.register_forward_hook(lambda _module, _args, output: unflattened(output)))
        return Handles(handles)



# The block roles inside OPT's flattened MLP path (Family.flat_mlp).
_FLAT_MLP_ROLES = ("norm2", "mlp.up_proj", "mlp.down_proj")
