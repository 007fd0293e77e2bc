"""Massive-activation interventions (paper MA Table 3): the hooks edit exactly the targeted activations and vanish on
undo; the calibration means are right, cached, and recomputed when the model or the data change; the study runs end
to end on a tiny model and its tables regenerate from results/."""
import pytest
import torch
from conftest import DATA_DIR, SMALL_EVAL, compose_cfg, weights_hash

from outlierlab.errors import ConfigError
from outlierlab.evals.data import Corpus
from outlierlab.evals.ppl import build_windows
from outlierlab.interventions.base import EditSession
from outlierlab.interventions.massive_activation import (
    NoMassiveActivations,
    SetMassiveActivations,
    ZeroMedianActivations,
)
from outlierlab.models import massive
from outlierlab.models.massive import MassiveActivation
from outlierlab.probes.activation_means import calibrated_means
from outlierlab.reports import ma_intervention
from outlierlab.runner import execute, preflight

MA = MassiveActivation(first_layer=1, channels=(3, 7), positions=(0, 2))


def block_outputs(loaded, ids) -> dict[int, torch.Tensor]:
    """Every `layers.{i}.out` as the rest of the model sees it (hooks registered after any intervention's)."""
    seen = {}
    with loaded.sites.hooks(loaded.sites.per_layer("layers.{i}.out",
                                                   lambda i: lambda h: seen.__setitem__(i, h.detach().clone()))):
        logits = loaded.model(ids).logits
    return seen, logits


def targeted(hidden: torch.Tensor, location=MA) -> torch.Tensor:
    mask = torch.zeros_like(hidden, dtype=torch.bool)
    for position in location.positions:
        mask[:, position, list(location.channels)] = True
    return mask


def fake_means(num_layers: int) -> dict:
    """Means the hooks should write: a different value per layer, position and channel."""
    values = [[[100.0 * layer + 10 * p + c for c in range(len(MA.channels))] for p in range(len(MA.positions))]
              for layer in range(num_layers)]
    return {"locations": [{**MA.describe(), "mean": values}]}


@pytest.mark.parametrize("value", ["zero", "mean"])
def test_set_changes_exactly_the_targeted_activations_and_undo_restores(tiny_llama, value):
    ids = torch.tensor([tiny_llama.encode("Massive activations sit on the first token.")])
    before, logits_before = block_outputs(tiny_llama, ids)
    weights = weights_hash(tiny_llama.model)
    means = fake_means(tiny_llama.sites.num_layers)
    with EditSession(tiny_llama, {"massive_activations": [MA], "ma_means": means}) as session:
        session.apply([SetMassiveActivations(value, layers="first")])
        after, logits_after = block_outputs(tiny_llama, ids)
        mask = targeted(after[1])
        expected = torch.zeros(2, 2) if value == "zero" else torch.tensor(means["locations"][0]["mean"][1])
        for index, position in enumerate(MA.positions):
            assert torch.equal(after[1][0, position, list(MA.channels)], expected[index])
        assert torch.equal(after[1][~mask], before[1][~mask])      # nothing else at the edited layer
        assert torch.equal(after[0], before[0])                    # nor before it
        assert not torch.equal(logits_after, logits_before)        # and it propagates
        assert session.log[-1]["layers"] == [1]
    assert weights_hash(tiny_llama.model) == weights
    again, logits_again = block_outputs(tiny_llama, ids)
    assert torch.equal(logits_again, logits_before)                # hooks gone: identical outputs
    assert all(torch.equal(again[i], before[i]) for i in before)


def test_every_layer_and_explicit_layers(tiny_llama):
    ids = torch.tensor([tiny_llama.encode("Every layer from the first one on.")])
    with EditSession(tiny_llama, {"massive_activations": [MA]}) as session:
        session.apply([SetMassiveActivations("zero", layers="all")])
        after, _ = block_outputs(tiny_llama, ids)
        assert session.log[-1]["layers"] == [1, 2, 3]
    for layer in (1, 2, 3):
        assert (after[layer][targeted(after[layer])] == 0).all()
    assert (after[0][targeted(after[0])] != 0).all()
    assert MA.layers([0, 3], 4) == [0, 3]


