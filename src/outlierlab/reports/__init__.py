"""Tables and figures regenerated from results/ alone.

Each study has one module in this package that registers what it can rebuild from its result JSONs:

    from outlierlab.reports import register
    register("sw", tables=build_sw_tables, figures=build_sw_figures)

A builder takes (results_dir, out_dir) and returns the paths it wrote. `scripts/make_tables.py` and
`scripts/make_figures.py` discover every module here, so adding a study never edits those scripts.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from outlierlab.results import read_result
from outlierlab.tables import Table

Builder = Callable[[Path, Path], list[Path]]


@dataclass(frozen=True)
class Report:
    name: str
    tables: Builder | None = None
    figures: Builder | None = None


REPORTS: dict[str, Report] = {}


class Result(NamedTuple):
    """One result file, results/<exp>/<model>/<tag>.json, and its record."""
    path: Path
    record: dict

    @property
    def model(self) -> str:
        return self.path.parent.name

    @property
    def stem(self) -> str:
        """"<model>_<tag>": how a report names what it builds from this result."""
        return f"{self.path.parent.name}_{self.path.stem}"


def results(results_dir: Path, exp: str, name: str = "*.json") -> list[Result]:
    """Every results/<exp>/<model>/<name> with its record, sorted by path: the one way reports find results."""
    return [Result(path, read_result(path)) for path in sorted((Path(results_dir) / exp).glob(f"*/{name}"))]


def table_of(record: dict, caption: str | None = None) -> Table:
    """The record's stored table (outlierlab.table/1), optionally with another caption: what reports render."""
    table = Table.from_dict(record["table"])
    return table if caption is None else table.with_caption(caption)


def by_model(found: list[Result]) -> dict[str, list[Result]]:
    grouped: dict[str, list[Result]] = {}
    for result in found:
        grouped.setdefault(result.model, []).append(result)
    return grouped


def register(name: str, *, tables: Builder | None = None, figures: Builder | None = None) -> None:
    if name in REPORTS:
        raise ValueError(f"report '{name}' is registered twice")
    REPORTS[name] = Report(name, tables, figures)


def discover() -> dict[str, Report]:
    """Import every report module of this package (each registers itself) and return the registry."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return REPORTS


def run_builders(kind: str, results_dir: Path, out_dir: Path, only: list[str] | None = None) -> list[Path]:
    """Run every registered builder of `kind` ("tables" or "figures"); returns all paths written."""
    reports = discover()
    unknown = sorted(set(only or []) - set(reports))
    if unknown:
        raise ValueError(f"--only {', '.join(unknown)}: no such report (available: {', '.join(sorted(reports))})")
    written = []
    # prose last: results/README renders table files the other reports write
    for name, report in sorted(reports.items(), key=lambda item: (item[0] == "prose", item[0])):
        builder = getattr(report, kind)
        if builder is None or (only and name not in only):
            continue
        written += builder(Path(results_dir), Path(out_dir))
    return written


def main(kind: str, description: str) -> None:
    """The command line of scripts/make_tables.py and make_figures.py: build every `kind` output from results/."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results", type=Path, default=Path("results"), help="results directory to read")
    parser.add_argument("--out", type=Path, default=None, help=f"where to write (default: <results>/{kind})")
    parser.add_argument("--only", nargs="*", help="report names (default: all registered)")
    args = parser.parse_args()
    try:
        written = run_builders(kind, args.results, args.out or args.results / kind, args.only)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print("\n".join(map(str, written)) or f"no {kind}: nothing in results/ to build from")
