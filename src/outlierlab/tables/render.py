"""Rendering a Table as markdown and LaTeX: the one place a table becomes text."""
from __future__ import annotations

import math
from pathlib import Path

from outlierlab.tables.schema import Column, Table


def format_number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.2f}"
    return str(value)


def format_cell(value, column: Column) -> str:
    """A value as its column shows it: `fmt` "auto" is format_number; any other is a format spec for numbers."""
    if column.fmt == "auto" or isinstance(value, bool) or not isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, float) and not math.isfinite(value):
        return format_number(value)
    try:
        return format(value, column.fmt)
    except ValueError:  # an integer spec ("d") for a float value: shown as any number is
        return format_number(value)


def format_uncertain(value, uncertainty: tuple[str, object] | None, column: Column) -> str:
    """A value with its uncertainty (Table.uncertainty): "30.6 [29.1, 32.0]" or "45.0 ± 15.7"."""
    text = format_cell(value, column)
    if uncertainty is None or value is None:
        return text
    kind, spread = uncertainty
    if kind == "ci":
        return f"{text} [{format_cell(spread[0], column)}, {format_cell(spread[1], column)}]"
    return f"{text} ± {format_cell(spread, column)}"


def cells(table: Table) -> list[list[str]]:
    return [[format_uncertain(table.value(row, column), table.uncertainty(row, column), column)
             for column in table.columns] for row in table.rows]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")  # a literal | would split the cell


def markdown(table: Table) -> str:
    header = [_md_cell(column.header) for column in table.columns]
    body = [[_md_cell(cell) for cell in line] for line in cells(table)]
    widths = [max([len(name), *(len(line[i]) for line in body)]) for i, name in enumerate(header)]
    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def latex(table: Table) -> str:
    escape = _latex_escape
    lines = ["\\begin{table}[t]", "\\centering", "\\begin{tabular}{l" + "r" * (len(table.columns) - 1) + "}",
             "\\toprule", " & ".join(escape(c.header) for c in table.columns) + " \\\\", "\\midrule"]
    lines += [" & ".join(escape(cell) for cell in line) + " \\\\" for line in cells(table)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if table.caption:
        lines.append(f"\\caption{{{escape(table.caption)}}}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def write_table(table: Table, path_stem: Path) -> list[Path]:
    """Write `<path_stem>.md` and `<path_stem>.tex`; returns both paths."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    md, tex = path_stem.with_suffix(".md"), path_stem.with_suffix(".tex")
    md.write_text(markdown(table) + (f"\n\n{table.caption}\n" if table.caption else "\n"))
    tex.write_text(latex(table))
    return [md, tex]
