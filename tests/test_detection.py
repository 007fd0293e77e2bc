"""Data-free super-weight detection finds a planted super weight and reports none in a plain random model."""
from conftest import compose_cfg, plant_super_weight, weights_hash
from outlierlab.models.load import load_model
from outlierlab.probes.super_weight import detect_super_weights


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
