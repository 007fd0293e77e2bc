"""Data-free super-weight detection finds planted super weights (one, several in different layers), stops when none
is left, and reports none in a plain random model; the facts reported per candidate are the planted ones."""
from conftest import compose_cfg, plant_super_weight, weights_hash

from outlierlab.models.coords import SuperWeight
from outlierlab.models.load import load_model
from outlierlab.probes.super_weight import (
    describe_weights,
    detect_super_weights,
    massive_activation,
)


def test_finds_a_planted_super_weight(tiny_llama):
    plant_super_weight(tiny_llama, layer=2, row=7, col=33)
    before = weights_hash(tiny_llama.model)
    result = detect_super_weights(tiny_llama)
    assert [tuple(f["coord"]) for f in result["super_weights"]] == [(2, 7, 33)]
    assert result["super_weights"][0]["contribution_share"] > 0.9
    assert weights_hash(tiny_llama.model) == before  # detection zeroes weights only temporarily


def test_finds_planted_super_weights_in_two_layers(tmp_path):
    # Spikes are judged against the median over layers, so give the model enough layers for a median.
    loaded = load_model(compose_cfg(["model=tiny_llama", "model.tiny.num_hidden_layers=8"]).model, tmp_path)
    plant_super_weight(loaded, layer=1, row=7, col=33)
    plant_super_weight(loaded, layer=5, row=20, col=90, weight=-80.0)
    result = detect_super_weights(loaded)
    assert {tuple(f["coord"]) for f in result["super_weights"]} == {(1, 7, 33), (5, 20, 90)}
    assert "ordinary weight" in result["stop_reason"] or result["stop_reason"] == "no layer spikes"


def test_reports_nothing_in_a_model_without_one(tiny_llama):
    result = detect_super_weights(tiny_llama)
    assert result["super_weights"] == []
    assert result["stop_reason"] == "no layer spikes"


def test_finds_three_planted_super_weights_then_stops(tmp_path):
    loaded = load_model(compose_cfg(["model=tiny_llama", "model.tiny.num_hidden_layers=8"]).model, tmp_path)
    planted = {(1, 7, 33), (3, 20, 90), (6, 41, 5)}
    for layer, row, col in planted:
        plant_super_weight(loaded, layer=layer, row=row, col=col)
    result = detect_super_weights(loaded)
    assert {tuple(f["coord"]) for f in result["super_weights"]} == planted
    assert len(result["iterations"]) == 4  # three detections, then one pass that finds nothing left to take
    assert all(f["magnitude_rank"] == 1 for f in result["super_weights"])  # each is the largest |w| of its matrix


def test_describe_weights_reports_the_planted_spike(tiny_llama):
    plant_super_weight(tiny_llama, layer=2, row=7, col=33, weight=50.0)
    [fact] = describe_weights(tiny_llama, [SuperWeight(2, 7, 33)])
    assert fact["value"] == 50.0 and fact["magnitude_rank"] == 1 and fact["weight_zscore"] > 10
    # The output spike is mostly this weight times its input spike.
    assert abs(fact["output_spike"]) > 0.5 * abs(50.0 * fact["input_spike"]) > 0


def test_massive_activation_channel_is_the_super_weight_row(tiny_llama):
    assert not massive_activation(tiny_llama)["massive"]  # a random model has none
    plant_super_weight(tiny_llama, layer=1, row=7, col=33)
    activation = massive_activation(tiny_llama)
    assert activation["massive"] and activation["channel"] == 7 and activation["layer"] >= 1
