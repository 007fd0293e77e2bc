"""The variant table of every edit-and-evaluate study (prune_sw, ma_intervene, sw_quant_activations, ...): one row
per variant (interventions applied to the original model, then undone) with its PPL per protocol, zero-shot accuracy
x100, the ratio to the original, a note for a variant that could not run, and the paper's numbers from the table's
reference block beside ours. Every measured cell carries its uncertainty (tables/schema.py): PPL its bootstrap
interval over windows (`<protocol>_ci`), x original the paired bootstrap interval over the same windows
(`x_original_ci`), accuracies lm-eval's stderr (`<task>_se`, `zero_shot_mean_se`).

    table = VariantTable(protocols, zeroshot=suite is not None, reference=paper_reference(cfg.reference))
    details = table.evaluate(ctx, exp.variants, context, skip={NoSuperWeights: "skipped: no super weight"})
    return {..., "variants": details, "table": table.render(caption)}
"""
from __future__ import annotations

from dataclasses import dataclass, field

from outlierlab.evals.ppl import ratio_interval
from outlierlab.evals.zeroshot import paired_accuracy_change
from outlierlab.tables import Column, Reference, Table, ratio_to_baseline
from outlierlab.tables.schema import interval_key, row_id, stderr_key

ZERO_SHOT = Column("zero_shot_mean", "zero-shot mean")
ZERO_SHOT_CHANGE = Column("zero_shot_change", "zero-shot - original")  # percentage points, paired over examples
RATIO = Column("x_original", "x original")
NOTE = Column("note", "note")


def percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def paper_reference(block: dict | None, values: dict | None = None, model: str | None = None) -> Reference | None:
    """A config's paper block ({"source", "model", "values": {variant: {protocol | "zeroshot_mean": value}}}) as a
    Reference keyed like our columns (zeroshot_mean -> zero_shot_mean). `values`/`model` override the block's."""
    if not block:
        return None
    values = block.get("values") or {} if values is None else values
    return Reference(source=block.get("source", "paper"), model=model or block.get("model"),
                     values={row: {("zero_shot_mean" if key == "zeroshot_mean" else key): value
                                   for key, value in scores.items()} for row, scores in values.items()})


def add_reference_ratio(reference: Reference | None, rows: list[dict], key: str, index: list[str] = ("variant",),
                        baseline: str = "original") -> bool:
    """Reference x_original = the paper's value of `key` / the paper's baseline, for our rows; True if any."""
    base = reference.value(baseline, key) if reference else None
    added = False
    for row in rows:
        paper = reference.values.get(row_id(row, list(index))) if base else None
        if paper and paper.get(key) is not None:
            paper["x_original"] = paper[key] / base
            added = True
    return added


def ratios_with_intervals(rows: list[dict], window_nll: dict[str, list | None], key: str, index: str = "variant",
                          baseline: str = "original") -> None:
    """x original = row[key] / the baseline row's, and its paired bootstrap interval over the same windows
    (`x_original_ci`) for every row whose per-window NLL of protocol `key` is in `window_nll` (by row[index])."""
    ratio_to_baseline(rows, key, index=index, baseline=baseline)
    base = window_nll.get(baseline)
    for row in rows:
        if RATIO.key in row and base and window_nll.get(row[index]):
            row[interval_key(RATIO.key)] = ratio_interval(window_nll[row[index]], base)


def zeroshot_changes(rows: list[dict], results: dict[str, dict], index: str = "variant",
                     baseline: str = "original") -> None:
    """zero_shot_change = the row's zero-shot mean minus the baseline's (percentage points) and its paired bootstrap
    interval over the same examples, for every other row whose zero-shot result has per-example accuracies."""
    base = results.get(baseline)
    for row in rows:
        if base is None or row[index] == baseline or row[index] not in results:
            continue
        change = paired_accuracy_change(results[row[index]], base)
        if change is not None:
            row[ZERO_SHOT_CHANGE.key] = percent(change["change"])
            row[interval_key(ZERO_SHOT_CHANGE.key)] = [percent(bound) for bound in change["change_ci"]]


def window_nll(details: dict[str, dict], key: str) -> dict[str, list | None]:
    """{variant: per-window NLL of protocol `key`} of ctx.evaluate's results by variant."""
    return {variant: evaluated["ppl"][key].get("window_nll") for variant, evaluated in details.items()
            if key in evaluated.get("ppl", {})}


def scores(evaluated: dict, protocols: list[str], tasks: bool = False) -> dict:
    """{protocol: PPL, (task: acc x100,) zero_shot_mean: mean acc x100} of one evaluation ({"ppl", "zeroshot"}),
    with each value's uncertainty where the evaluation has it: <protocol>_ci, <task>_se, zero_shot_mean_se."""
    row = {}
    for key in protocols:
        row[key] = evaluated["ppl"][key]["ppl"]
        if evaluated["ppl"][key].get("ppl_ci") is not None:
            row[interval_key(key)] = evaluated["ppl"][key]["ppl_ci"]
    zeroshot = evaluated.get("zeroshot")
    if zeroshot:
        if tasks:
            for task, result in zeroshot["tasks"].items():
                row[task] = percent(result["acc"])
                if result.get("acc_stderr") is not None:
                    row[stderr_key(task)] = percent(result["acc_stderr"])
        row[ZERO_SHOT.key] = percent(zeroshot["mean"])
        if zeroshot.get("mean_stderr") is not None:
            row[stderr_key(ZERO_SHOT.key)] = percent(zeroshot["mean_stderr"])
    return row


