"""The edit primitive: weight writes that are undone bit-exactly, and hooks that live until the edits end.

`WeightEdits` is what anything that edits a model uses, from detection (which zeroes a candidate and runs again) to
the interventions' `EditSession` (interventions/base.py), which adds what interventions read about the model:

    with WeightEdits(loaded) as edits:
        edits.set(param, (row, col), 0.0)
        model(ids)
    # weights are bit-identical to before

On a model offloaded by accelerate (models/offload.py) an offloaded parameter lives on the `meta` device: `set`
records a patch that every forward applies after the weight is loaded, `undo` removes this session's patches, and
`original` reads the stored weight; the store itself is never written.
"""
from __future__ import annotations

import torch

from outlierlab.models import offload


class WeightEdits:
    """Holds what was changed so it can be undone: each weight element touched (saved the first time) and each hook."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.sites = loaded.sites
        self._saved: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []
        self._originals: dict[tuple[int, tuple], torch.Tensor] = {}
        self._handles = []
        self._batch_dependent: list = []  # hooks whose result for one sequence depends on the others in its batch
        self._offloaded = False  # whether an edit was recorded as a patch of an offloaded weight

    def set(self, param: torch.Tensor, index: tuple, values) -> None:
        """param.data[index] = values, remembering the original elements."""
        with torch.no_grad():
            # One copy, kept on the CPU: a whole-matrix edit (quantization) must not double the accelerator's memory.
            saved = offload.values(param)[index].to("cpu", copy=True)
            self._originals.setdefault((self._param_key(param), self._index_key(index)), saved)
            if offload.home(param) is not None:
                offload.patch(param, index, values, owner=self)
                self._offloaded = True
                return
            self._saved.append((param, index, saved))
            param.data[index] = values

    def original(self, param: torch.Tensor, index: tuple) -> torch.Tensor:
        """The value at `index` before this session touched it."""
        saved = self._originals.get((self._param_key(param), self._index_key(index)))
        current = offload.values(param)
        return current[index].clone() if saved is None else saved.to(current.device, copy=True)

    @staticmethod
    def _param_key(param: torch.Tensor):
        # An offloaded parameter is a new meta tensor after every forward: it is known by its module and name.
        where = offload.home(param)
        return id(param) if where is None else (id(where[0]), where[1])

    @staticmethod
    def _index_key(index: tuple) -> tuple:
        return tuple(tuple(i.tolist()) if isinstance(i, torch.Tensor) else i for i in index)

    def hook(self, site: str, fn, batch_invariant: bool = True) -> None:
        """fn at a site (Sites hook point) until the session ends."""
        self.add_hook(self.sites.register(site, fn), batch_invariant)

    def add_hook(self, handle, batch_invariant: bool = True) -> None:
        """Keep a hook until undo. `batch_invariant=False` for a hook whose output for one sequence depends on the
        other sequences of its batch (e.g. one quantization range over the whole batch tensor): evaluations then
        run one sequence at a time while it is on (see `batch_invariant`)."""
        self._handles.append(handle)
        if not batch_invariant:
            self._batch_dependent.append(handle)

    @property
    def batch_invariant(self) -> bool:
        """True when every live hook treats each sequence of a batch on its own, so batching changes nothing."""
        return not self._batch_dependent

    def undo(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        self._batch_dependent.clear()
        with torch.no_grad():
            for param, index, saved in reversed(self._saved):
                param.data[index] = saved
        if self._offloaded:
            offload.unpatch(self.loaded.model, owner=self)
            self._offloaded = False
        self._saved.clear()
        self._originals.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.undo()
        return False
