"""Models bigger than memory: accelerate's dispatch and offload, with edits that act on the offloaded weights.

Under `model.device_map`, accelerate keeps each offloaded module's weights on the `meta` device behind an
`AlignDevicesHook`, which loads them from its `weights_map` (the checkpoint's safetensors, or the offload folder) at
every forward and drops them after; writing `param.data` there writes nothing a forward uses. So, on every offloaded
module, `install` appends an `EditOverlay` (an accelerate ModelHook that runs after the AlignDevicesHook has loaded
the weight) that

- applies the patches `WeightEdits.set` recorded (`patch`) to a copy of the loaded weight: the store is never
  written, and removing the patches (`unpatch`) gives the stored weights back bit-exactly;
- tags the module's meta parameters with their home, so `values(param)` reads what a forward would use (stored
  tensor + patches) wherever the parameter lives, and hashing and every reader of weights see the real ones.

`resident(module)` loads a module's weights once and keeps them until exit (the layer-major passes,
probes/layer_major.py). Checked on transformers 5.23 + accelerate 1.15: a plain torch pre-hook runs before
accelerate loads the weight; the appended ModelHook runs after it (design.md, "Scale").
"""
from __future__ import annotations

import hashlib
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook, add_hook_to_module
from accelerate.utils import named_module_tensors, set_module_tensor_to_device

_HOME = "_outlierlab_home"  # attribute on an offloaded parameter: (weakref to its module, tensor name)
SPILL_BYTES = 1 << 20  # a patch larger than this (a whole-matrix edit) is kept on disk, not in memory


@dataclass
class Patch:
    """`tensor[index] = values`, recorded by `owner` (a WeightEdits); large values live in a file (`spilled`)."""
    owner: object
    index: tuple
    values: torch.Tensor | float
    spilled: Path | None = None

    def load(self):
        if self.spilled is None:
            return self.values
        return torch.load(self.spilled, mmap=True, weights_only=True)


def _align(module) -> AlignDevicesHook | None:
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else (hook,)
    return next((h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload), None)


def _overlay(module) -> EditOverlay | None:
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else (hook,)
    return next((h for h in hooks if isinstance(h, EditOverlay)), None)


def _tensor(module, name: str) -> torch.Tensor:
    owner, _, attribute = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attribute)


