"""What the super-experts study measures under each variant, and its tables (experiments/super_experts.py)."""
from __future__ import annotations

import torch

from outlierlab.probes.outliers import SinkCriterion, SinkRate
from outlierlab.probes.super_weight import massive_activation
from outlierlab.tables import Column, Table

OUTLIER_COLUMNS = [Column("max_abs_h", "max |h|", fmt=".4g"), Column("ma_x_median", "x median", fmt=".4g"),
                   Column("sink_rate", "sink rate", fmt=".3f")]


@torch.no_grad()
def outliers(loaded, exp, ids: torch.Tensor) -> dict:
    """The largest residual activation on exp.prompt (paper MA criterion, exp.massive_activation) and the attention
    sink rate (Gu et al., exp.attention_sinks) on the first windows of `ids`, cut to its prompt_tokens; the sink rate
    is None where the model's attention cannot be observed."""
    spec = exp.massive_activation
    peak = massive_activation(loaded, exp.prompt, spec.min_abs, spec.min_ratio, spec.provenance)
    criterion = SinkCriterion(exp.attention_sinks.eps, exp.attention_sinks.prompt_tokens)
    sinks = None
    if loaded.sites.attention_observable:
        with SinkRate(loaded.sites, criterion) as rate:
            for window in ids[:4]:
                loaded.model(window[None, :criterion.prompt_tokens].to(loaded.device))
        sinks = rate.summary()
    peak.pop("per_layer")
    row = {"max_abs_h": peak["abs"], "ma_x_median": peak["ratio_to_median"],
           "sink_rate": sinks["sink_rate"] if sinks else None}
    return {"massive_activation": peak, "attention_sinks": sinks, "row": row}


def super_experts_table(super_experts: list[dict]) -> dict:
    """The super experts, one row each (outlierlab.table/1)."""
    columns = [Column("expert_id", "expert"), Column("max_abs_out", "max |down_proj out|", fmt=".4g"),
               Column("channel", "channel", fmt="d"), Column("ratio_to_median", "x median expert", fmt=".3g"),
               Column("load_share", "load share", fmt=".3f")]
    rows = [{"expert_id": f"layers.{e['layer']}.expert{e['expert']}", **{c.key: e.get(c.key) for c in columns[1:]}}
            for e in super_experts]
    return Table(columns, rows, index="expert_id", caption="super experts (Su et al. 2025 criterion)").to_dict()
