"""results/README.md held to its records: a number the prose states about a record is tied to it, so it cannot drift.

Two ties, both checked by `check` (tests/test_prose.py) and the second rewritten by `python scripts/make_tables.py`:
- a linked number: `[30.64](prune_sw/smollm2_135m/quick.json#variants.original.ppl.wikitext2.ppl)`. The link opens
  the record; the first number of the link text must equal the value at that path to the digits it shows (30.64
  holds 30.6406; 1,211 and 1.4e4 read as written). A path is dotted keys with `[i]` for a list position and
  `[key=value]` for the list item whose `key` is `value` (`table.rows[variant=prune_sw].x_original`), `['.']` for a
  dict key that dots would split (`shift.focus['.'].ratio`).
- a rendered table: the lines between `<!-- table: prune_sw/smollm2_135m/quick.json -->` and `<!-- /table -->` are
  the record's stored table as markdown, with its intervals; between `<!-- table: tables/finetune_smollm2_135m_cpt.md
  -->` and `<!-- /table -->` they are that file as the reports built it from the records (a table over several
  records: seeds, a sweep), so it is rendered last, after every other report.
Record paths are relative to the README's folder.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from outlierlab.reports import register, table_of
from outlierlab.results import read_result
from outlierlab.tables import markdown

LINK = re.compile(r"\[([^\]]*)\]\(([^)#\s]+\.json)#([^)\s]+)\)")
TABLE = re.compile(r"(<!-- table: (\S+\.(?:json|md)) -->\n)(.*?)(<!-- /table -->)", re.S)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?")
SEGMENT = re.compile(r"([^.\[\]]+)|\[([^\]]+)\]")


def lookup(record, path: str):
    """The value at a link's path in `record` (KeyError / IndexError when there is none)."""
    value = record
    for name, selector in SEGMENT.findall(path):
        if name:
            value = value[name]
        elif selector[:1] in "'\"" and selector[-1:] == selector[:1] and len(selector) > 1:  # ['.']: a dict key
            value = value[selector[1:-1]]
        elif "=" in selector:
            key, wanted = selector.split("=", 1)
            value = next(item for item in value if _same_key(item.get(key), wanted))
        else:
            value = value[int(selector)]
    return value


def _same_key(value, wanted: str) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(wanted) == value
        except ValueError:
            return False
    return str(value) == wanted


def states(text: str, value) -> bool:
    """Does the first number of `text` state `value` to the digits it shows?"""
    match = NUMBER.search(text)
    if match is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    written = match.group().replace(",", "")
    mantissa, _, exponent = written.partition("e")
    decimals = len(mantissa.partition(".")[2])
    half_step = 0.5 * 10 ** (int(exponent or 0) - decimals)
    return math.isfinite(value) and abs(value - float(written)) <= half_step * (1 + 1e-9)


def _records(folder: Path):
    cache = {}
    def record(relative: str) -> dict:
        if relative not in cache:
            cache[relative] = read_result(folder / relative)
        return cache[relative]
    return record


def _rendered(folder: Path, record, relative: str) -> str:
    """The markdown a table block holds: a record's stored table, or a table file the reports wrote."""
    if relative.endswith(".md"):
        return (folder / relative).read_text().strip()
    return markdown(table_of(record(relative))).strip()


def check(readme: Path) -> tuple[list[str], int]:
    """(problems, number of ties checked): every linked number and every rendered table of `readme`."""
    text, record = readme.read_text(), _records(readme.parent)
    problems, ties = [], 0
    for line_number, line in enumerate(text.splitlines(), 1):
        for shown, relative, path in LINK.findall(line):
            ties += 1
            where = f"{readme.name}:{line_number}: [{shown}]({relative}#{path})"
            try:
                value = lookup(record(relative), path)
            except (OSError, KeyError, IndexError, StopIteration, TypeError, ValueError) as error:
                problems.append(f"{where}: no such value ({type(error).__name__}: {error})")
                continue
            if not states(shown, value):
                problems.append(f"{where}: the record holds {value!r}")
    for _, relative, body, _ in TABLE.findall(text):
        ties += 1
        try:
            expected = _rendered(readme.parent, record, relative)
        except OSError as error:
            problems.append(f"{readme.name}: the table of {relative}: {error}")
            continue
        if body.strip() != expected:
            problems.append(f"{readme.name}: the table of {relative} is not the record's "
                            f"(python scripts/make_tables.py)")
    return problems, ties


def render_tables(readme: Path) -> bool:
    """Rewrite every rendered table of `readme` from its record; True if anything changed."""
    text, record = readme.read_text(), _records(readme.parent)
    new = TABLE.sub(lambda m: f"{m.group(1)}{_rendered(readme.parent, record, m.group(2))}\n{m.group(4)}", text)
    if new != text:
        readme.write_text(new)
    return new != text


def build_readme_tables(results_dir: Path, out_dir: Path) -> list[Path]:
    readme = Path(results_dir) / "README.md"
    return [readme] if readme.is_file() and render_tables(readme) else []


register("prose", tables=build_readme_tables)