class EditOverlay(ModelHook):
    """The edits of one offloaded module, applied after its AlignDevicesHook loaded the stored weights."""

    def __init__(self, align: AlignDevicesHook, spill_dir: Path | None):
        self.align = align
        self.spill_dir = spill_dir
        self.patches: dict[str, list[Patch]] = {}
        self.resident = False  # weights held by `resident`: nothing to load or drop per forward

    def names(self, module) -> list[str]:
        return [name for name, _ in named_module_tensors(module, include_buffers=self.align.offload_buffers,
                                                         recurse=self.align.place_submodules,
                                                         remove_non_persistent=True)]

    def tag(self, module) -> None:
        for name in self.names(module):
            setattr(_tensor(module, name), _HOME, (weakref.ref(module), name))

    def current(self, name: str) -> torch.Tensor:
        """The tensor a forward uses: the stored one with this module's patches applied, on the execution device."""
        return self._patched(self.align.weights_map[name].to(self.align.execution_device), name)

    def _patched(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        patches = self.patches.get(name)
        if not patches:
            return tensor
        tensor = tensor.clone()  # the loaded tensor may be the store itself (a CPU-offloaded state dict)
        for patch in patches:
            index = tuple(i.to(tensor.device) if isinstance(i, torch.Tensor) else i for i in patch.index)
            values = patch.load()
            tensor[index] = values.to(tensor.device) if isinstance(values, torch.Tensor) else values
        return tensor

    def pre_forward(self, module, *args, **kwargs):
        if not self.resident:
            for name in self.patches:
                if self.patches[name]:
                    self._set(module, name, self._patched(_tensor(module, name), name))
        return args, kwargs

    def post_forward(self, module, output):
        if not self.resident:
            self.tag(module)  # the AlignDevicesHook put new meta parameters in place
        return output

    def _set(self, module, name: str, value: torch.Tensor) -> None:
        set_module_tensor_to_device(module, name, value.device, value=value)
        setattr(_tensor(module, name), _HOME, (weakref.ref(module), name))

    def add(self, module, name: str, patch: Patch) -> None:
        if (self.spill_dir is not None and isinstance(patch.values, torch.Tensor)
                and patch.values.numel() * patch.values.element_size() > SPILL_BYTES):
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            patch.spilled = self.spill_dir / f"{os.getpid()}-{id(patch)}.pt"
            torch.save(patch.values.contiguous(), patch.spilled)
            patch.values = None
        self.patches.setdefault(name, []).append(patch)
        if self.resident:
            self._set(module, name, self.current(name))

    def remove(self, module, owner) -> None:
        for name, patches in self.patches.items():
            for patch in patches:
                if patch.owner is owner and patch.spilled is not None:
                    patch.spilled.unlink(missing_ok=True)
            patches[:] = [patch for patch in patches if patch.owner is not owner]
            if self.resident:
                self._set(module, name, self.current(name))


def install(model: torch.nn.Module, spill_dir: Path | None = None) -> int:
    """An EditOverlay on every offloaded module of a dispatched model; returns how many modules are offloaded."""
    count = 0
    for module in model.modules():
        align = _align(module)
        if align is None or _overlay(module) is not None:
            continue
        overlay = EditOverlay(align, spill_dir)
        add_hook_to_module(module, overlay, append=True)
        overlay.tag(module)
        count += 1
    return count


def home(param: torch.Tensor):
    """(module, tensor name) of an offloaded parameter, or None for one held in memory."""
    tag = getattr(param, _HOME, None)
    if tag is None:
        return None
    module = tag[0]()
    return None if module is None else (module, tag[1])


def values(param: torch.Tensor) -> torch.Tensor:
    """What a forward would use now: `param.data` in memory, the stored tensor + edits when offloaded (a copy)."""
    where = home(param)
    if where is None or param.device.type != "meta":
        return param.data
    module, name = where
    return _overlay(module).current(name)


def device(param: torch.Tensor) -> torch.device:
    """Where a forward computes with `param` (its execution device when offloaded, never meta)."""
    where = home(param)
    if where and param.device.type == "meta":  # accelerate names it as it was given: "cpu", 0, or a device
        return torch.device(_overlay(where[0]).align.execution_device)
    return param.device


def patch(param: torch.Tensor, index: tuple, values_, owner) -> None:
    """Record `param[index] = values_` for an offloaded parameter (applied at every forward until `unpatch`)."""
    module, name = home(param)
    stored = values_.detach().to("cpu", copy=True) if isinstance(values_, torch.Tensor) else values_
    index = tuple(i.to("cpu") if isinstance(i, torch.Tensor) else i for i in index)
    _overlay(module).add(module, name, Patch(owner, index, stored))


def unpatch(model: torch.nn.Module, owner) -> None:
    """Remove every patch `owner` recorded: the stored weights are what forwards use again."""
    for module in model.modules():
        overlay = _overlay(module)
        if overlay is not None and overlay.patches:
            overlay.remove(module, owner)


def is_offloaded(model: torch.nn.Module) -> bool:
    return any(_overlay(module) is not None for module in model.modules())


@contextmanager
def resident(root: torch.nn.Module):
    """Hold the offloaded weights under `root` in memory (with their edits) until exit: a layer-major pass reads
    each block once per pass instead of once per window."""
    held = [(module, _overlay(module)) for module in root.modules() if _overlay(module) is not None]
    for module, overlay in held:
        for name in overlay.names(module):
            overlay._set(module, name, overlay.current(name))
        overlay.align.offload, overlay.resident = False, True
    try:
        yield
    finally:
        for module, overlay in held:
            for name in overlay.names(module):
                set_module_tensor_to_device(module, name, "meta")
            overlay.align.offload, overlay.resident = True, False
            overlay.tag(module)


def execution_device(model: torch.nn.Module) -> torch.device:
    """The device inputs go to: the first parameter's, or its execution device when that one is offloaded."""
    return device(next(model.parameters()))


def folder_key(location: str | Path, dtype: str) -> str:
    """A key for a checkpoint's offload folder: where it is, its weight files' names, sizes and first MiB, and the
    dtype (reading every byte of a 140 GB checkpoint at each run would cost minutes)."""
    digest = hashlib.sha256(f"{location}:{dtype}".encode())  # a hub id names its weights
    location = Path(location)
    files = sorted(p for p in location.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")) \
        if location.is_dir() else [location] if location.is_file() else []
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]
