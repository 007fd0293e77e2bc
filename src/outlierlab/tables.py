"""Tables from result rows, as markdown and LaTeX (the paper's numbers sit in their own columns)."""
from __future__ import annotations

import math
from pathlib import Path


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


def ratio_to_baseline(rows: list[dict], key: str, column: str = "x original", baseline: str = "original") -> None:
    """Add `column` = row[key] / (the baseline variant's row[key]) to every row that has `key`."""
    base = next((row for row in rows if row.get("variant") == baseline and key in row), None)
    for row in rows:
        if base and key in row:
            row[column] = row[key] / base[key]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")  # a literal | would split the cell


def markdown(columns: list[str], rows: list[dict]) -> str:
    columns_shown = [_md_cell(column) for column in columns]
    cells = [[_md_cell(format_number(row.get(column))) for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns_shown)]
    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(columns_shown), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def latex(columns: list[str], rows: list[dict], caption: str | None = None) -> str:
    escape = _latex_escape
    lines = ["\\begin{table}[t]", "\\centering", "\\begin{tabular}{l" + "r" * (len(columns) - 1) + "}", "\\toprule",
             " & ".join(escape(c) for c in columns) + " \\\\", "\\midrule"]
    lines += [" & ".join(escape(format_number(row.get(c))) for c in columns) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption:
        lines.append(f"\\caption{{{escape(caption)}}}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def write_table(columns: list[str], rows: list[dict], path_stem: Path, caption: str | None = None) -> list[Path]:
    """Write `<path_stem>.md` and `<path_stem>.tex`; returns both paths."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    md, tex = path_stem.with_suffix(".md"), path_stem.with_suffix(".tex")
    md.write_text(markdown(columns, rows) + (f"\n\n{caption}\n" if caption else "\n"))
    tex.write_text(latex(columns, rows, caption))
    return [md, tex]