def test_zero_median_control_zeroes_as_many_median_activations(tiny_llama):
    ids = torch.tensor([tiny_llama.encode("The control zeroes ordinary activations.")])
    before, _ = block_outputs(tiny_llama, ids)
    with EditSession(tiny_llama, {"massive_activations": [MA]}) as session:
        session.apply([ZeroMedianActivations(layers="first")])
        after, _ = block_outputs(tiny_llama, ids)
    changed = after[1] != before[1]
    assert int(changed.sum()) == len(MA.positions) * len(MA.channels)
    assert (after[1][changed] == 0).all() and not changed[targeted(after[1])].any()
    magnitude = before[1].abs()
    median = magnitude.reshape(-1).median()
    # the zeroed ones are the nearest to the median: no untouched non-MA activation is nearer
    untouched = (~changed) & (~targeted(after[1]))
    nearest_untouched = (magnitude[untouched] - median).abs().min()
    assert ((magnitude[changed] - median).abs() <= nearest_untouched).all()


def test_interventions_validate_and_need_massive_activations(tiny_llama):
    with pytest.raises(ValueError, match="value='half'"):
        SetMassiveActivations("half")
    with pytest.raises(ValueError, match="layers='some'"):
        ZeroMedianActivations(layers="some")
    with pytest.raises(NoMassiveActivations):
        EditSession(tiny_llama, {}).apply([SetMassiveActivations("zero")])
    with pytest.raises(ValueError, match="calibration means"):
        EditSession(tiny_llama, {"massive_activations": [MA]}).apply([SetMassiveActivations("mean")])


def test_registry_entries_parse_to_positions():
    found, notes = massive.parse([{"first_layer": 1, "tokens": ["BOS", 'first "." or "\\n"'], "channels": [9, 4]},
                                  {"first_layer": 2, "channels": [5], "positions": [0, 3]}])
    assert found == [MassiveActivation(1, (9, 4), (0,)), MassiveActivation(2, (5,), (0, 3))]
    assert len(notes) == 1 and "no fixed position" in notes[0]
    per_policy = [{"first_layer": 3, "channels": [1], "tokens": ["first token"], "bos": "none"},
                  {"first_layer": 4, "channels": [2], "tokens": ["BOS"], "bos": "prepend"}]
    assert massive.parse(per_policy, bos="prepend")[0] == [MassiveActivation(4, (2,), (0,))]
    assert len(massive.parse(per_policy)[0]) == 2
    with pytest.raises(ValueError, match="channel 600 is outside"):
        massive.check_fits(found + [MassiveActivation(0, (600,), (0,))], 4, 576)


def _windows(loaded, text: str, count: int):
    protocol = compose_cfg(["model=tiny_llama", "+calibration=wikitext2_valid"]).calibration
    protocol.seqlen, protocol.windows = 16, count
    corpus = Corpus("test", "validation", [text], {"origin": "test"})
    return build_windows(protocol, corpus, loaded)


def test_means_are_right_cached_and_invalidated(tiny_llama, tmp_path):
    text = "Calibration text about massive activations and attention sinks. " * 8
    windows = _windows(tiny_llama, text, 3)
    first = calibrated_means(tiny_llama, [MA], windows, tmp_path)
    assert first["cache"]["hit"] is False and first["sequences"] == 3
    # the mean equals a direct computation over the same windows
    outputs = [block_outputs(tiny_llama, window[None])[0][2] for window in windows.ids]
    direct = torch.stack([h[0][[0, 2]][:, [3, 7]] for h in outputs]).double().mean(0)
    assert torch.allclose(torch.tensor(first["locations"][0]["mean"][2], dtype=torch.float64), direct, atol=1e-5)
    # nothing changed: read back from disk, same numbers
    second = calibrated_means(tiny_llama, [MA], windows, tmp_path)
    assert second["cache"]["hit"] is True and second["locations"] == first["locations"]
    # other data (one window more): recomputed
    assert calibrated_means(tiny_llama, [MA], _windows(tiny_llama, text, 4), tmp_path)["cache"]["hit"] is False
    # another batch size (sums in another order): recomputed, and equal to float rounding
    batched = calibrated_means(tiny_llama, [MA], windows, tmp_path, batch_size=2)
    assert batched["cache"]["hit"] is False
    assert torch.allclose(torch.tensor(batched["locations"][0]["mean"][2], dtype=torch.float64), direct, atol=1e-5)
    # other coordinates: recomputed
    other = MassiveActivation(1, (3,), (0,))
    assert calibrated_means(tiny_llama, [other], windows, tmp_path)["cache"]["hit"] is False
    # other model (one weight changed, then restored): recomputed, then the original entry is found again
    with EditSession(tiny_llama) as session:
        view = tiny_llama.sites.down_proj(0)
        session.set(view.param, (0, 0), 1.5)
        assert calibrated_means(tiny_llama, [MA], windows, tmp_path)["cache"]["hit"] is False
    assert calibrated_means(tiny_llama, [MA], windows, tmp_path)["cache"]["hit"] is True


