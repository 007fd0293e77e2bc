"""Interventions of paper SW (Yu et al. 2024, arXiv 2411.07191), addressed through sites.

All act on `session.context.super_weights` (a StudyContext field): a list of SuperWeight (layer, row, col) that the recipe found by
detection or took from the model YAML.
"""
from __future__ import annotations

import math

import torch

from outlierlab.interventions.base import EditSession, Intervention
from outlierlab.models import offload
from outlierlab.models.coords import SuperWeight


class NoSuperWeights(ValueError):
    """Raised by an intervention that needs super weights when the model has none (detected or configured)."""


def _super_weights(session: EditSession) -> list[SuperWeight]:
    weights = session.context.super_weights
    if not weights:
        raise NoSuperWeights("this intervention needs super weights, and none were detected or configured")
    return [SuperWeight(*w) for w in weights]


class ScaleSuperWeights(Intervention):
    """Multiply every super weight by `scale` (0 = the paper's "Prune SW"; Fig. 6 sweeps it)."""

    def __init__(self, scale: float = 0.0):
        if not math.isfinite(scale):
            raise ValueError(f"scale={scale} is not a finite number")
        self.scale = float(scale)

    def apply(self, session: EditSession) -> None:
        for weight in _super_weights(session):
            view = session.sites.super_weight_view(weight)  # down_proj, or an expert's slice of the fused one
            index = view.index(weight.row, weight.col)
            original = offload.values(view.param)[index].clone()
            session.set(view.param, index, original * self.scale)
            session.log.append({"edit": "scale_super_weight", "super_weight": str(weight), "scale": self.scale,
                                "original": float(original)})


class PruneLargestWeights(Intervention):
    """Zero the k largest-magnitude weights of the decoder blocks' matrices, never a super weight.

    The paper's "Prune Non-SW" control (k = 7000). Which matrices compete follows the authors' pruning filter
    (LLMSuperWeight, outliers/model.py): every 2-D weight inside the decoder blocks, no norms, embeddings or LM head;
    `scope: down_proj` restricts it to the MLP output projections.

    Give either `k` (a count) or `fraction` (of the weights in scope): 7000 is 1.08e-6 of Llama-7B's block weights
    but 6.6e-5 of SmolLM2-135M's, so a small model needs `fraction` for a like-for-like control.
    """

    SCOPES = ("blocks", "down_proj")

    def __init__(self, k: int | None = 7000, fraction: float | None = None, scope: str = "blocks"):
        if (k is None) == (fraction is None):
            raise ValueError(f"give exactly one of k={k} and fraction={fraction}")
        if k is not None and int(k) <= 0:
            raise ValueError(f"k={k}: the number of weights to prune must be positive")
        if fraction is not None and not 0 < fraction < 1:
            raise ValueError(f"fraction={fraction} must be between 0 and 1")
        if scope not in self.SCOPES:
            raise ValueError(f"scope='{scope}' is not one of {', '.join(self.SCOPES)}")
        self.k = None if k is None else int(k)
        self.fraction, self.scope = fraction, scope

    def _matrices(self, sites) -> list[tuple[str, torch.nn.Parameter]]:
        """The weights in scope; a mixture of experts' fused 3-D parameters are in it whole (every expert)."""
        if self.scope == "down_proj":
            return [(f"layers.{i}.mlp.{'experts.' if i in sites.moe_layers else ''}down_proj.weight",
                     sites.module(f"layers.{i}.mlp.experts").down_proj if i in sites.moe_layers
                     else sites.down_proj(i).param) for i in range(sites.num_layers)]
        return [(f"layers.{i}.{name}", param) for i in range(sites.num_layers)
                for name, param in sites.module(f"layers.{i}").named_parameters()
                if param.dim() >= 2 and not name.endswith("_bias")]  # gpt-oss's experts' biases are [E, .]

    def apply(self, session: EditSession) -> None:
        sites = session.sites
        protected: dict[int, list[tuple]] = {}
        for weight in session.context.super_weights:
            view = sites.super_weight_view(SuperWeight(*weight))
            protected.setdefault(id(view.param), []).append(view.index(weight[1], weight[2]))
        matrices = self._matrices(sites)
        in_scope = sum(param.numel() for _, param in matrices)
        k = self.k if self.k is not None else max(1, round(self.fraction * in_scope))
        # Each matrix offers its own top-k; the global top-k is taken over those candidates.
        values, owners, flats = [], [], []
        for number, (_, param) in enumerate(matrices):
            magnitude = offload.values(param).abs().float().clone()
            for index in protected.get(id(param), []):
                magnitude[index] = -1.0
            top = magnitude.reshape(-1).topk(min(k, magnitude.numel()))
            values.append(top.values.cpu())
            flats.append(top.indices.cpu())
            owners.append(torch.full_like(top.indices.cpu(), number))
        values, owners, flats = torch.cat(values), torch.cat(owners), torch.cat(flats)
        if k > len(values):
            raise ValueError(f"k={k} is more than the {len(values)} weights in scope '{self.scope}'")
        best = values.topk(k)
        chosen_owner, chosen_flat = owners[best.indices], flats[best.indices]
        per_matrix = {}
        for number in chosen_owner.unique().tolist():
            name, param = matrices[number]
            flat = chosen_flat[chosen_owner == number].to(offload.device(param))
            session.set(param, torch.unravel_index(flat, param.shape), 0.0)
            per_matrix[name] = int(flat.numel())
        session.log.append({"edit": "prune_largest", "k": k, "fraction_of_scope": k / in_scope, "scope": self.scope,
                            "smallest_pruned_magnitude": float(best.values[-1]), "per_matrix": per_matrix})


