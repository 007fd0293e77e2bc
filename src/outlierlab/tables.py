"""Plain-text tables from result rows (markdown; the paper's numbers sit in their own columns)."""
from __future__ import annotations

import math


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


def markdown(columns: list[str], rows: list[dict]) -> str:
    cells = [[format_number(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
