"""The report registry and the table writers that make_tables/make_figures build on."""
import subprocess
import sys
from pathlib import Path

import pytest

from outlierlab import reports
from outlierlab.tables import Column, Table, latex, write_table

ROOT = Path(__file__).resolve().parents[1]


def test_latex_escapes_specials_and_keeps_numbers():
    table = Table([Column("a_b", "a_b"), Column("x", "x%")], [{"a_b": "c\\d&", "x": 1.5}], caption="cap_1")
    text = latex(table)
    assert r"a\_b & x\% \\" in text
    assert r"c\textbackslash{}d\& & 1.500 \\" in text
    assert r"\caption{cap\_1}" in text


def test_write_table_writes_markdown_and_latex(tmp_path):
    paths = write_table(Table([Column("v", "v"), Column("ppl", "ppl")], [{"v": "original", "ppl": 30.6}], caption="c"),
                        tmp_path / "t1")
    assert [p.suffix for p in paths] == [".md", ".tex"]
    assert "| original | 30.600 |" in paths[0].read_text()


def test_unknown_report_name_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no_such_report"):
        reports.run_builders("tables", tmp_path, tmp_path / "out", only=["no_such_report"])


def test_make_scripts_run_on_an_empty_results_dir(tmp_path):
    for script in ("make_tables.py", "make_figures.py"):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--results", str(tmp_path)],
                              check=False, capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr


def test_sw_table1_renders_from_the_stored_table_not_the_config(tmp_path):
    """The paper's numbers come from the stored table's reference block: removing the run's config changes nothing."""
    import json
    from outlierlab.reports.sw import table1
    committed = ROOT / "results" / "prune_sw" / "smollm2_135m" / "quick.json"
    with_config = json.loads(committed.read_text())
    without = json.loads(committed.read_text())
    without["config"] = {}
    for name, record in (("with", with_config), ("without", without)):
        target = tmp_path / name / "prune_sw" / "smollm2_135m" / "quick.json"
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(record))
    [with_md, _] = table1(tmp_path / "with", tmp_path / "with_tables")
    [without_md, _] = table1(tmp_path / "without", tmp_path / "without_tables")
    assert without_md.read_text() == with_md.read_text() and "paper wikitext2" in with_md.read_text()
    assert with_md.read_text() == (ROOT / "results" / "tables" / "sw_table1_smollm2_135m_quick.md").read_text()
