"""What every super-weight study starts with and records: data-free detection (always run; its trace goes into the
result) and the super weights the study edits (`exp.super_weights`: detect | registry | auto)."""
from __future__ import annotations

from dataclasses import dataclass

from outlierlab.interventions.base import StudyContext
from outlierlab.models.coords import SuperWeight
from outlierlab.probes.super_weight import super_weights_for_study


@dataclass
class SuperWeightChoice:
    detection: dict  # the detection trace (probes/super_weight.py detect_super_weights)
    detected: list[SuperWeight]
    chosen: list[SuperWeight]  # what the study edits
    origin: str  # "detected" | "registry"
    registry: list[SuperWeight]  # model.super_weights

    @classmethod
    def of(cls, ctx) -> "SuperWeightChoice":
        exp = ctx.cfg.exp
        registry = list(ctx.registry_super_weights)
        detection, detected, chosen, origin = super_weights_for_study(ctx.loaded, exp.detection, exp.super_weights,
                                                                      registry)
        return cls(detection, detected, chosen, origin, registry)

    @property
    def context(self) -> StudyContext:
        return StudyContext(super_weights=self.chosen)

    def describe(self) -> str:
        """For captions: 'detected: (2, 3968, 7003)'."""
        return f"{self.origin}: {', '.join(map(str, self.chosen)) or 'none'}"

    def record(self, registry: bool = False) -> dict:
        """The result's `super_weights` and `detection` blocks (the detection trace without its iterations);
        `registry`: also the model YAML's list, whether detection agrees with it, and the iterations."""
        used = {"used": [str(w) for w in self.chosen], "origin": self.origin,
                "detected": [str(w) for w in self.detected]}
        detection = {k: v for k, v in self.detection.items() if k != "iterations"}
        if not registry:
            return {"super_weights": used, "detection": detection}
        agrees = sorted(self.detected) == sorted(self.registry) if self.registry else None
        return {"super_weights": {**used, "registry": [str(w) for w in self.registry], "registry_agrees": agrees},
                "detection": detection, "detection_iterations": self.detection["iterations"]}
