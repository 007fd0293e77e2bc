"""Attention toward massive-activation tokens (paper MA Sec. 4: attention sinks and implicit attention bias).

`AttentionSinks` observes `layers.{i}.attn.logits|values|probs` (models/attention.py) and folds each forward into
per-layer, per-head sums kept per sequence; nothing of size sequence x sequence outlives the hook. Every statistic
is a ratio of sums, so `resampled` recomputes it from any weighting of the sequences: a bootstrap over sequences
(evals/bootstrap.py) puts an interval on it. The state is bounded: past `units` sequences, sequence n adds into unit
n mod `units` (the bootstrap then resamples groups of sequences, each an equal share of the data). "Sink" keys are
the given token positions (the MA tokens). Only queries after the last sink position are counted, so every counted
query can attend to sinks and to other keys; keys after a query (causal mask) are never counted.

Per layer and head it reports
    sink_share       mean over queries of the attention probability on sink keys, sum_{j in S} p_qj
    logit_sink       mean pre-softmax logit q.k_j*scale toward sink keys; logit_other toward the other visible keys;
    logit_gap        per query mean(logit to sinks) - mean(logit to others), averaged; positive_sink / positive_other
                     the fraction of those logits that are > 0; sink_argmax the fraction of queries whose largest
                     logit is on a sink key. Logits are computed from the post-rotary query and key states that eager
                     attention itself uses (not recovered from log-probabilities, which would lose the per-query offset
                     and so the sign).
    decomposition    each head's attention output o_q = sum_j p_qj v_j (before o_proj) split into the sink part
                     s_q = sum_{j in S} p_qj v_j and the rest r_q = o_q - s_q. For each: mean norm, and the relative
                     variance across queries and sequences, E||x - E x||^2 / E||x||^2 (0 = the same vector for every
                     query, 1 = no common component), and the same of the direction alone, 1 - ||E x/||x|| ||^2
                     (0 = all parallel; with one sink s_q = p_q,sink v_sink, so this is how much v_sink changes
                     between sequences). The MA paper's claim: s_q is nearly constant (an implicit bias).
"""
from __future__ import annotations

import torch

from outlierlab.probes.stats import Probe