@dataclass
class VariantTable:
    protocols: list[str]  # PPL protocols, in column order; the first is the one "x original" divides
    zeroshot: bool = False  # the eval suite has zero-shot tasks
    tasks: list[str] | None = None  # also a column per zero-shot task
    reference: Reference | None = None  # the paper's numbers by variant (paper_reference)
    beside: bool = True  # the paper's columns next to ours (its model is this one), else after all of ours
    paper: str = "paper"  # how the paper's columns are labelled ("paper wikitext2")
    paper_zeroshot: bool = True  # the paper reports a zero-shot mean
    paper_ratio: bool = False  # also the paper's own ratio to its original
    rows: list[dict] = field(default_factory=list)
    window_nll: dict[str, list] = field(default_factory=dict)  # the first protocol's per-window NLL by variant
    zeroshot_results: dict[str, dict] = field(default_factory=dict)  # each variant's zero-shot result (per example)

    def add(self, variant: str, evaluated: dict, **extra) -> dict:
        row = {"variant": variant, **scores(evaluated, self.protocols, tasks=self.tasks is not None), **extra}
        self.rows.append(row)
        self.window_nll[variant] = evaluated["ppl"][self.protocols[0]].get("window_nll")
        if evaluated.get("zeroshot"):
            self.zeroshot_results[variant] = evaluated["zeroshot"]
        return row

    def skip(self, variant: str, note: str) -> None:
        self.rows.append({"variant": variant, NOTE.key: note})

    def evaluate(self, ctx, variants, context, skip: dict[type, str] | None = None, observe=None,
                 extra=None) -> dict[str, dict]:
        """ctx.evaluate every variant ({name: [intervention names]}) and add its row; an exception of a type in `skip`
        makes a skipped row with its note. `extra(evaluated)` gives more values ({column key: value}) for a row.
        Returns the evaluations by variant (the result's `variants`)."""
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

    def columns(self, extra: list[Column] = (), optional: list[Column] = (), paper_ratio: bool = False) -> list[Column]:
        """variant, protocols, x original (when there is an original row), (tasks,) zero-shot, `extra` columns,
        `optional` columns that some row has a value in, note (when a row has one); the paper's protocols and
        zero-shot mean beside ours (`beside`) or after them all (with its x original when `paper_ratio`)."""
        has_ratio = any(RATIO.key in row for row in self.rows)
        label = self.paper
        paper = [Column(key, f"{label} {key}", reference=True) for key in self.protocols] if self.reference else []
        has_change = any(ZERO_SHOT_CHANGE.key in row for row in self.rows)
        zeroshot = ([*(Column(task, task) for task in self.tasks or []), ZERO_SHOT,
                     *([ZERO_SHOT_CHANGE] if has_change else [])] if self.zeroshot else [])
        paper_zeroshot = ([Column(ZERO_SHOT.key, f"{label} {ZERO_SHOT.label}", reference=True)]
                          if self.zeroshot and self.reference and self.paper_zeroshot else [])
        ours_after = [*extra, *(c for c in optional if any(row.get(c.key) is not None for row in self.rows)),
                      *([NOTE] if any(NOTE.key in row for row in self.rows) else [])]
        head = [Column("variant", "variant"), *(Column(key, key) for key in self.protocols),
                *([RATIO] if has_ratio else [])]
        if self.beside:
            return [*head, *paper, *zeroshot, *paper_zeroshot, *ours_after]
        ratio = [Column(RATIO.key, f"{label} {RATIO.label}", reference=True)] if paper_ratio else []
        return [*head, *zeroshot, *ours_after, *paper, *paper_zeroshot, *ratio]

    def table(self, caption: str, extra: list[Column] = (), optional: list[Column] = ()) -> Table:
        """The Table, with x_original and its paired interval for every row with PPL, the zero-shot change from the
        original with its paired interval over examples (and the paper's ratio, when `paper_ratio`)."""
        ratios_with_intervals(self.rows, self.window_nll, self.protocols[0])
        zeroshot_changes(self.rows, self.zeroshot_results)
        paper_ratio = self.paper_ratio and add_reference_ratio(self.reference, self.rows, self.protocols[0])
        return Table(self.columns(extra, optional, paper_ratio), self.rows, index="variant", reference=self.reference,
                     caption=caption)

    def render(self, caption: str, extra: list[Column] = (), optional: list[Column] = ()) -> dict:
        """The result's `table` (Table.to_dict())."""
        return self.table(caption, extra, optional).to_dict()
