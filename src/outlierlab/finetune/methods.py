"""Fine-tuning methods as parameter selections over the model (and LoRA through HF peft).

Every method returns a `Selection`: the parameters the optimizer holds, which of them are active at a step (LISA's
layer sampling), which elements of them must not change (restored bit-exactly after every optimizer step and
masked out of the gradients), and what it claims to train (names and element counts), which the tests check
against what changed. Parameters are found through the sites table (blocks, down_proj, embeddings) and module types
(norm modules, block linears), never by model name.

    full               every parameter
    lora               HF peft LoRA on every block linear (rank finetune.lora.r); merged into the weights after training
    norm_only          every norm gain (and bias): PEFT transferability, arXiv 2302.00378
    lisa               LISA, arXiv 2403.17919: `layers` blocks sampled uniformly every `period` steps; the embeddings
                       and the LM head always train
    owl_lisa           OwLore's sampling, arXiv 2405.18380: as lisa, blocks sampled in proportion to OWL's layer
                       outlier ratio (full-rank updates)
    owlore             OwLore, arXiv 2405.18380: owl_lisa's sampling + GaLore's low-rank gradient projection (rank
                       finetune.method.galore.rank, finetune/galore.py) for the sampled blocks' linear weights
    outlier_guided     what the atlas found: norm-gain channels (gamma outliers + MA channels), the MA-writing rows of
                       every down_proj, the super weights' down_proj columns, then whole tensors of the MA layers up
                       to the trainable budget (LoRA's count)
    outlier_protected  trains like `base` (full or lora) but the super weights and the norm gains of the outlier
                       channels (gamma outliers, MA channels, LLM.int8 channel outliers) stay bit-identical
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from torch import nn

from outlierlab.finetune.atlas import Atlas, block_linears, norm_modules

METHODS = ("full", "lora", "norm_only", "lisa", "owl_lisa", "owlore", "outlier_guided", "outlier_protected")
SAMPLED = ("lisa", "owl_lisa", "owlore")  # LISA's layer schedule


@dataclass
class Selection:
    method: str
    model: nn.Module  # what the loop calls (a PeftModel for LoRA)
    params: dict[str, nn.Parameter]  # everything the optimizer holds
    keep: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> bool mask of elements that must not change
    schedule: list[list[int]] | None = None  # LISA: active blocks per period
    period: int = 1
    always: list[str] = field(default_factory=list)  # LISA: names active in every period
    layer_of: dict[str, int] = field(default_factory=dict)  # LISA: block index of each block parameter
    notes: dict = field(default_factory=dict)
    peft: bool = False
    restore_after_merge: dict = field(default_factory=dict)  # name -> (parameter, mask): outlier_protected on LoRA
    galore: dict | None = None  # OwLore: {"names": projected 2-D tensors, "rank", "update_gap", "scale"}
    _saved: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _hooks: list = field(default_factory=list, repr=False)

    def active_names(self, step: int) -> list[str]:
        if self.schedule is None:
            return list(self.params)
        layers = set(self.schedule[min(step // self.period, len(self.schedule) - 1)])
        return [n for n in self.params if n in self.always or self.layer_of.get(n) in layers]

    def activate(self, step: int) -> None:
        active = set(self.active_names(step))
        for name, param in self.params.items():
            param.requires_grad_(name in active)

    def prepare(self) -> None:
        """Save the elements that must not change and mask them out of the gradients."""
        for name, keep in self.keep.items():
            param = self.params[name]
            self._saved[name] = param.data[keep].clone()
            train = (~keep).to(param.dtype)
            self._hooks.append(param.register_hook(lambda grad, train=train: grad * train))

    @torch.no_grad()
    def enforce(self) -> None:
        """Write the kept elements back (weight decay and Adam's moments cannot move them either)."""
        for name, keep in self.keep.items():
            self.params[name].data[keep] = self._saved[name]

    def release(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def claimed(self) -> dict[str, int]:
        """name -> number of elements this method trains over the whole run."""
        names = set(self.params)
        if self.schedule is not None:
            layers = {layer for period in self.schedule for layer in period}
            names = {n for n in self.params if n in self.always or self.layer_of.get(n) in layers}
        counts = {}
        for name in sorted(names):
            keep = self.keep.get(name)
            counts[name] = int(self.params[name].numel() - (int(keep.sum()) if keep is not None else 0))
        return {n: c for n, c in counts.items() if c}

    def trainable_at_once(self) -> int:
        """Elements trainable at one step (LISA: the largest period; the rest: everything claimed)."""
        if self.schedule is None:
            return sum(self.claimed().values())
        return max(sum(self.params[n].numel() for n in self.active_names(p * self.period))
                   for p in range(len(self.schedule)))


def _named(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())  # tied weights appear once


def _name_of(model: nn.Module, tensor: torch.Tensor) -> str:
    for name, param in model.named_parameters():
        if param is tensor:
            return name
    raise KeyError("parameter not found in the model")


def lora_targets(sites) -> list[str]:
    return list(block_linears(sites))


def lora_budget(sites, rank: int) -> int:
    """LoRA's trainable count at rank r on every block linear: r x (in + out) each."""
    total = 0
    for _layer, module, transposed in block_linears(sites).values():
        rows, cols = module.weight.shape
        total += rank * (rows + cols)
    return total


def _norm_channels(model: nn.Module, sites, gamma_outliers: dict[str, list[int]], extra: list[int]
                   ) -> dict[str, torch.Tensor]:
    """Per norm gain: a bool mask of its outlier channels (that norm's gamma outliers + `extra` channels)."""
    masks = {}
    for name, module in norm_modules(sites).items():
        mask = torch.zeros_like(module.weight, dtype=torch.bool)
        channels = [c for c in {*gamma_outliers.get(name, []), *extra} if c < mask.numel()]
        if channels:
            mask[channels] = True
            masks[_name_of(model, module.weight)] = mask
    return masks


def _down_proj_mask(sites, layer: int, rows=(), cols=()) -> tuple[nn.Parameter, torch.Tensor]:
    view = sites.down_proj(layer)
    mask = torch.zeros(view.shape, dtype=torch.bool)  # (row = output channel, col = input channel)
    for row in rows:
        mask[row, :] = True
    for col in cols:
        mask[:, col] = True
    return view.param, (mask.t() if view.transposed else mask)


def _merge(masks: dict[str, torch.Tensor], name: str, mask: torch.Tensor) -> None:
    masks[name] = masks[name] | mask if name in masks else mask


def select(method_cfg, loaded, atlas: Atlas | None, lora_cfg, seed: int, steps: int) -> Selection:
    """The method's Selection on `loaded` (the model's requires_grad flags are set accordingly)."""
    kind = method_cfg.kind
    model, sites = loaded.model, loaded.sites
    model.requires_grad_(False)
    if kind == "outlier_protected":
        protect = _protected(model, loaded, atlas, method_cfg.protect)  # names on the unwrapped model
        tensors = {name: model.get_parameter(name) for name in protect}
        selection = select(OmegaConf.merge(method_cfg, {"kind": method_cfg.base}), loaded, atlas, lora_cfg, seed, steps)
        if selection.peft:  # LoRA never moves the base weights; the merge does: merge_into restores them after it
            selection.restore_after_merge = {name: (tensors[name], mask) for name, mask in protect.items()}
        else:
            selection.keep = protect
        selection.method = "outlier_protected"
        selection.notes.update(base=method_cfg.base, protected={n: int(m.sum()) for n, m in protect.items()})
        return selection
    if kind == "lora":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                            target_modules=lora_targets(sites), bias="none")
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global RNG: pin it to the run's seed
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, config)
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        return Selection("lora", peft_model, params, peft=True,
                         notes={"rank": lora_cfg.r, "alpha": lora_cfg.alpha, "targets": len(config.target_modules)})
    named = _named(model)
    if kind == "full":
        return _static("full", model, named)
    if kind == "norm_only":
        names = {_name_of(model, p) for module in norm_modules(sites).values() for p in module.parameters()}
        return _static("norm_only", model, {n: named[n] for n in names})
    if kind in SAMPLED:
        selection = _lisa(kind, method_cfg, model, sites, atlas, named, seed, steps)
        if kind == "owlore":
            selection.galore = _galore(method_cfg.galore, model, sites, selection)
            selection.notes["galore"] = {k: v for k, v in selection.galore.items() if k != "names"}
            selection.notes["galore"]["projected_tensors"] = len(selection.galore["names"])
        return selection
    if kind == "outlier_guided":
        return _guided(method_cfg, model, sites, atlas, named, lora_budget(sites, lora_cfg.r))
    raise ValueError(f"finetune.method.kind={kind} is not one of: {', '.join(METHODS)}")


