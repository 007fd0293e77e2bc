"""Typed tables: `schema` (Column, Reference, Table: what a result stores under "table") and `render` (markdown and
LaTeX from a Table, the one place a table becomes text). The variant table of edit-and-evaluate studies is built by
outlierlab.studies.variants.VariantTable."""
from outlierlab.tables.render import (
           format_cell,
           format_number,
           format_uncertain,
           latex,
           markdown,
           write_table,
)
from outlierlab.tables.schema import (
           COMPANIONS,
           SCHEMA,
           Column,
           Reference,
           Table,
           check_key,
           columns,
           interval_key,
           ratio_to_baseline,
           std_key,
           stderr_key,
)

__all__ = ["COMPANIONS", "SCHEMA", "Column", "Reference", "Table", "check_key", "columns", "format_cell",
           "format_number", "format_uncertain", "interval_key", "latex", "markdown", "ratio_to_baseline", "std_key",
           "stderr_key", "write_table"]
