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

from outlierlab.models.edit import WeightEdits


class Intervention(ABC):
    """One edit. Subclasses validate their arguments in __init__ (before any weights load)."""

    # A quantizer's protocol ({"weights": "per_channel", "activations": "per_token", ...}): the runner records it
    # with every result, so a W8A8 number always says what W8A8 meant. None: not a quantizer.
    protocol: dict | None = None

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
    super_experts        [(layer, expert)]: the super experts (probes/super_experts.py), for interventions/experts.py
    """
    super_weights: list = field(default_factory=list)
    massive_activations: list = field(default_factory=list)
    ma_means: dict | None = None
    calibration_ids: torch.Tensor | None = None
    super_experts: list = field(default_factory=list)

    @classmethod
    def of(cls, context: "StudyContext | dict | None") -> "StudyContext":
        """A StudyContext from itself, None or a dict of its fields (an unknown key is a TypeError)."""
        if isinstance(context, cls):
            return context
        return cls(**(context or {}))


class EditSession(WeightEdits):
    """The edits of a study's interventions (WeightEdits: undone bit-exactly on exit); `context` (a StudyContext, or
    a dict of its fields) is what the interventions read about the model."""

    def __init__(self, loaded, context: StudyContext | dict | None = None):
        super().__init__(loaded)
        self.context = StudyContext.of(context)
        self.log: list[dict] = []

    def apply(self, interventions) -> "EditSession":
        for intervention in interventions:
            intervention.apply(self)
        return self
