"""The typed table layer: column specs, storage round trip, the reference block, keys that are never labels, the
variant table from evaluate results, and the one-shot migration of old stored tables."""
import importlib.util
import math
from pathlib import Path

import pytest

from outlierlab.evals.ppl import ppl_interval, ratio_interval
from outlierlab.results import read_result
from outlierlab.studies.variants import VariantTable, paper_reference
from outlierlab.tables import COMPANIONS, SCHEMA, Column, Reference, Table, latex, markdown
from outlierlab.tables.render import cells

ROOT = Path(__file__).resolve().parents[1]


def _migration():
    spec = importlib.util.spec_from_file_location("migrate_tables", ROOT / "scripts" / "migrate_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_column_spec_formats_unit_and_number_format():
    table = Table([Column("layer", "layer", fmt="d"), Column("peak_abs_ma", "peak |MA|", unit="abs", fmt=".1f"),
                   Column("share", "share", fmt=".0%"), Column("ppl", "PPL")],
                  [{"layer": 2, "peak_abs_ma": 24567.25, "share": 0.5, "ppl": 30.6412},
                   {"layer": 3, "peak_abs_ma": math.inf, "share": None, "ppl": 1234.5}])
    text = markdown(table)
    header, _, first, second = text.splitlines()
    assert header == "| layer | peak \\|MA\\| (abs) | share | PPL    |"  # a literal | is escaped in markdown
    assert [c.strip() for c in first.split("|")[1:-1]] == ["2", "24567.2", "50%", "30.641"]
    assert [c.strip() for c in second.split("|")[1:-1]] == ["3", "inf", "", "1234"]  # inf and None stay readable
    assert r"peak |MA| (abs) & share & PPL \\" in latex(table)


def test_table_round_trips_through_its_stored_dict():
    table = Table([Column("variant", "variant"), Column("wikitext2", "wikitext2", unit="PPL", fmt=".2f"),
                   Column("wikitext2", "paper wikitext2", reference=True)],
                  [{"variant": "original", "wikitext2": 30.6}, {"variant": "prune_sw", "wikitext2": 205.7}],
                  index="variant", caption="c",
                  reference=Reference(source="paper SW Table 1", model="llama7b", provenance="p. 4",
                                      values={"original": {"wikitext2": 5.68}}))
    stored = table.to_dict()
    assert stored["schema"] == SCHEMA and stored["columns"][0] == {"key": "variant", "label": "variant"}
    again = Table.from_dict(stored)
    assert again == table and again.to_dict() == stored
    with pytest.raises(ValueError, match="schema"):
        Table.from_dict({"columns": ["variant"], "rows": []})  # an old table is refused, not misread


def test_reference_block_is_rendered_beside_our_numbers():
    table = Table([Column("variant", "variant"), Column("c4", "c4"), Column("c4", "paper c4", reference=True)],
                  [{"variant": "original", "c4": 38.5}, {"variant": "prune_sw", "c4": 267.1}], index="variant",
                  reference=Reference(source="paper", values={"original": {"c4": 7.08}}))
    lines = markdown(table).splitlines()
    assert lines[0].split("|")[1:-1] == [" variant  ", " c4     ", " paper c4 "]
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == ["original", "38.500", "7.080"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["prune_sw", "267.10", ""]  # no paper value: empty
    # Rendering and storing never write the paper's numbers into our rows: they stay in the reference block.
    before = [dict(row) for row in table.rows]
    latex(table)
    stored = table.to_dict()
    assert table.rows == before and stored["rows"] == before
    assert stored["reference"]["values"] == {"original": {"c4": 7.08}}
    assert Table.from_dict(stored).rows[0]["c4"] == 38.5
    with pytest.raises(ValueError, match="reference"):
        Table([Column("c4", "paper c4", reference=True)], [])


@pytest.mark.parametrize("label", ["peak |MA|", "row = MA channel", "x original", "zero-shot mean", "W8A8"])
def test_a_display_label_is_refused_as_a_data_key(label):
    with pytest.raises(ValueError, match="snake_case"):
        Column(label, label)
    with pytest.raises(ValueError, match="snake_case"):
        Table([Column("variant", "variant")], [{"variant": "original", label: 1.0}])


def test_every_stored_table_is_typed_and_keyed_by_data_keys():
    """Every committed result's table is outlierlab.table/1; no row key is a display label (unless it is its own
    key, e.g. "wikitext2"), every row key is a column's key or its uncertainty companion (<key>_ci, _se, _sd)."""
    paths = sorted((ROOT / "results").glob("*/*/*.json"))
    tables = [(path, read_result(path)["table"]) for path in paths if read_result(path).get("table")]
    assert len(tables) > 40
    for path, stored in tables:
        table = Table.from_dict(stored)
        keys = {c.key for c in table.columns if not c.reference}
        keys |= {companion(key) for key in keys for companion in COMPANIONS.values()}
        labels = {c.label for c in table.columns} - {c.key for c in table.columns}
        for row in table.rows:
            assert set(row) <= keys, (path, set(row) - keys)
            assert not set(row) & labels, (path, set(row) & labels)
        if table.index:
            ids = [table.row_id(row) for row in table.rows]
            assert len(set(ids)) == len(ids), path


class FakeContext:
    """ctx.evaluate as the recipes see it: {"ppl": {protocol: {"ppl"}}, "zeroshot": {"tasks", "mean"}}."""

    def __init__(self, ppl: dict[str, float]):
        self.ppl = ppl

    def evaluate(self, names, context, label, observe=None):
        if "missing" in names:
            raise LookupError(label)
        value = self.ppl[label]
        return {"ppl": {"wikitext2": {"ppl": value}, "c4": {"ppl": 2 * value}},
                "zeroshot": {"tasks": {"piqa": {"acc": 0.5}}, "mean": 0.5}, "edits": []}


def test_variant_table_from_evaluate_results():
    reference = paper_reference({"source": "paper SW Table 1", "model": "llama7b",
                                 "values": {"original": {"wikitext2": 5.0, "zeroshot_mean": 70.0},
                                            "prune_sw": {"wikitext2": 50.0}}})
    variants = VariantTable(["wikitext2", "c4"], zeroshot=True, tasks=["piqa"], reference=reference, beside=False,
                            paper_ratio=True)
    details = variants.evaluate(FakeContext({"original": 10.0, "prune_sw": 40.0}),
                                {"original": [], "prune_sw": ["prune"], "gone": ["missing"]}, {},
                                skip={LookupError: "skipped: nothing to edit"},
                                extra=lambda evaluated: {"edits": len(evaluated["edits"])})
    assert list(details) == ["original", "prune_sw"]
    table = variants.table("caption", extra=[Column("edits", "edits")])
    rows = {row["variant"]: row for row in table.rows}
    assert rows["prune_sw"]["x_original"] == 4.0 and rows["original"]["zero_shot_mean"] == 50.0
    assert rows["prune_sw"]["piqa"] == 50.0 and rows["gone"] == {"variant": "gone", "note": "skipped: nothing to edit"}
    assert [c.header for c in table.columns] == [
        "variant", "wikitext2", "c4", "x original", "piqa", "zero-shot mean", "edits", "note", "paper wikitext2",
        "paper c4", "paper zero-shot mean", "paper x original"]
    assert table.reference.value("prune_sw", "x_original") == 10.0  # the paper's own ratio to its original
    assert Table.from_dict(variants.render("caption", extra=[Column("edits", "edits")])) == table
    beside = VariantTable(["wikitext2"], zeroshot=True, reference=reference)
    beside.add("original", FakeContext({"original": 10.0}).evaluate([], {}, "original"))
    assert [c.header for c in beside.table("c").columns] == [
        "variant", "wikitext2", "x original", "paper wikitext2", "zero-shot mean", "paper zero-shot mean"]


def test_migration_keeps_labels_values_and_moves_paper_columns_into_the_reference():
    migrate = _migration()
    record = {"reference": {"source": "paper QT Table 2"},
              "table": {"columns": ["variant", "FP ppl", "max |h|", "paper FP ppl"], "caption": "c",
                        "rows": [{"variant": "vanilla", "FP ppl": 20.5, "max |h|": 900.0, "paper FP ppl": 15.84},
                                 {"variant": "gated", "FP ppl": 19.0, "max |h|": 10.0, "paper FP ppl": None}]}}
    table = Table.from_dict(migrate.migrate_table("variants_table", record))
    assert [c.header for c in table.columns] == record["table"]["columns"]
    assert table.rows == [{"variant": "vanilla", "fp_ppl": 20.5, "max_abs_h": 900.0},
                          {"variant": "gated", "fp_ppl": 19.0, "max_abs_h": 10.0}]
    assert table.reference.values == {"vanilla": {"fp_ppl": 15.84}} and table.reference.source == "paper QT Table 2"
    assert migrate.key_of("row = MA channel") == "row_is_ma_channel" and migrate.key_of("peak |MA|") == "peak_abs_ma"


def test_a_composite_index_names_rows_for_the_reference_block():
    table = Table([Column("bits", "bits"), Column("block", "block"), Column("rtn_zs", "rtn"),
                   Column("rtn_zs", "paper rtn", reference=True)],
                  [{"bits": "INT4", "block": "128x128", "rtn_zs": 60.0}, {"bits": "INT3", "block": "128x128"}],
                  index=["bits", "block"], reference=Reference(source="paper SW Fig. 7",
                                                               values={"INT4/128x128": {"rtn_zs": 65.5}}))
    assert [table.row_id(row) for row in table.rows] == ["INT4/128x128", "INT3/128x128"]
    assert [table.value(row, table.columns[-1]) for row in table.rows] == [65.5, None]
    assert Table.from_dict(table.to_dict()) == table and table.to_dict()["index"] == ["bits", "block"]
    with pytest.raises(ValueError, match="index"):
        Table([Column("bits", "bits")], [{"bits": "INT4"}], index=["bits", "block"])


def test_a_repeated_column_key_is_refused_and_an_integer_spec_shows_floats_too():
    with pytest.raises(ValueError, match="repeat a key"):
        Table([Column("variant", "variant"), Column("c4", "c4"), Column("c4", "C4 again")], [])
    table = Table([Column("steps", "steps", fmt="d")], [{"steps": 12}, {"steps": 12.5}])
    assert [line[0] for line in cells(table)] == ["12", "12.500"]


def test_every_measured_cell_shows_its_uncertainty_and_the_paper_s_cells_none():
    def evaluated(nll, acc):
        return {"ppl": {"wikitext2": {"ppl": math.exp(sum(nll) / len(nll)), "window_nll": nll,
                                      "ppl_ci": ppl_interval(nll)}},
                "zeroshot": {"tasks": {"piqa": {"acc": acc, "acc_stderr": 0.05}}, "mean": acc, "mean_stderr": 0.05}}
    table = VariantTable(["wikitext2"], zeroshot=True, tasks=["piqa"],
                         reference=paper_reference({"source": "p", "values": {"original": {"wikitext2": 5.68}}}))
    table.add("original", evaluated([3.0, 3.2, 3.4, 3.1], 0.6))
    table.add("prune", evaluated([4.0, 4.3, 4.1, 4.2], 0.5))
    rows = {row["variant"]: row for row in table.table("c").rows}
    low, high = rows["prune"]["x_original_ci"]  # paired: the same windows resampled for both variants
    (p_low, p_high), (o_low, o_high) = rows["prune"]["wikitext2_ci"], rows["original"]["wikitext2_ci"]
    assert low < rows["prune"]["x_original"] < high and high / low < (p_high / o_low) / (p_low / o_high)
    assert rows["original"]["x_original_ci"] == [1.0, 1.0]
    text = markdown(table.table("c"))
    low, high = rows["prune"]["wikitext2_ci"]
    assert f"| {rows['prune']['wikitext2']:.3f} [{low:.3f}, {high:.3f}] |" in text
    assert "| 50.000 ± 5.000 |" in text and "| 5.680 " in text  # lm-eval's stderr x100; the paper's plain
    assert r"$\pm$" in latex(table.table("c"))


def test_the_bootstrap_is_seeded_and_covers_the_point_estimate():
    nll = [3.0, 3.5, 2.8, 3.9, 3.1, 3.3]
    low, high = ppl_interval(nll)
    assert low < math.exp(sum(nll) / len(nll)) < high and ppl_interval(nll) == [low, high]
    assert all(map(math.isnan, ppl_interval([3.0])))  # one window: no interval
    assert ratio_interval(nll, nll) == [1.0, 1.0] and ppl_interval([3.0, math.inf])[1] == math.inf


def test_the_sweep_table_keeps_every_cell_s_uncertainty(tmp_path):
    from outlierlab.reports.sweep import tables
    from outlierlab.results import write_result
    table = Table([Column("variant", "variant"), Column("ppl", "ppl"), Column("acc", "acc")],
                  [{"variant": "a", "ppl": 2.5, "ppl_ci": [2.0, 3.0], "acc": 50.0, "acc_se": 5.0}], index="variant")
    write_result({"table": table.to_dict()}, tmp_path / "results" / "exp" / "m" / "quick.json")
    markdown_path, _ = tables(tmp_path / "results", tmp_path / "tables")
    assert "| 2.500 [2.000, 3.000] | 50.000 ± 5.000 |" in markdown_path.read_text()