def _static(method: str, model, params: dict[str, nn.Parameter], **kw) -> Selection:
    for param in params.values():
        param.requires_grad_(True)
    return Selection(method, model, params, **kw)


def _lisa(kind, cfg, model, sites, atlas, named, seed: int, steps: int) -> Selection:
    layer_of = {}
    for layer, block in enumerate(sites.layers):
        for param in block.parameters():
            layer_of[_name_of(model, param)] = layer
    always = []
    if cfg.embeddings:
        always.append(_name_of(model, sites.module("embed").weight))
        head = model.get_output_embeddings()
        if head is not None:
            always.append(_name_of(model, head.weight))
    always = sorted(set(always))
    if kind in ("owl_lisa", "owlore"):
        ratios = torch.tensor(atlas.layer_outlier_ratio, dtype=torch.float64)
        if float(ratios.sum()) <= 0:
            raise ValueError("owl_lisa: every layer's outlier ratio is 0 (raise nothing: lower exp.atlas.owl_multiple)")
        probabilities = ratios / ratios.sum()
    else:
        probabilities = torch.full((sites.num_layers,), 1.0 / sites.num_layers, dtype=torch.float64)
    count = min(int(cfg.layers), sites.num_layers)
    schedule = []
    for period in range((steps + cfg.period - 1) // cfg.period):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + period)
        schedule.append(sorted(torch.multinomial(probabilities, count, replacement=False,
                                                 generator=generator).tolist()))
    params = {n: named[n] for n in named if n in layer_of or n in always}
    return Selection(kind, model, params, schedule=schedule, period=int(cfg.period), always=always,
                     layer_of=layer_of, notes={"probabilities": probabilities.tolist(), "schedule": schedule,
                                               "layers_per_period": count, "period": int(cfg.period)})


def _galore(cfg, model, sites, selection: Selection) -> dict:
    """OwLore's projected tensors: the weight of every block linear (GaLore projects the attention and MLP
    matrices; norms, embeddings and the LM head take plain Adam)."""
    names = [_name_of(model, module.weight) for _layer, module, _t in block_linears(sites).values()]
    names = [n for n in names if n in selection.params and selection.params[n].dim() == 2]
    if int(cfg.rank) < 1 or int(cfg.update_gap) < 1:
        raise ValueError(f"finetune.method.galore.rank={cfg.rank} and .update_gap={cfg.update_gap} must be >= 1")
    return {"names": names, "rank": int(cfg.rank), "update_gap": int(cfg.update_gap), "scale": float(cfg.scale)}


def _guided(cfg, model, sites, atlas, named, budget: int | None) -> Selection:
    """Train masks: norm-gain outlier channels, MA rows of every down_proj, SW columns, then MA-layer tensors."""
    train: dict[str, torch.Tensor] = {}
    parts = list(cfg.parts)
    if "gamma" in parts:
        for name, mask in _norm_channels(model, sites, atlas.gamma_outliers, atlas.ma_channels).items():
            _merge(train, name, mask)
    if "ma_rows" in parts and atlas.ma_channels:
        for layer in range(sites.num_layers):
            param, mask = _down_proj_mask(sites, layer, rows=atlas.ma_channels)
            _merge(train, _name_of(model, param), mask)
    if "sw_cols" in parts:
        for weight in atlas.super_weights:
            param, mask = _down_proj_mask(sites, weight.layer, cols=[weight.col])
            _merge(train, _name_of(model, param), mask)
    limit = budget if cfg.budget == "lora" else None
    added = []
    if "ma_layers" in parts:
        for layer in atlas.ma_layers:
            for param in sites.layers[layer].parameters():
                name = _name_of(model, param)
                count = sum(int(m.sum()) for m in train.values())
                extra = param.numel() - int(train[name].sum()) if name in train else param.numel()
                if limit is not None and count + extra > limit:
                    continue
                train[name] = torch.ones_like(param, dtype=torch.bool)
                added.append(name)
    if not train:
        raise ValueError("outlier_guided: the atlas found nothing to train (no super weight, massive activation or "
                         "gamma outlier on this model)")
    params = {n: named[n] for n in train}
    keep = {n: ~m for n, m in train.items() if not bool(m.all())}
    selection = _static("outlier_guided", model, params, keep=keep)
    selection.notes = {"budget": limit, "parts": parts, "whole_tensors_from_ma_layers": added,
                       "ma_channels": atlas.ma_channels, "ma_layers": atlas.ma_layers,
                       "super_weights": [str(w) for w in atlas.super_weights]}
    return selection


def _protected(model, loaded, atlas: Atlas, protect) -> dict[str, torch.Tensor]:
    """Bool masks of the protected elements: super weights, and the norm gains of the outlier channels."""
    masks: dict[str, torch.Tensor] = {}
    if "super_weights" in protect:
        for weight in atlas.super_weights:
            view = loaded.sites.down_proj(weight.layer)
            mask = torch.zeros_like(view.param, dtype=torch.bool)
            mask[view.index(weight.row, weight.col)] = True
            _merge(masks, _name_of(model, view.param), mask)
    extra = [*(atlas.ma_channels if "ma_channels" in protect else []),
             *(atlas.channel_outliers if "channel_outliers" in protect else [])]
    gammas = atlas.gamma_outliers if "gamma_outliers" in protect else {}
    for name, mask in _norm_channels(model, loaded.sites, gammas, sorted(set(extra))).items():
        _merge(masks, name, mask)
    return masks


@torch.no_grad()
def merge_into(selection: Selection, loaded) -> dict:
    """After training: LoRA is merged into the weights (peft merge_and_unload); outlier_protected on LoRA writes
    the protected elements back. Returns what was done."""
    if not selection.peft:
        return {"merged": False}
    saved = {name: (param, mask, param.data[mask].clone())
             for name, (param, mask) in selection.restore_after_merge.items()}
    merged = selection.model.merge_and_unload()
    if merged is not loaded.model:
        raise RuntimeError("peft merge_and_unload returned a different model object")
    for param, mask, values in saved.values():
        param.data[mask] = values
    return {"merged": True, "restored_after_merge": {n: int(m.sum()) for n, (_p, m, _v) in saved.items()}}
