"""Detectors that generalise: outliers PLANTED at several magnitudes in a random model of every family (every
conf/model/tiny_*.yaml decoder: tiny_llama, tiny_qwen2, tiny_gemma, tiny_gemma2, tiny_gpt2, tiny_opt) are found, and
nothing is found where nothing was planted. The smallest planted spike is hundreds of times smaller than SmolLM2's
24,000: a criterion tuned to one model's scale fails here."""
import pytest
from conftest import CONF, TINY_MODELS, compose_cfg, plant_super_weight, weights_hash

from outlierlab.models.load import load_model
from outlierlab.probes.super_weight import detect_super_weights, massive_activation

# (up_proj gain, planted weight): output spikes of roughly 5-70, 25-370 and 1,300-19,000 across the families.
MAGNITUDES = [(60.0, 3.0), (100.0, 10.0), (1000.0, 50.0)]
SMOLLM2_SPIKE = 24022.0
# Every super-weight detection preset (conf/probe/sw_*.yaml): a new one is tested positive and negative here.
SW_PRESETS = sorted(p.stem for p in (CONF / "probe").glob("sw_*.yaml"))


def detection(preset):
    return compose_cfg(["+exp=sw_index", "model=tiny_llama", f"probe@exp.detection={preset}"]).exp.detection


@pytest.fixture(params=TINY_MODELS)
def family(request, tmp_path):
    cfg = compose_cfg([f"model={request.param}"])
    return lambda: load_model(cfg.model, tmp_path)


@pytest.mark.parametrize("gain, weight", MAGNITUDES)
def test_default_detector_finds_a_planted_super_weight_of_any_magnitude(family, gain, weight):
    loaded = family()
    plant_super_weight(loaded, layer=1, row=7, col=33, input_gain=gain, weight=weight)
    before = weights_hash(loaded.model)
    result = detect_super_weights(loaded, **detection("sw_detection"))
    assert [tuple(f["coord"]) for f in result["super_weights"]] == [(1, 7, 33)]
    found = result["super_weights"][0]
    assert found["value"] == weight and found["magnitude_rank"] == 1 and found["contribution_share"] > 0.5
    if (gain, weight) == MAGNITUDES[0]:
        assert abs(found["output_spike"]) < SMOLLM2_SPIKE / 300  # 300x smaller than SmolLM2's, still found
    assert weights_hash(loaded.model) == before


def test_nothing_is_found_where_nothing_was_planted(family):
    loaded = family()
    for preset in SW_PRESETS:
        result = detect_super_weights(loaded, **detection(preset))
        assert result["super_weights"] == [], preset
    assert not massive_activation(loaded)["massive"]


def test_every_preset_finds_a_large_planted_super_weight(family):
    loaded = family()
    plant_super_weight(loaded, layer=1, row=7, col=33, input_gain=5000.0, weight=200.0)  # input and output > 50
    for preset in SW_PRESETS:
        found = detect_super_weights(loaded, **detection(preset))["super_weights"]
        assert [tuple(f["coord"]) for f in found] == [(1, 7, 33)], preset


def test_the_papers_absolute_threshold_misses_small_spikes_the_default_finds(family):
    small, large = family(), family()
    plant_super_weight(small, layer=1, row=7, col=33, input_gain=MAGNITUDES[0][0], weight=MAGNITUDES[0][1])
    plant_super_weight(large, layer=1, row=7, col=33, input_gain=5000.0, weight=200.0)  # input and output > 50
    assert detect_super_weights(small, **detection("sw_paper"))["super_weights"] == []  # |x| > 50 not reached
    assert [tuple(f["coord"]) for f in detect_super_weights(large, **detection("sw_paper"))["super_weights"]] \
        == [(1, 7, 33)]


@pytest.mark.parametrize("gain, weight", MAGNITUDES[1:])
def test_the_planted_super_weight_makes_a_massive_activation_in_its_row(family, gain, weight):
    loaded = family()
    plant_super_weight(loaded, layer=1, row=7, col=33, input_gain=gain, weight=weight)
    activation = massive_activation(loaded)
    # Paper MA: > 100 and > 1000x median, in the SW's row, from its layer; the largest plant is massive in every
    # family whose MLP output reaches the residual as it is (a sandwich norm on the MLP output, Gemma-2/3's
    # post_feedforward_layernorm, renormalises the spike: there an MA needs a norm gain, see test_gemma3), and the
    # same family unplanted (the negative control) has none.
    assert activation["channel"] == 7 and activation["layer"] >= 1
    assert activation["massive"] == (activation["abs"] >= 100 and activation["ratio_to_median"] >= 1000)
    if (gain, weight) == MAGNITUDES[-1] and not loaded.sites.has("layers.1.norm_mlp_out"):
        assert activation["massive"]
    assert not massive_activation(family())["massive"]
