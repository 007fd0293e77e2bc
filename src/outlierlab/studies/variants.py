"""The variant table of every edit-and-evaluate study (prune_sw, ma_intervene, sw_quant_activations, sw_scale,
sw_quant_weights): one row per variant (interventions applied to the original model, then undone) with its PPL per
protocol, zero-shot accuracy x100, the ratio to the original, the paper's numbers beside ours and a note for a
variant that could not run.

    table = VariantTable(protocols, zeroshot=suite is not None, paper=paper_values)
    details = table.evaluate(ctx, exp.variants, context, skip={NoSuperWeights: "skipped: no super weight"})
    return {..., "variants": details, "table": table.render(caption)}
"""
from __future__ import annotations

from dataclasses import dataclass, field

from outlierlab.tables import ratio_to_baseline

PAPER_ZEROSHOT = "zeroshot_mean"  # the key of the zero-shot mean in a paper's reference values


def percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def scores(evaluated: dict, protocols: list[str], tasks: bool = False) -> dict:
    """{protocol: PPL, (task: acc x100,) "zero-shot mean": mean acc x100} of one evaluation ({"ppl", "zeroshot"})."""
    row = {key: evaluated["ppl"][key]["ppl"] for key in protocols}
    zeroshot = evaluated.get("zeroshot")
    if zeroshot:
        if tasks:
            row.update({task: percent(result["acc"]) for task, result in zeroshot["tasks"].items()})
        row["zero-shot mean"] = percent(zeroshot["mean"])
    return row


@dataclass
class VariantTable:
    protocols: list[str]  # PPL protocols, in column order; the first is the one "x original" divides
    zeroshot: bool = False  # the eval suite has zero-shot tasks
    tasks: list[str] | None = None  # also a column per zero-shot task
    paper: dict | None = None  # the paper's {variant: {protocol | "zeroshot_mean": value}} (its model is this one)
    paper_zeroshot: bool = True  # the paper reports a zero-shot mean
    rows: list[dict] = field(default_factory=list)

    def add(self, variant: str, evaluated: dict, **extra) -> dict:
        row = {"variant": variant, **scores(evaluated, self.protocols, tasks=self.tasks is not None)}
        if self.paper is not None:
            paper = self.paper.get(variant, {})
            row.update({f"paper {key}": paper.get(key) for key in self.protocols})
            if evaluated.get("zeroshot") and self.paper_zeroshot:
                row["paper zero-shot mean"] = paper.get(PAPER_ZEROSHOT)
        row.update(extra)
        self.rows.append(row)
        return row

    def skip(self, variant: str, note: str) -> None:
        self.rows.append({"variant": variant, "note": note})

    def evaluate(self, ctx, variants, context, skip: dict[type, str] | None = None, observe=None,
                 extra=None) -> dict[str, dict]:
        """ctx.evaluate every variant ({name: [intervention names]}) and add its row; an exception of a type in `skip`
        makes a skipped row with its note. `extra(evaluated)` gives more columns for a row. Returns the
        evaluations by variant (the result's `variants`)."""
        skip = skip or {}
        details = {}
        for variant, names in variants.items():
            try:
                details[variant] = ctx.evaluate(list(names), context, label=variant, observe=observe)
            except tuple(skip) as error:
                self.skip(variant, next(note for kind, note in skip.items() if isinstance(error, kind)))
                continue
            self.add(variant, details[variant], **(extra(details[variant]) if extra else {}))
        return details

    def columns(self, extra: list[str] = (), optional: list[str] = (), paper_last: bool = False) -> list[str]:
        """variant, protocols, x original (when there is an original row), paper protocols, (tasks,) zero-shot,
        `extra` columns, `optional` columns that some row has a value in, note (when a row has one).
        `paper_last`: the paper's PPL columns after the extra ones."""
        has_ratio = any("x original" in row for row in self.rows)
        paper = [f"paper {key}" for key in self.protocols] if self.paper is not None else []
        columns = ["variant", *self.protocols, *(["x original"] if has_ratio else []), *([] if paper_last else paper)]
        if self.zeroshot:
            columns += [*(self.tasks or []), "zero-shot mean"]
            columns += ["paper zero-shot mean"] if self.paper is not None and self.paper_zeroshot else []
        columns += [*extra, *(key for key in optional if any(row.get(key) is not None for row in self.rows))]
        columns += paper if paper_last else []
        return columns + (["note"] if any("note" in row for row in self.rows) else [])

    def render(self, caption: str, extra: list[str] = (), optional: list[str] = (), paper_last: bool = False) -> dict:
        """The result's `table`: {"columns", "rows", "caption"}, with "x original" for every row with PPL."""
        ratio_to_baseline(self.rows, self.protocols[0])
        return {"columns": self.columns(extra, optional, paper_last), "rows": self.rows, "caption": caption}
