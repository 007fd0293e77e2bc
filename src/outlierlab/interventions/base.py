"""Interventions edit a loaded model inside an `EditSession`, which undoes everything bit-exactly on exit.

Weight edits go through `EditSession.set`, which saves only the touched elements (the first time each is touched)
and writes them back on exit; activation edits are hooks that the session removes on exit. Interventions compose
in the order given:

    with EditSession(loaded, context) as session:
        for intervention in interventions:
            intervention.apply(session)
        evaluate(loaded.model)
    # weights are bit-identical to before
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


class Intervention(ABC):
    """One edit. Subclasses validate their arguments in __init__ (before any weights load)."""

    @abstractmethod
    def apply(self, session: "EditSession") -> None:
        """Edit `session.loaded` through `session.set` / `session.add_hook`."""

    def describe(self) -> dict:
        return {"type": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


@dataclass
class StudyContext:
    """What interventions need to know about the model under study, found by the recipe before it edits.

    super_weights        [SuperWeight (layer, row, col)]: detected or from the model YAML (interventions/super_weight.py)
    massive_activations  [MassiveActivation]: where the MAs are (interventions/massive_activation.py)
    ma_means             calibrated MA means (probes.activation_means.calibrated_means), for "set to mean"
    calibration_ids      [n, seqlen] token ids SmoothQuant calibrates on
    """
    super_weights: list = field(default_factory=list)
    massive_activations: list = field(default_factory=list)
    ma_means: dict | None = None
    calibration_ids: torch.Tensor | None = None

    @classmethod
    def of(cls, context: "StudyContext | dict | None") -> "StudyContext":
        """A StudyContext from itself, None or a dict of its fields (an unknown key is a TypeError)."""
        if isinstance(context, cls):
            return context
        return cls(**(context or {}))


class EditSession:
    """Holds what the interventions changed so it can be undone; `context` (a StudyContext, or a dict of its
    fields) is what the interventions read about the model."""

    def __init__(self, loaded, context: StudyContext | dict | None = None):
        self.loaded = loaded
        self.sites = loaded.sites
        self.context = StudyContext.of(context)
        self._saved: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []
        self._originals: dict[tuple[int, tuple], torch.Tensor] = {}
        self._handles = []
        self._batch_dependent: list = []  # hooks whose result for one sequence depends on the others in its batch
        self.log: list[dict] = []

    def set(self, param: torch.Tensor, index: tuple, values) -> None:
        """param.data[index] = values, remembering the original elements."""
        with torch.no_grad():
            # One copy, kept on the CPU: a whole-matrix edit (quantization) must not double the accelerator's memory.
            saved = param.data[index].to("cpu", copy=True)
            self._saved.append((param, index, saved))
            self._originals.setdefault((id(param), self._index_key(index)), saved)
            param.data[index] = values

    def original(self, param: torch.Tensor, index: tuple) -> torch.Tensor:
        """The value at `index` before this session touched it."""
        saved = self._originals.get((id(param), self._index_key(index)))
        return param.data[index].clone() if saved is None else saved.to(param.device, copy=True)

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

    def apply(self, interventions) -> "EditSession":
        for intervention in interventions:
            intervention.apply(self)
        return self

    def undo(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        self._batch_dependent.clear()
        with torch.no_grad():
            for param, index, saved in reversed(self._saved):
                param.data[index] = saved
        self._saved.clear()
        self._originals.clear()

    def __enter__(self) -> "EditSession":
        return self

    def __exit__(self, *exc) -> bool:
        self.undo()
        return False
