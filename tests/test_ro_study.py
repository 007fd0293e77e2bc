"""The RO experiments end to end on tiny models with planted outliers (saved as a local HF directory and loaded with
model=path, as a user's model would be): ro_gamma finds and removes a planted gain outlier's channel outlier,
ro_locate finds a planted MLP's massive activation where it is born, ro_smooth runs both smoothing places; the
reports rebuild from the results; bad input is one line and exit code 2."""
import pytest
from conftest import DATA_DIR, compose_cfg
from test_end_to_end import run_cli
from test_ro_probes import plant_gain, plant_mlp

from outlierlab import reports
from outlierlab.models.load import load_model
from outlierlab.runner import execute

pytestmark = pytest.mark.requires("data")
SMALL = ["eval.ppl.wikitext2.seqlen=64", "eval.ppl.wikitext2.windows=2", "~eval.ppl.c4", "logger=none",
         "exp.data.probe.windows=2", "exp.data.probe.seqlen=64"]


def _saved(tmp_path, plant) -> str:
    loaded = load_model(compose_cfg(["model=tiny_llama"]).model, tmp_path / "cache")
    plant(loaded)
    directory = tmp_path / "planted"
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return str(directory)


def _run(tmp_path, source, exp, *extra):
    cfg = compose_cfg([f"+exp={exp}", "model=path", f"model.source={source}", "model.name=planted",
                       "model.device=cpu", f"paths.results_dir={tmp_path / 'results'}",
                       f"paths.cache_dir={tmp_path / 'cache'}", f"paths.data_dir={DATA_DIR}", *SMALL, *extra])
    record = execute(cfg)
    assert record["weights_restored"] is True
    return record, {row["variant"]: row for row in record["table"]["rows"]} if record["table"][
        "index"] == ["variant"] else record["table"]["rows"]


def _has_paired_intervals(rows: dict, variants: list[str]) -> None:
    """Every compared number carries its interval: PPL over windows, x original paired over the same windows."""
    for variant in ["original", *variants]:
        low, high = rows[variant]["wikitext2_ci"]
        assert low <= rows[variant]["wikitext2"] <= high
    for variant in variants:
        low, high = rows[variant]["x_original_ci"]
        assert low < high and low <= rows[variant]["x_original"] <= high


def test_ro_gamma_removes_a_planted_channel_outlier_and_the_control_does_not(tmp_path):
    source = _saved(tmp_path, lambda loaded: plant_gain(loaded, "norm2", 7, 60.0))
    record, rows = _run(tmp_path, source, "ro_gamma", "exp.w8a8_protocols=[wikitext2]")
    assert record["gamma_outliers"]["roles"]["norm2"]["consistent"] == [7]
    assert rows["original"]["int8_features"] == 1 and rows["original"]["channels_reset"] == 0
    for variant in ("reset_one", "reset_mean"):
        assert rows[variant]["channels_reset"] >= 4 and rows[variant]["int8_features"] == 0
    assert rows["random_one"]["int8_features"] == 1  # resetting other channels leaves the outlier
    assert rows["original"]["w8a8_wikitext2"] > 1
    assert record["coincidence"]["norm2"]["also_activation_outliers"] == 4
    assert record["coincidence_relative"]["norm2"]["also_activation_outliers"] == 4
    _has_paired_intervals(rows, ["reset_one", "reset_mean", "random_one"])
    low, high = rows["original"]["w8a8_wikitext2_ci"]  # W8A8 PPL with its interval too
    assert low <= rows["original"]["w8a8_wikitext2"] <= high
    cost = rows["original"]["w8a8_wikitext2_x_fp"]  # what W8A8 costs, paired over the same windows
    assert cost == pytest.approx(rows["original"]["w8a8_wikitext2"] / rows["original"]["wikitext2"]) and cost != 1
    low, high = rows["original"]["w8a8_wikitext2_x_fp_ci"]
    assert low <= cost <= high
    assert "INT8 activations per token" in record["table"]["caption"]  # the protocol that ran, not a fixed text
    written = reports.run_builders("tables", tmp_path / "results", tmp_path / "out", only=["ro"])
    written += reports.run_builders("figures", tmp_path / "results", tmp_path / "out", only=["ro"])
    assert {p.name for p in written} >= {"ro_gamma_planted_quick.md", "ro_gamma_planted_quick.png"}


def test_ro_locate_and_ro_smooth_on_a_planted_mlp(tmp_path):
    source = _saved(tmp_path, lambda loaded: plant_mlp(loaded, layer=2, row=11, col=40))
    record, rows = _run(tmp_path, source, "ro_locate")
    (born,) = record["birth"]["channels"]
    assert born["channel"] == 11 and born["born_at"] == "layers.2.mlp.act.out" and born["born_label"] == "y6"
    assert [row["site"] for row in rows if row["born_here"]] == ["layers.2.mlp.act.out"]
    record, rows = _run(tmp_path, source, "ro_smooth", "exp.calibration.windows=2", "exp.calibration.seqlen=64")
    (used,) = record["massive_activations"]["used"]
    assert used["first_layer"] == 2 and used["channels"] == [11]
    assert rows["birth_clip"]["edited_at"] == "birth (1 sites, clip)"
    assert rows["skip_clip"]["edited_at"] == "skip (1 sites, clip)"  # layer 3, the only later one
    assert rows["birth_clip"]["wikitext2"] != rows["original"]["wikitext2"]
    _has_paired_intervals(rows, ["birth_clip", "skip_clip"])
    written = reports.run_builders("figures", tmp_path / "results", tmp_path / "out", only=["ro"])
    assert {p.name for p in written} >= {"ro_locate_planted_quick.png", "ro_smooth_planted_quick.png"}


def test_ro_locate_and_ro_smooth_without_a_massive_activation(tmp_path):
    """A model with no MA (as the tiny trained ones): nothing is born, every smoothing variant is skipped, and the
    figures still build (saying so instead of an empty panel)."""
    source = _saved(tmp_path, lambda loaded: None)
    record, _ = _run(tmp_path, source, "ro_locate")
    assert record["birth"]["channels"] == [] and record["traces"] == {}
    record, rows = _run(tmp_path, source, "ro_smooth", "exp.calibration.windows=2", "exp.calibration.seqlen=64")
    assert record["massive_activations"]["used"] == []
    assert {v for v, row in rows.items() if "note" in row} == set(rows) - {"original"}
    written = reports.run_builders("figures", tmp_path / "results", tmp_path / "out", only=["ro"])
    assert {p.name for p in written} >= {"ro_locate_planted_quick.png", "ro_smooth_planted_quick.png"}


@pytest.mark.parametrize("args,message", [
    (["+exp=ro_gamma", "exp.interventions.reset_one.value=two"], "exp.interventions.reset_one: value='two'"),
    (["+exp=ro_gamma", "exp.criterion.layer_share=2"], "exp.criterion.layer_share=2"),
    (["+exp=ro_smooth", "exp.massive_activations=somewhere"], "exp.massive_activations=somewhere"),
    (["+exp=ro_locate", "exp.criterion.min_share=0"], "exp.criterion.min_share=0"),
])
def test_bad_ro_input_is_one_line_and_exit_2(args, message, tmp_path):
    # (a Hydra plugin another checkout installs may warn on import: not this program's output)
    done = run_cli([*args, "model=tiny_llama", "logger=none"], tmp_path, PYTHONWARNINGS="ignore::UserWarning")
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()
