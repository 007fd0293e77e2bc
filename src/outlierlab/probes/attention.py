"""Attention toward massive-activation tokens (paper MA Sec. 4: attention sinks and implicit attention bias).

`AttentionSinks` observes `layers.{i}.attn.logits|values|probs` (models/attention.py) and folds each forward into
per-layer, per-head running sums; nothing of size sequence x sequence outlives the hook. "Sink" keys are the given
token positions (the MA tokens). Only queries after the last sink position are counted, so every counted query can
attend to sinks and to other keys; keys after a query (causal mask) are never counted.

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
    def __init__(self, sites, sink_positions, layers: list[int] | None = None):
        super().__init__(sites)
        if not sink_positions:
            raise ValueError("attention sinks need at least one sink token position")
        self.sink_positions = sorted({int(p) for p in sink_positions})
        self.layer_ids = list(range(sites.num_layers)) if layers is None else list(layers)
        self._pending: dict[int, dict] = {}
        self._sums: dict[int, dict[str, torch.Tensor]] = {}

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
        sums = self._sums.setdefault(layer, {})
        value = value.double().cpu()
        sums[name] = sums[name] + value if name in sums else value

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
        self._add(layer, "queries", torch.tensor(float(batch * count)))
        self._add(layer, "sink_share", queries[..., sink_index].sum(-1).sum(dim=(0, 2)))

        query_logits = logits[:, :, start:, :]
        to_sink = query_logits[..., sink_index]                          # [b, H, q, |S|]
        to_other = query_logits.masked_fill(~other, 0.0)
        others_per_query = other.sum(-1).clamp(min=1)                    # [q]
        self._add(layer, "logit_sink", to_sink.sum(dim=(0, 2, 3)))
        self._add(layer, "logit_other", to_other.sum(dim=(0, 2, 3)))
        self._add(layer, "n_sink", torch.tensor(float(batch * count * len(sinks))))
        self._add(layer, "n_other", other.sum().double() * batch)
        self._add(layer, "positive_sink", (to_sink > 0).sum(dim=(0, 2, 3)))
        self._add(layer, "positive_other", ((query_logits > 0) & other).sum(dim=(0, 2, 3)))
        gap = to_sink.mean(-1) - to_other.sum(-1) / others_per_query     # [b, H, q]
        self._add(layer, "logit_gap", gap.sum(dim=(0, 2)))
        masked = query_logits.masked_fill(~visible, float("-inf"))
        argmax = masked.argmax(-1)                                       # [b, H, q]
        self._add(layer, "sink_argmax", torch.isin(argmax, sink_index).sum(dim=(0, 2)))

        values = values.float()
        output = torch.matmul(queries, values)                           # [b, H, q, d]
        sink_part = torch.matmul(queries[..., sink_index], values[:, :, sink_index, :])
        rest = output - sink_part
        for name, part in (("sink", sink_part.double()), ("rest", rest.double())):  # double: E||x||^2 - ||Ex||^2
            self._add(layer, f"{name}_sum", part.sum(dim=(0, 2)))        # [H, d]
            self._add(layer, f"{name}_square", part.square().sum(dim=(0, 2, 3)))  # [H]
            self._add(layer, f"{name}_norm", part.norm(dim=-1).sum(dim=(0, 2)))   # [H]
            unit = part / part.norm(dim=-1, keepdim=True).clamp(min=1e-30)
            self._add(layer, f"{name}_unit_sum", unit.sum(dim=(0, 2)))   # [H, d]

    def summary(self) -> list[dict]:
        rows = []
        for layer in self.layer_ids:
            sums = self._sums.get(layer)
            if not sums:
                rows.append({"layer": layer, "queries": 0})
                continue
            queries = float(sums["queries"])
            row = {"layer": layer, "queries": int(queries),
                   "sink_share": (sums["sink_share"] / queries).tolist(),
                   "logit_sink": (sums["logit_sink"] / sums["n_sink"]).tolist(),
                   "logit_other": (sums["logit_other"] / sums["n_other"]).tolist(),
                   "logit_gap": (sums["logit_gap"] / queries).tolist(),
                   "positive_sink": (sums["positive_sink"] / sums["n_sink"]).tolist(),
                   "positive_other": (sums["positive_other"] / sums["n_other"]).tolist(),
                   "sink_argmax": (sums["sink_argmax"] / queries).tolist()}
            for name in ("sink", "rest"):
                mean = sums[f"{name}_sum"] / queries                     # [H, d]
                square = sums[f"{name}_square"] / queries                # [H]  E||x||^2
                spread = (square - mean.square().sum(-1)).clamp(min=0.0)  # E||x - Ex||^2
                row[f"{name}_norm"] = (sums[f"{name}_norm"] / queries).tolist()
                row[f"{name}_relvar"] = (spread / square.clamp(min=1e-30)).tolist()
                # the layer as a whole (heads concatenated): total spread over total energy
                row[f"{name}_relvar_layer"] = float(spread.sum() / square.sum().clamp(min=1e-30))
                direction = 1.0 - (sums[f"{name}_unit_sum"] / queries).square().sum(-1)  # 1 - ||E x/||x|| ||^2
                row[f"{name}_dirvar"] = direction.clamp(min=0.0).tolist()
            rows.append(row)
        return rows
