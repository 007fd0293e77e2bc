"""The report registry and the table writers that make_tables/make_figures build on."""
import subprocess
import sys
from pathlib import Path

import pytest

from outlierlab import reports
from outlierlab.tables import latex, write_table

ROOT = Path(__file__).resolve().parents[1]


def test_latex_escapes_specials_and_keeps_numbers():
    text = latex(["a_b", "x%"], [{"a_b": "c\\d&", "x%": 1.5}], caption="cap_1")
    assert r"a\_b & x\% \\" in text
    assert r"c\textbackslash{}d\& & 1.500 \\" in text
    assert r"\caption{cap\_1}" in text


def test_write_table_writes_markdown_and_latex(tmp_path):
    paths = write_table(["v", "ppl"], [{"v": "original", "ppl": 30.6}], tmp_path / "t1", caption="c")
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


def test_sw_table1_renders_from_the_record_not_the_config(tmp_path):
    """A record that stores the paper's numbers (paper_reference) renders the same table with its config's
    reference removed; records written before it did fall back to the config (the committed results)."""
    import json
    from outlierlab.reports.sw import table1
    committed = ROOT / "results" / "prune_sw" / "smollm2_135m" / "quick.json"
    old = json.loads(committed.read_text())
    new = json.loads(committed.read_text())
    new["paper_reference"] = new["config"]["exp"].pop("reference")
    for name, record in (("old", old), ("new", new)):
        target = tmp_path / name / "prune_sw" / "smollm2_135m" / "quick.json"
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(record))
    [old_md, _] = table1(tmp_path / "old", tmp_path / "old_tables")
    [new_md, _] = table1(tmp_path / "new", tmp_path / "new_tables")
    assert new_md.read_text() == old_md.read_text() and "paper wikitext2" in new_md.read_text()
