"""results/README.md cannot drift from its records: every linked number equals its record's value to the digits it
shows, every rendered table is the record's (outlierlab.reports.prose)."""
from pathlib import Path

import pytest
from conftest import ROOT

from outlierlab.reports import prose
from outlierlab.results import write_result
from outlierlab.tables import Column, Table

README = ROOT / "results" / "README.md"


def test_results_readme_states_what_its_records_hold():
    problems, ties = prose.check(README)
    assert not problems, "\n".join(problems)
    assert ties >= 20  # the prose is tied to its records, not just parsed


@pytest.mark.parametrize("text,value,holds", [
    ("30.64", 30.6406, True), ("30.64", 30.646, False), ("1,211", 1211.4, True), ("1.4e4", 14_230.0, True),
    ("1.4e4", 15_000.0, False), ("x6.7", 6.712, True), ("40", 40.0, True), ("55", 52.5, False), ("none", 1.0, False),
    ("45", float("nan"), False),
])
def test_a_stated_number_holds_its_value_to_the_digits_shown(text, value, holds):
    assert prose.states(text, value) is holds


def test_a_path_reaches_list_items_and_keys_that_dots_would_split():
    record = {"rows": [{"variant": "a", "ci": [1.0, 2.0]}], "focus": {".": {"ratio": 0.28}, "the": {"ratio": 1.5}}}
    assert prose.lookup(record, "rows[variant=a].ci[1]") == 2.0
    assert prose.lookup(record, "focus['.'].ratio") == 0.28 and prose.lookup(record, "focus.the.ratio") == 1.5
    with pytest.raises(KeyError):
        prose.lookup(record, "focus['..'].ratio")


def test_a_drifted_number_and_a_stale_table_are_named(tmp_path):
    table = Table([Column("variant", "variant"), Column("ppl", "ppl")], [{"variant": "a", "ppl": 2.5, "ppl_ci": [2.0, 3.0]}],
                  index="variant")
    write_result({"variants": [{"name": "a", "ppl": 2.5}], "table": table.to_dict()}, tmp_path / "exp" / "r.json")
    readme = tmp_path / "README.md"
    readme.write_text("PPL [2.5](exp/r.json#variants[name=a].ppl), not [2.7](exp/r.json#variants[0].ppl); "
                      "[3](exp/r.json#variants[name=b].ppl)\n<!-- table: exp/r.json -->\n| old |\n<!-- /table -->\n")
    problems, ties = prose.check(readme)
    assert ties == 4 and len(problems) == 3
    assert "[2.7](exp/r.json#variants[0].ppl): the record holds 2.5" in problems[0]
    assert "no such value" in problems[1] and "is not the record's" in problems[2]
    assert prose.render_tables(readme) and "| a       | 2.500 [2.000, 3.000] |" in readme.read_text()
    assert len(prose.check(readme)[0]) == 2 and not prose.render_tables(readme)


def test_a_table_file_block_is_the_file_the_reports_wrote(tmp_path):
    """A table over several records (seeds, a sweep) is rendered from the file the reports built, and held to it."""
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.md").write_text("| method | ppl |\n|---|---|\n| a | 1.5 ± 0.1 |\n\ncaption\n")
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- table: tables/t.md -->\n| stale |\n<!-- /table -->\n")
    problems, ties = prose.check(readme)
    assert ties == 1 and "is not the record's" in problems[0]
    assert prose.render_tables(readme) and "| a | 1.5 ± 0.1 |" in readme.read_text()
    assert prose.check(readme) == ([], 1)
    (tmp_path / "tables" / "t.md").unlink()
    assert "No such file" in prose.check(readme)[0][0]


def test_every_paper_statement_of_the_readmes_cited_here_is_in_papers_md():
    """The paper numbers results/README compares with, each in shared/docs/papers.md (the project's source)."""
    papers = ROOT.parent / "shared" / "docs" / "papers.md"
    if not papers.is_file():
        pytest.skip(f"needs {papers}")
    text = papers.read_text()
    for number in ("5.68", "1211", "763.65", "70.11", "35.14", "66.21", "57.85", "45.40", "27.55", "70.12",
                   "70.55"):
        assert number in text, number
    readmes = README.read_text() + (ROOT / "README.md").read_text()
    for unsourced in ("~1e4x", "100 x 4096 of RedPajama", "loses nothing at 128x128", "thousands of steps at which"):
        assert unsourced not in readmes, unsourced


def test_linked_records_exist_and_are_under_results():
    text = README.read_text()
    linked = {Path(relative) for _, relative, _ in prose.LINK.findall(text)}
    assert linked and all((README.parent / path).is_file() for path in linked)
