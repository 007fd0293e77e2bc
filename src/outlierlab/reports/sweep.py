"""One table per experiment from every cell of a sweep: results/<exp>/*/*.json -> tables/sweep_<exp>.

A sweep (`python run.py -m +exp=E model=A,B key=x,y ...`) writes one result per cell; this gathers the table of
each (model, run_tag) into one, a block of rows per cell, so a whole sweep reads as one table whichever cells ran
when (a resumed sweep gives the same table as an uninterrupted one).
"""
from __future__ import annotations

from pathlib import Path

from outlierlab.reports import register
from outlierlab.results import read_result
from outlierlab.tables import write_table

NOT_EXPERIMENTS = ("tables", "figures", "sweeps")


def tables(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for exp_dir in sorted(p for p in Path(results_dir).iterdir() if p.is_dir() and p.name not in NOT_EXPERIMENTS):
        columns, rows, cells = ["model", "run_tag"], [], 0
        for path in sorted(exp_dir.glob("*/*.json")):
            table = read_result(path).get("table")
            if not table:
                continue
            cells += 1
            columns += [c for c in table["columns"] if c not in columns]
            rows += [{"model": path.parent.name, "run_tag": path.stem, **row} for row in table["rows"]]
        if cells:
            caption = (f"{exp_dir.name}: every cell of results/{exp_dir.name}/<model>/<run_tag>.json ({cells} results), "
                       f"one block of rows per cell")
            written += write_table(columns, rows, Path(out_dir) / f"sweep_{exp_dir.name}", caption)
    return written


register("sweep", tables=tables)
