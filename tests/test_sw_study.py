"""The super-weight study end to end on a tiny model that has a planted super weight and no YAML of its own
(model=path): each recipe composes from the real configs, runs, writes its result, and the "sw" report builders
regenerate tables and figures from those results alone."""
import math

import pytest
import torch
from conftest import DATA_DIR, SMALL_EVAL, compose_cfg, plant_super_weight
from omegaconf import OmegaConf

from outlierlab.errors import ConfigError
from outlierlab.evals.stopwords import is_stopword, probability_shift
from outlierlab.models.load import load_model
from outlierlab.reports import discover
from outlierlab.reports.sw import table1
from outlierlab.results import read_result, write_result
from outlierlab.runner import execute, preflight
from outlierlab.studies.variants import VariantTable, paper_reference

pytestmark = pytest.mark.requires("data")

SW = (1, 7, 33)
SHRINK = {"sw_index": [], "sw_activations": [], "sw_stopwords": [],
          "sw_scale": ["eval=quick", "exp.scales.step=null", "exp.scales.extra=[0,1,2]"]}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny llama with a planted super weight saved as a HF directory, and every sw recipe run on it."""
    root = tmp_path_factory.mktemp("sw")
    loaded = load_model(compose_cfg(["model=tiny_llama"]).model, root / "cache")
    plant_super_weight(loaded, *SW)
    model_dir = root / "tiny-planted"
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    records = {}
    for exp, extra in SHRINK.items():
        cfg = compose_cfg([f"+exp={exp}", "model=path", f"model.source={model_dir}", "logger=none", *SMALL_EVAL,
                           f"paths.results_dir={root / 'results'}", f"paths.cache_dir={root / 'cache'}",
                           f"paths.data_dir={DATA_DIR}", *extra])
        records[exp] = execute(cfg)
    return root / "results", records


def test_sw_index_for_a_model_given_by_path(study):
    results, _ = study
    record = read_result(results / "sw_index" / "tiny-planted" / "quick.json")
    assert record["super_weights"]["detected"] == [str(SW)]
    assert record["super_weights"]["rows_equal_ma_channel"] == [True]
    assert record["massive_activation"]["channel"] == SW[1]
    [candidate] = [c for c in record["candidates"] if c["detected"]]
    assert candidate["magnitude_rank"] == 1 and candidate["value"] == 50.0
    rows = {row["candidate"]: row for row in record["table"]["rows"]}
    # importance measured: zeroing the planted super weight moves PPL, and x original is that PPL over the original's
    original = rows["none (original)"]["wikitext2"]
    assert rows[str(SW)]["x_original"] == pytest.approx(rows[str(SW)]["wikitext2"] / original)
    assert abs(rows[str(SW)]["x_original"] - 1) > 1e-3  # a no-op would give exactly 1
    low, high = rows[str(SW)]["x_original_ci"]  # paired over the same windows
    assert low <= rows[str(SW)]["x_original"] <= high and len(rows[str(SW)]["wikitext2_ci"]) == 2
    assert rows["all detected"]["wikitext2"] == rows[str(SW)]["wikitext2"]  # the planted one is all that is detected
    assert record["weights_restored"]


def test_activation_profiles_show_the_spike_and_its_removal(study):
    record = study[1]["sw_activations"]
    spike = max(record["down_proj_profile"], key=lambda layer: layer["output_max"]["abs"])
    assert spike["layer"] == SW[0] and spike["output_max"]["channel"] == SW[1]
    residual = record["residual_profile"]
    assert set(residual) == {"original", "prune_sw", "prune_non_sw", "prune_all", "prune_non_sw_scaled",
                             "prune_all_scaled"}
    peak = max(layer["max_abs"] for layer in residual["original"])
    assert max(layer["max_abs"] for layer in residual["prune_sw"]) < 0.1 * peak  # the super activation is gone


def test_stopword_shift_and_scale_sweep_are_recorded(study):
    records = study[1]
    shift = records["sw_stopwords"]["shift"]
    assert len(shift["gainers"]) == 30 and shift["gainers"][0]["gain"] >= shift["gainers"][-1]["gain"]
    points = records["sw_scale"]["points"]
    assert [p["scale"] for p in points] == [0.0, 1.0, 2.0]
    # scale 1 is the original model; scales 0 and 2 move PPL (a no-op edit would reproduce it bit for bit)
    ppl = [p["ppl"]["wikitext2"]["ppl"] for p in points]
    assert ppl[0] != ppl[1] and ppl[2] != ppl[1] and abs(ppl[0] / ppl[1] - 1) > 1e-3


def test_report_builders_regenerate_from_results(study, tmp_path):
    results, _ = study
    report = discover()["sw"]
    tables = report.tables(results, tmp_path / "tables")
    figures = report.figures(results, tmp_path / "figures")
    names = {path.name for path in tables + figures}
    assert "sw_table2.md" in names and "sw_table2.tex" in names
    assert {f"sw_fig{n}_tiny-planted_quick.png" for n in (3, 4, 5, 6)} <= names
    assert str(SW) in (tmp_path / "tables" / "sw_table2.md").read_text()
    assert report.tables(tmp_path / "empty", tmp_path / "t") == [] == report.figures(tmp_path / "empty", tmp_path)


def test_table1_has_the_papers_numbers_beside_ours(tmp_path):
    cfg = compose_cfg(["+exp=prune_sw"])
    table = VariantTable(["wikitext2", "c4"], zeroshot=True, reference=paper_reference(
        OmegaConf.to_container(cfg.exp.reference)), beside=False, paper_ratio=True)  # as prune_sw builds it
    for variant, ppl, mean in (("original", 30.0, 0.48), ("prune_sw", 90.0, 0.44)):
        table.add(variant, {"ppl": {"wikitext2": {"ppl": ppl}, "c4": {"ppl": ppl + 10}},
                            "zeroshot": {"tasks": {}, "mean": mean}})
    record = {"model": {"name": "m", "kind": "tiny"}, "table": table.render("c")}
    write_result(record, tmp_path / "prune_sw" / "m" / "quick.json")
    md, _ = table1(tmp_path, tmp_path / "out")
    text = md.read_text()
    assert "paper wikitext2" in text and "1211" in text and "70.110" in text and "35.140" in text
    assert "213.20" in text  # the paper's PPL ratio, 1211 / 5.68, beside ours


@pytest.mark.parametrize("overrides,message", [
    (["+exp=sw_stopwords", "exp.protocol=lambada"], "exp.protocol=lambada"),
    (["+exp=sw_scale", "exp.scales.step=-1"], "exp.scales"),
    (["+exp=sw_scale", "exp.protocols=[c5]"], "exp.protocols: c5"),
])
def test_bad_sw_config_is_caught_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preflight(compose_cfg(["model=tiny_llama", *overrides]))


def test_stopword_marking():
    words = {"the", ".", ","}
    assert is_stopword(" The", words, whitespace=False) and is_stopword(".", words, whitespace=False)
    assert is_stopword("\n", words, whitespace=True) and not is_stopword("\n", words, whitespace=False)
    assert not is_stopword(" theory", words, whitespace=True)


def test_probability_shift_ranks_gainers_with_paired_intervals(tiny_llama):
    stopwords = compose_cfg(["+exp=sw_stopwords"]).exp.stopwords
    vocab, windows = len(tiny_llama.tokenizer), 6
    period = tiny_llama.tokenizer.convert_tokens_to_ids(".")
    word = next(i for i in range(vocab) if tiny_llama.tokenizer.decode([i]) == "z")  # not a stopword
    generator = torch.Generator().manual_seed(0)
    before = torch.rand(windows, vocab, generator=generator, dtype=torch.float64) + 1.0
    before /= before.sum(1, keepdim=True)
    after = before.clone()
    after[:, period] += 0.1  # the same gain in every window: a tight interval
    after[:, word] += torch.tensor([0.05, -0.001, -0.001, -0.001, -0.001, -0.001], dtype=torch.float64)
    shift = probability_shift(tiny_llama.tokenizer, before, after, stopwords, top=3)
    first, second = shift["gainers"][:2]
    assert first["text"] == "." and first["stopword"] and shift["windows"] == windows
    assert first["gain"] == pytest.approx((after - before)[:, period].mean().item())
    low, high = first["gain_ci"]
    assert 0 < low <= first["gain"] <= high and high - low < 1e-9
    # one window drives the second gainer: its interval reaches below zero (not separated from no change)
    assert second["id"] == word and not second["stopword"]
    assert second["gain_ci"][0] < 0 < second["gain"] <= second["gain_ci"][1]
    assert second["ratio_ci"][0] < 1 < second["ratio_ci"][1]
    low, high = shift["stopword_mass_gain_ci"]
    assert 0 < low <= shift["stopword_mass_gain"] <= high
    assert shift["stopword_mass_after"] > shift["stopword_mass_before"]
    assert shift["stopword_mass_before_ci"][0] <= shift["stopword_mass_before"] <= shift["stopword_mass_before_ci"][1]
    low, high = shift["stopword_share_of_top_gainers_ci"]
    assert 0 <= low <= high <= 1
    # one window: no interval, never a fake one
    single = probability_shift(tiny_llama.tokenizer, before[:1], after[:1], stopwords, top=3, focus=["."])
    assert all(math.isnan(v) for v in single["gainers"][0]["gain_ci"] + single["focus"]["."]["ratio_ci"])
