"""One-shot migration of stored result tables to the typed schema (outlierlab.table/1):

    python scripts/migrate_tables.py [--results results]

Old records stored `table` = {"columns": [display labels], "rows": [{label: value}], "caption"}, with the paper's
numbers as "paper ..." columns in some recipes and taken from the run's config by the reports in others. The new
table keys rows by snake_case column keys, gives each column its label, names the row id (`index`) and holds the
paper's numbers in one reference block. Values are copied unchanged (paper x original, which the SW Table 1 report
computed at render time, is computed the same way here). What reports read from the run's config (the eval name,
the SW figures' paper numbers) is copied into the record, so reports read records only. Run once; a record already
migrated is left as it is.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from outlierlab.results import read_result, write_result
from outlierlab.studies.variants import add_reference_ratio, paper_reference
from outlierlab.tables import SCHEMA, Column, Reference, Table

# labels whose mechanical key would be unclear; every other label becomes lower case with |x| -> abs_x, "=" -> is
KEYS = {"x original": "x_original", "zero-shot mean": "zero_shot_mean", "row = MA channel": "row_is_ma_channel",
        "SW row = MA channel": "sw_row_is_ma_channel", "max abs(h)": "max_abs_h",
        "final layer max abs(h)": "final_layer_max_abs_h", "W8A8 / FP": "w8a8_over_fp", "top1/median": "top1_over_median",
        "SW spikes in/out": "sw_spikes_in_out", "outlier ch./site": "outlier_channels_per_site",
        "rel std top10%": "rel_std_top10pct", "SW PPL x": "sw_ppl_x_original", "MA x median": "ma_x_median"}
INDEX = {"prune_sw": ["variant"], "ma_intervene": ["variant"], "sw_quant_activations": ["variant"],
         "ro_gamma": ["variant"], "ro_smooth": ["variant"], "ma_attention": ["variant"], "sw_activations": ["variant"],
         "variants_table": ["variant"], "sw_scale": ["scale"], "sw_index": ["candidate"], "sw_stopwords": ["token"],
         "pretrain": ["step"], "finetune": ["method"], "atlas": ["model"], "ma_stats": ["kind", "channel", "role"],
         "ro_locate": ["ma_channel", "site"], "sw_quant_weights": ["bits", "block"]}  # as the recipes set it
# stored "paper ..." columns -> the reference key they hold (the paper's own names where it had them)
PAPER_COLUMNS = {"paper zero-shot mean": "zero_shot_mean", "paper FP ppl": "fp_ppl", "paper inf-norm": "max_inf_norm",
                 "paper kurtosis": "avg_kurtosis", "paper W8A8 ppl": "w8a8_ppl"}


def key_of(label: str) -> str:
    if label in KEYS:
        return KEYS[label]
    text = re.sub(r"\|([^|]+)\|", r"abs \1", label.lower())
    text = re.sub(r"[^a-z0-9]+", "_", text.replace("=", " is ")).strip("_")
    return text


def migrate_table(exp: str, record: dict) -> dict:
    old = record["table"]
    keys = [key_of(c) for c in old["columns"]]
    index = INDEX.get(exp, []) if keys[:len(INDEX.get(exp, []))] == INDEX.get(exp) else []
    ours = [c for c in old["columns"] if c not in PAPER_COLUMNS]
    columns = [Column(key_of(c), c) for c in ours]
    rows = [{key_of(label): value for label, value in row.items() if label not in PAPER_COLUMNS} for row in old["rows"]]
    table = Table(columns, rows, index=index, caption=old.get("caption") or "")
    paper = [c for c in old["columns"] if c in PAPER_COLUMNS]
    config = (record.get("config") or {}).get("exp") or {}
    reference = None
    if paper:  # the paper's numbers were stored in our rows: move them, unchanged, into the reference block
        given = record.get("reference") or {}
        values = {table.row_id(new): {PAPER_COLUMNS[c]: row[c] for c in paper if row.get(c) is not None}
                  for row, new in zip(old["rows"], rows)}
        reference = Reference(source=given.get("source", "paper"), values={k: v for k, v in values.items() if v},
                              model=given.get("model"))
        table.columns += [Column(PAPER_COLUMNS[c], c, reference=True) for c in paper]
    elif exp == "prune_sw":  # the SW Table 1 report printed the config's paper values after ours
        reference = paper_reference(record.get("paper_reference") or config.get("reference"))
        _paper_columns(table, reference, "paper", ratio=True)
    elif exp == "ma_intervene" and config.get("reference") and not record.get("reference"):
        reference = paper_reference(config["reference"])  # the MA Table 3 report printed them after ours
        _paper_columns(table, reference, f"paper {reference.model}", ratio=False)
    table.reference = reference
    return table.to_dict()


def _paper_columns(table: Table, reference, label: str, ratio: bool) -> None:
    """The paper's PPL and zero-shot columns after ours, as the reports printed them (VariantTable, beside=False)."""
    if reference is None:
        return
    table.reference = reference
    keys = [c.key for c in table.columns if c.key in ("wikitext2", "c4", "zero_shot_mean")]
    labels = {c.key: c.label for c in table.columns}
    table.columns += [Column(key, f"{label} {labels[key]}", reference=True) for key in keys]
    if ratio and keys and add_reference_ratio(reference, table.rows, keys[0], index=table.index):
        table.columns.append(Column("x_original", f"{label} x original", reference=True))


def migrate(path: Path) -> bool:
    record = read_result(path)
    before = dict(record)
    exp = path.parent.parent.name
    config = record.get("config") or {}
    if record.get("table") and record["table"].get("schema") != SCHEMA:
        record["table"] = migrate_table(exp, record)
    if record.get("table") and "eval" not in record and config.get("eval"):
        record["eval"] = config["eval"]["name"]  # new records carry it; reports read it
    if exp in ("sw_activations", "sw_stopwords") and "paper_reference" not in record:
        record["paper_reference"] = (config.get("exp") or {}).get("reference")  # as the recipes now record it
    if record == before:
        return False
    write_result(record, path)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args()
    changed = [path for path in sorted(args.results.glob("*/*/*.json")) if migrate(path)]
    print("\n".join(map(str, changed)) or "nothing to migrate")


if __name__ == "__main__":
    main()