class AttentionSinks(Probe):
    def __init__(self, sites, sink_positions, layers: list[int] | None = None, units: int = 64):
        super().__init__(sites)
        if not sink_positions:
            raise ValueError("attention sinks need at least one sink token position")
        self.sink_positions = sorted({int(p) for p in sink_positions})
        self.layer_ids = list(range(sites.num_layers)) if layers is None else list(layers)
        self._pending: dict[int, dict] = {}
        # 64 units: an exact per-window bootstrap for the usual 8-64 windows; a 70B-shaped model (80 layers, 64
        # heads x 128) then keeps 64 x ~11 MB of sums
        self.units = int(units)
        self._sums: dict[int, dict[str, torch.Tensor]] = {}  # {layer: {name: [units, ...]}}
        self._seen: dict[int, int] = {}                       # sequences folded per layer

    def hook_points(self):
        return {f"layers.{layer}.attn.{kind}": self._callback(layer, kind)
                for layer in self.layer_ids for kind in ("logits", "values", "probs")}

    def _callback(self, layer: int, kind: str):
        def fold(tensor: torch.Tensor):
            if kind != "probs":
                self._pending.setdefault(layer, {})[kind] = tensor.detach()
                return
            pending = self._pending.pop(layer, {})
            self._fold(layer, pending["logits"], pending["values"], tensor.detach())
        return fold

    def _add(self, layer: int, name: str, value: torch.Tensor) -> None:
        """Add `value` [batch, ...] per sequence into its unit: the statistics are ratios of sums, recomputed from any
        weighting of the units (unit_sums / resampled)."""
        value = value.double().cpu()
        sums = self._sums.setdefault(layer, {})
        if name not in sums:
            sums[name] = torch.zeros(self.units, *value.shape[1:], dtype=torch.float64)
        seen = self._seen.get(layer, 0)
        sums[name].index_add_(0, torch.arange(seen, seen + len(value)) % self.units, value)

    def _fold(self, layer: int, logits: torch.Tensor, values: torch.Tensor, probs: torch.Tensor) -> None:
        length = probs.shape[-1]
        sinks = [p for p in self.sink_positions if p < length]
        start = max(sinks, default=length) + 1
        if not sinks or start >= length:
            return
        device = probs.device
        sink_index = torch.tensor(sinks, device=device)
        probs, logits = probs.float(), logits.float()
        queries = probs[:, :, start:, :]                                # [b, H, q, k]
        batch, _, count, _ = queries.shape
        # keys a query may attend to and that are not sinks: k <= q, k not in S
        positions = torch.arange(length, device=device)
        visible = positions[None, :] <= positions[start:, None]          # [q, k]
        other = visible.clone()
        other[:, sink_index] = False
        per_sequence = torch.ones(batch)
        self._add(layer, "queries", per_sequence * count)
        self._add(layer, "sink_share", queries[..., sink_index].sum(-1).sum(dim=2))   # [b, H]

        query_logits = logits[:, :, start:, :]
        to_sink = query_logits[..., sink_index]                          # [b, H, q, |S|]
        to_other = query_logits.masked_fill(~other, 0.0)
        others_per_query = other.sum(-1).clamp(min=1)                    # [q]
        self._add(layer, "logit_sink", to_sink.sum(dim=(2, 3)))
        self._add(layer, "logit_other", to_other.sum(dim=(2, 3)))
        self._add(layer, "n_sink", per_sequence * (count * len(sinks)))
        self._add(layer, "n_other", per_sequence * float(other.sum()))
        self._add(layer, "positive_sink", (to_sink > 0).sum(dim=(2, 3)))
        self._add(layer, "positive_other", ((query_logits > 0) & other).sum(dim=(2, 3)))
        gap = to_sink.mean(-1) - to_other.sum(-1) / others_per_query     # [b, H, q]
        self._add(layer, "logit_gap", gap.sum(dim=2))
        masked = query_logits.masked_fill(~visible, float("-inf"))
        argmax = masked.argmax(-1)                                       # [b, H, q]
        self._add(layer, "sink_argmax", torch.isin(argmax, sink_index).sum(dim=2))

        values = values.float()
        output = torch.matmul(queries, values)                           # [b, H, q, d]
        sink_part = torch.matmul(queries[..., sink_index], values[:, :, sink_index, :])
        rest = output - sink_part
        for name, part in (("sink", sink_part.double()), ("rest", rest.double())):  # double: E||x||^2 - ||Ex||^2
            self._add(layer, f"{name}_sum", part.sum(dim=2))             # [b, H, d]
            self._add(layer, f"{name}_square", part.square().sum(dim=(2, 3)))  # [b, H]
            self._add(layer, f"{name}_norm", part.norm(dim=-1).sum(dim=2))     # [b, H]
            unit = part / part.norm(dim=-1, keepdim=True).clamp(min=1e-30)
            self._add(layer, f"{name}_unit_sum", unit.sum(dim=2))        # [b, H, d]
        self._seen[layer] = self._seen.get(layer, 0) + batch

    def unit_sums(self) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {name: [bootstrap_units(), ...]}}: each unit's sums (one sequence's, up to `units` sequences)."""
        used = self.bootstrap_units()
        return {layer: {name: value[:used] for name, value in sums.items()} for layer, sums in self._sums.items()}

    def bootstrap_units(self) -> int:
        """How many units hold sequences: the number of sequences observed, at most `units`."""
        return min(max(self._seen.values(), default=0), self.units)

    def resampled(self, weights: torch.Tensor) -> list[dict]:
        """Per layer, every statistic of `summary` with a leading [R] axis, recomputed from `weights`
        [R, bootstrap_units()]: how often each unit counts (a bootstrap resample's counts; ones for all of them)."""
        weights, sums, rows = weights.double(), self.unit_sums(), []
        for layer in self.layer_ids:
            if layer not in sums:
                rows.append({"layer": layer, "queries": None})
                continue
            totals = {name: torch.tensordot(weights, value, dims=1) for name, value in sums[layer].items()}
            rows.append({"layer": layer, **_statistics(totals)})
        return rows

    def summary(self) -> list[dict]:
        """Per layer, the statistics over every observed sequence: per-head lists (relvar_layer one number)."""
        rows = []
        for row in self.resampled(torch.ones(1, self.bootstrap_units())):
            if row["queries"] is None:
                rows.append({"layer": row["layer"], "queries": 0})
                continue
            plain = {"layer": row["layer"], "queries": int(row["queries"][0])}
            plain.update({key: value[0].tolist() for key, value in row.items() if key not in plain})
            rows.append(plain)
        return rows


def _statistics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-head statistics from summed counts, each [R, H] (relvar_layer [R]), for sums with a leading [R]."""
    queries = sums["queries"][:, None]                                   # [R, 1]
    row = {"queries": sums["queries"],
           "sink_share": sums["sink_share"] / queries,
           "logit_sink": sums["logit_sink"] / sums["n_sink"][:, None],
           "logit_other": sums["logit_other"] / sums["n_other"][:, None],
           "logit_gap": sums["logit_gap"] / queries,
           "positive_sink": sums["positive_sink"] / sums["n_sink"][:, None],
           "positive_other": sums["positive_other"] / sums["n_other"][:, None],
           "sink_argmax": sums["sink_argmax"] / queries}
    for name in ("sink", "rest"):
        mean = sums[f"{name}_sum"] / queries[..., None]                  # [R, H, d]
        square = sums[f"{name}_square"] / queries                        # [R, H]  E||x||^2
        spread = (square - mean.square().sum(-1)).clamp(min=0.0)        # E||x - Ex||^2
        row[f"{name}_norm"] = sums[f"{name}_norm"] / queries
        row[f"{name}_relvar"] = spread / square.clamp(min=1e-30)
        # the layer as a whole (heads concatenated): total spread over total energy
        row[f"{name}_relvar_layer"] = spread.sum(-1) / square.sum(-1).clamp(min=1e-30)
        direction = 1.0 - (sums[f"{name}_unit_sum"] / queries[..., None]).square().sum(-1)  # 1 - ||E x/||x|| ||^2
        row[f"{name}_dirvar"] = direction.clamp(min=0.0)
    return row