class RestoreSuperActivation(Intervention):
    """After the super weights are edited, put the super activation back.

    Per sequence, at the position where the original down_proj output in the SW's row is largest in magnitude, that
    output is set to its original value (the authors' "removeSW_restoreSA" hook does the same). The original output
    is recomputed exactly from the live input: y_orig[row] = y[row] + (w_orig - w_now) * x[col].
    """

    def apply(self, session: EditSession) -> None:
        by_matrix: dict[tuple, list[SuperWeight]] = {}
        for weight in _super_weights(session):
            by_matrix.setdefault((weight.layer, weight.expert), []).append(weight)
        for (layer, expert), weights in by_matrix.items():
            view = session.sites.super_weight_view(weights[0])
            deltas = [(w.row, w.col, session.original(view.param, view.index(w.row, w.col)) -
                       offload.values(view.param)[view.index(w.row, w.col)]) for w in weights]
            inputs: list[torch.Tensor] = []  # down_proj's input of this forward, held until its output hook
            # An expert's points hold only its routed tokens [n, channels]: its peak is over those, batch-wide.
            site = f"layers.{layer}.mlp." + ("down_proj" if expert is None else f"experts.{expert}.down_proj")
            session.hook(f"{site}.in", self._hold(inputs), batch_invariant=expert is None)
            session.hook(f"{site}.out", self._restore(deltas, inputs))
        session.log.append({"edit": "restore_super_activation", "layers": sorted({k[0] for k in by_matrix})})

    @staticmethod
    def _hold(inputs: list[torch.Tensor]):
        def hold(x: torch.Tensor):
            inputs[:] = [x]
        return hold

    @staticmethod
    def _restore(deltas, inputs: list[torch.Tensor]):
        def hook(output: torch.Tensor):  # [batch, positions, channels] on every family (Sites hook points)
            x = inputs.pop()
            output = output.clone()
            for row in sorted({r for r, _, _ in deltas}):
                original = output[..., row].clone()
                for r, col, delta in deltas:
                    if r == row:
                        original = original + delta.to(x.dtype) * x[..., col]
                peak = original.abs().argmax(dim=-1, keepdim=True)  # [batch, 1]
                output[..., row].scatter_(-1, peak, original.gather(-1, peak))
            return output
        return hook
