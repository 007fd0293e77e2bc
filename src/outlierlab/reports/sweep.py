"""One table per experiment from every cell of a sweep: results/<exp>/*/*.json -> tables/sweep_<exp>.

A sweep (`python run.py -m +exp=E model=A,B key=x,y ...`) writes one result per cell; this gathers the table of
each (model, run_tag) into one, a block of rows per cell, so a whole sweep reads as one table whichever cells ran
when (a resumed sweep gives the same table as an uninterrupted one).
"""
from __future__ import annotations

from pathlib import Path

from outlierlab.reports import register, table_of
from outlierlab.results import read_result
from outlierlab.tables import COMPANIONS, Column, Table, write_table

NOT_EXPERIMENTS = ("tables", "figures", "sweeps")


def _key(column: Column) -> str:
    """A cell's column in the combined table: the paper's numbers keep their own key beside ours."""
    return f"reference_{column.key}" if column.reference else column.key


def _cells(table: Table, row: dict) -> dict:
    """A row's values by combined key, each with its uncertainty companion (`<key>_ci` / `_se` / `_sd`)."""
    cells = {}
    for column in table.columns:
        cells[_key(column)] = table.value(row, column)
        uncertainty = table.uncertainty(row, column)
        if uncertainty is not None:
            kind, value = uncertainty
            cells[COMPANIONS[kind](_key(column))] = value
    return cells


def tables(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for exp_dir in sorted(p for p in Path(results_dir).iterdir() if p.is_dir() and p.name not in NOT_EXPERIMENTS):
        columns, rows, cells = {"model": Column("model", "model"), "run_tag": Column("run_tag", "run_tag")}, [], 0
        for path in sorted(exp_dir.glob("*/*.json")):
            record = read_result(path)
            if not record.get("table"):
                continue
            table = table_of(record)
            cells += 1
            for column in table.columns:
                columns.setdefault(_key(column), Column(_key(column), column.label, column.unit, column.fmt))
            # A cell table with its own model column (atlas, variants_table) names each row's model: it wins.
            rows += [{"model": path.parent.name, "run_tag": path.stem, **_cells(table, row)} for row in table.rows]
        if cells:
            caption = (f"{exp_dir.name}: every cell of results/{exp_dir.name}/<model>/<run_tag>.json ({cells} results), "
                       f"one block of rows per cell")
            written += write_table(Table(list(columns.values()), rows, caption=caption),
                                   Path(out_dir) / f"sweep_{exp_dir.name}")
    return written


register("sweep", tables=tables)
