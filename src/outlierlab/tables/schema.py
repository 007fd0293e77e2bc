"""The typed table every recipe stores and every report renders: columns with a spec, rows keyed by column key,
and the paper's numbers in one reference block.

    Table(columns=[Column("variant", "variant"), Column("wikitext2", "wikitext2"), Column("x_original", "x original"),
                   Column("wikitext2", "paper wikitext2", reference=True)],
          rows=[{"variant": "original", "wikitext2": 30.6, "x_original": 1.0}], index="variant",
          reference=Reference(source="Yu et al. 2024, Table 1", model="llama7b",
                              values={"original": {"wikitext2": 5.68}}),
          caption="...")

A column's `key` is data (snake_case, stable); its `label` is display only and never a key. A row's id is its value
of the `index` key(s) ("original"; "INT4/128x128" for index ["bits", "block"]). A reference column takes its value
from `reference.values[<row id>][<key>]`, so the paper's numbers sit beside ours without being copied into our rows.
`to_dict()` is what a result JSON stores under "table".

A measured value may carry its uncertainty in a companion key of the same row: `<key>_ci` = [low, high] (an interval,
shown "30.6 [29.1, 32.0]"), `<key>_se` = a standard error or `<key>_sd` = a standard deviation (both shown
"45.0 ± 15.7"; the caption says which). `Table.uncertainty` finds it;
reference columns (the paper's numbers) have none.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

SCHEMA = "outlierlab.table/1"
KEY = re.compile(r"[a-z0-9][a-z0-9_-]*")  # lm-eval task names may hold a "-"; no space, capital or symbol


def interval_key(key: str) -> str:
    return f"{key}_ci"


def stderr_key(key: str) -> str:
    return f"{key}_se"


def std_key(key: str) -> str:
    return f"{key}_sd"


# uncertainty kind -> its companion key: an interval, a standard error, a standard deviation (over seeds, say)
COMPANIONS = {"ci": interval_key, "se": stderr_key, "sd": std_key}


def row_id(row: dict, index: list[str]) -> str | None:
    """A row's id: its value of each index key, joined by "/" (None without an index or with a value missing)."""
    values = [row.get(key) for key in index]
    return None if not values or None in values else "/".join(map(str, values))


def check_key(key: str) -> str:
    """A data key: lower-case letters, digits, underscores and hyphens (so a display label like "peak |MA|" is
    refused)."""
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise ValueError(f"table key {key!r} is not snake_case: keys are data, labels are for display")
    return key


@dataclass(frozen=True)
class Column:
    key: str  # the data key of the rows (or of the reference values when `reference`)
    label: str  # the header shown; display only
    unit: str | None = None  # shown after the label: "label (unit)"
    fmt: str = "auto"  # "auto" (format_number) or a format spec for numbers, e.g. ".1f", ".2e", "d"
    reference: bool = False  # the value comes from the table's reference block, not from our row

    def __post_init__(self):
        check_key(self.key)

    @property
    def header(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def to_dict(self) -> dict:
        out = {"key": self.key, "label": self.label}
        out.update({name: value for name, value, default in (("unit", self.unit, None), ("fmt", self.fmt, "auto"),
                                                             ("reference", self.reference, False)) if value != default})
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Column:
        return cls(**data)


@dataclass(frozen=True)
class Reference:
    """A paper's numbers for this table: values keyed by row id, then column key."""
    source: str  # paper and table/figure, e.g. "Yu et al. 2024 (The Super Weight in LLMs), Table 1"
    values: dict = field(default_factory=dict)  # {row id: {column key: value}}
    model: str | None = None  # the paper's model (which may not be ours)
    provenance: str | None = None  # where the numbers were read (page, table, appendix), if not obvious

    def __post_init__(self):
        for row in self.values.values():
            for key in row:
                check_key(key)

    def value(self, row_id, key: str):
        return (self.values.get(row_id) or {}).get(key)

    def to_dict(self) -> dict:
        out = {"source": self.source, "model": self.model, "values": self.values}
        return {**out, **({"provenance": self.provenance} if self.provenance else {})}

    @classmethod
    def from_dict(cls, data: dict | None) -> Reference | None:
        return None if data is None else cls(**data)


@dataclass
class Table:
    columns: list[Column]
    rows: list[dict] = field(default_factory=list)  # {column key: value}
    index: list[str] | str = field(default_factory=list)  # the key(s) whose values are a row's id ([]: its position)
    reference: Reference | None = None
    caption: str = ""

    def __post_init__(self):
        self.index = [self.index] if isinstance(self.index, str) else list(self.index or [])
        ours = [column.key for column in self.columns if not column.reference]
        keys = set(ours)
        if len(keys) < len(ours):
            raise ValueError(f"table columns repeat a key: {sorted(k for k in keys if ours.count(k) > 1)}")
        for row in self.rows:
            for key in row:
                check_key(key)
        if self.rows and set(self.index) - keys:
            raise ValueError(f"table index {self.index} is not among its columns")
        if any(column.reference for column in self.columns) and self.reference is None:
            raise ValueError("a reference column needs the table's reference block")

    def row_id(self, row: dict) -> str | None:
        return row_id(row, self.index)

    def value(self, row: dict, column: Column):
        if column.reference:
            return self.reference.value(self.row_id(row), column.key)
        return row.get(column.key)

    def uncertainty(self, row: dict, column: Column) -> tuple[str, object] | None:
        """("ci", [low, high]), ("se", stderr) or ("sd", std) of a cell of ours, or None."""
        if column.reference:
            return None
        for kind, companion in COMPANIONS.items():
            key = companion(column.key)
            if row.get(key) is not None:
                return kind, row[key]
        return None

    def with_caption(self, caption: str) -> Table:
        return replace(self, caption=caption)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "index": self.index, "columns": [column.to_dict() for column in self.columns],
                "rows": self.rows, "reference": self.reference.to_dict() if self.reference else None,
                "caption": self.caption}

    @classmethod
    def from_dict(cls, data: dict) -> Table:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"table schema {data.get('schema')!r}, expected {SCHEMA!r} (see scripts/migrate_tables.py)")
        return cls(columns=[Column.from_dict(c) for c in data["columns"]], rows=[dict(r) for r in data["rows"]],
                   index=data.get("index"), reference=Reference.from_dict(data.get("reference")),
                   caption=data.get("caption") or "")


def columns(*specs: str | tuple[str, str] | Column) -> list[Column]:
    """Columns from short specs: "variant" (key = label), ("max_abs_h", "max abs(h)") or a Column."""
    return [spec if isinstance(spec, Column) else Column(spec, spec) if isinstance(spec, str) else Column(*spec)
            for spec in specs]


def ratio_to_baseline(rows: list[dict], key: str, column: str = "x_original", baseline: str = "original",
                      index: str = "variant") -> None:
    """Add `column` = row[key] / (the baseline row's row[key]) to every row that has `key`."""
    base = next((row for row in rows if row.get(index) == baseline and key in row), None)
    for row in rows:
        if base and key in row:
            row[column] = row[key] / base[key]