EXPLICIT_MA = "exp.massive_activations=[{first_layer:1,channels:[5,9],positions:[0]}]"
SMALL_CALIBRATION = ["exp.calibration.seqlen=32", "exp.calibration.windows=2"]


@pytest.mark.parametrize("override,message", [
    ("exp.massive_activations=[{first_layer:9,channels:[5],positions:[0]}]", "first_layer 9 is outside"),
    ("exp.massive_activations=[{first_layer:1,channels:[64],positions:[0]}]", "channel 64 is outside"),
    ("exp.massive_activations=sometimes", "exp.massive_activations=sometimes"),
    ("exp.interventions.zero.layers=[1,7]", "exp.interventions.zero.layers: 7 is outside"),
    ("exp.calibration.windows=0", "exp.calibration.windows=0"),
    ("exp.interventions.zero.layers=sometimes", "exp.interventions.zero: layers='sometimes'"),
])
@pytest.mark.requires("data")
def test_bad_input_is_one_clear_error_before_loading(tmp_path, override, message):
    cfg = compose_cfg(["+exp=ma_intervene", "model=tiny_llama", EXPLICIT_MA, override,
                       f"paths.results_dir={tmp_path}", f"paths.data_dir={DATA_DIR}"])
    with pytest.raises(ConfigError, match=message):
        preflight(cfg)


@pytest.mark.requires("data")
def test_ma_intervene_end_to_end_on_a_tiny_model(tmp_path):
    cfg = compose_cfg(["+exp=ma_intervene", "model=tiny_llama", "logger=none", EXPLICIT_MA, *SMALL_EVAL,
                       *SMALL_CALIBRATION, f"paths.results_dir={tmp_path}/results", f"paths.cache_dir={tmp_path}/c",
                       f"paths.data_dir={DATA_DIR}"])
    record = execute(cfg)
    assert record["weights_restored"] is True
    rows = {row["variant"]: row for row in record["table"]["rows"]}
    assert set(rows) == set(cfg.exp.variants)
    assert all(rows[v]["wikitext2"] > 1 and rows[v]["c4"] > 1 for v in rows)
    assert record["ma_means"]["sequences"] == 2 and record["ma_means"]["cache"]["hit"] is False
    assert record["evaluations"]["exp.calibration"] == record["ma_means"]["calibration"]  # every window set recorded
    assert record["variants"]["set_to_mean_every_layer"]["edits"][0]["layers"] == [1, 2, 3]
    zeroed = record["variants"]["set_to_zero_every_layer"]["ma_trace"]["mean"][0]  # [layer][position][channel]
    assert all(v == 0.0 for layer in zeroed[1:] for row in layer for v in row) and zeroed[0][0][0] != 0.0
    assert rows["original"]["peak_abs_ma"] > 0
    figures = ma_intervention.build_figures(tmp_path / "results", tmp_path / "figures")
    assert [p.name for p in figures if p.suffix == ".png"] == ["ma_intervene_trace_tiny_llama_quick.png"]
    written = ma_intervention.build_tables(tmp_path / "results", tmp_path / "tables")
    table = (tmp_path / "tables" / "ma_table3_tiny_llama_quick.md").read_text()
    assert "set_to_mean" in table and "paper llama2_7b wikitext2" in table and len(written) == 2


@pytest.mark.requires("data")
def test_model_without_massive_activations_skips_the_variants(tmp_path):
    cfg = compose_cfg(["+exp=ma_intervene", "model=tiny_llama", "logger=none", *SMALL_EVAL, *SMALL_CALIBRATION,
                       "exp.variants={original:[],set_to_zero:[zero]}", f"paths.results_dir={tmp_path}",
                       f"paths.data_dir={DATA_DIR}"])
    rows = {row["variant"]: row for row in execute(cfg)["table"]["rows"]}
    assert rows["set_to_zero"]["note"] == "skipped: no massive activation" and rows["original"]["wikitext2"] > 1
