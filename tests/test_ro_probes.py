"""Paper RO's detectors on planted outliers: a planted gain outlier makes a channel-wise outlier (found by LLM.int8's
rule and the relative one; nothing when not planted), BERT Busters' gain outliers (Gemma's 1 + w included), and the
first appearance of a massive activation made by a planted MLP."""
import pytest
import torch
from conftest import compose_cfg

from outlierlab.models.load import load_model
from outlierlab.probes.channel_outliers import (
    ChannelStats,
    channel_outliers,
    channel_points,
    coincidence,
    gamma_outliers,
)
from outlierlab.probes.ma_birth import SiteExtremes, first_appearance

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in "
        "Paris. Its base is square, measuring 125 metres on each side.")


def _load(tmp_path, name):
    return load_model(compose_cfg([f"model={name}"]).model, tmp_path)


def _forward(loaded, texts=(TEXT,)):
    with torch.no_grad():
        for text in texts:
            loaded.model(torch.tensor([loaded.encode(text)]))


def plant_gain(loaded, role: str, channel: int, gain: float):
    """Give `channel` of every `role` norm the gain `gain` (in the family's convention), the others ~1."""
    sites = loaded.sites
    generator = torch.Generator().manual_seed(0)
    for layer in range(sites.num_layers):
        weight = sites.module(f"layers.{layer}.{role}").weight
        with torch.no_grad():
            gains = 1 + 0.05 * torch.randn(weight.shape, generator=generator)
            gains[channel] = gain
            weight.copy_(gains - sites.family.norm_gain_offset)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma", "tiny_gpt2"])
@pytest.mark.parametrize("planted", [True, False])
def test_a_planted_gain_outlier_makes_a_channel_outlier(name, planted, tmp_path):
    loaded = _load(tmp_path, name)
    if planted:
        plant_gain(loaded, "norm2", 7, 60.0)
    else:
        plant_gain(loaded, "norm2", 7, 1.0)
    points = channel_points(loaded.sites)
    assert f"layers.0.norm2.out" in points and "layers.0.mlp.down_proj.in" in points
    with ChannelStats(loaded.sites, points) as stats:
        _forward(loaded)
    summary = stats.summary()
    for which in ("absolute", "relative"):
        found = channel_outliers(summary, which=which)
        assert found["norm2.out"]["features"] == ([7] if planted else []), which
        assert found["norm1.out"]["features"] == []  # the gain of norm1 is plain
    gammas = gamma_outliers(loaded.sites)
    assert gammas["norm2"]["consistent"] == ([7] if planted else [])
    assert gammas["norm1"]["consistent"] == []
    overlap = coincidence(gammas, summary)["norm2"]
    if planted:  # the gain outlier is the activation outlier in every layer
        assert overlap["gain_outliers"] == overlap["also_activation_outliers"] == loaded.sites.num_layers
    else:  # a 3-sigma gain by chance (per layer) is no activation outlier
        assert overlap["also_activation_outliers"] == 0 and overlap["activation_outliers"] == 0


def test_layernorm_bias_outliers_are_reported(tmp_path):
    loaded = _load(tmp_path, "tiny_gpt2")
    plant_gain(loaded, "norm1", 5, 40.0)
    for layer in range(loaded.sites.num_layers):
        with torch.no_grad():
            loaded.sites.module(f"layers.{layer}.norm1").bias[5] = 30.0
    found = gamma_outliers(loaded.sites)["norm1"]
    assert found["consistent"] == [5] and found["gain_and_bias"] == [5]
    assert found["per_layer"][0]["bias"] == [5]


def plant_mlp(loaded, layer: int, row: int, col: int, gain: float = 100.0, weight: float = 1.0):
    """Make the MLP of `layer` write a massive activation: gate and up rows `col` scaled (neither alone is massive;
    act(gate) * up is), and down_proj's column `col` writing only to `row` (as a super weight does)."""
    mlp = loaded.sites.module(f"layers.{layer}").mlp
    with torch.no_grad():
        mlp.gate_proj.weight[col] *= gain
        mlp.up_proj.weight[col] *= gain
        view = loaded.sites.down_proj(layer)
        view.as_out_in()[:, col] = 0.0
        view.param.data[view.index(row, col)] = weight


@pytest.mark.parametrize("planted", [True, False])
def test_first_appearance_of_a_planted_mlp(planted, tmp_path):
    loaded = _load(tmp_path, "tiny_llama")
    if planted:
        plant_mlp(loaded, layer=2, row=11, col=40)
    with SiteExtremes(loaded.sites) as extremes:
        _forward(loaded, [TEXT, TEXT[:80]])
    rows = extremes.summary()
    assert [r["point"] for r in rows[:3]] == ["layers.0.attn.in", "layers.0.attn.out", "layers.0.mid"]
    born = first_appearance(rows)
    if not planted:
        assert born["first"] is None and born["channels"] == []
        return
    assert born["first"] == "layers.2.mlp.act.out" and born["first_label"] == "y6"
    (channel,) = born["channels"]
    assert channel["channel"] == 11 and channel["first_block_output"] == 2
    assert channel["born_at"] == "layers.2.mlp.act.out" and channel["born_channel"] == 40
    assert channel["residual_point"] == "layers.2.mlp.out"
    assert channel["before"] == "layers.2.mlp.up_proj.out"
    by_point = {r["point"]: r for r in rows}
    assert by_point["layers.2.mlp.up_proj.out"]["hit_share"] == 0  # neither factor alone is massive
    assert by_point["layers.3.out"]["hit_share"] == 1  # the skip connection carries it on


@pytest.mark.parametrize("channels", [[], [3], [0, 1, 2, 5, 7, 8], list(range(640))])
def test_channel_lists_are_stored_as_ranges(channels):
    from outlierlab.probes.channel_outliers import decode_channels, encode_channels
    assert decode_channels(encode_channels(channels)) == channels
    assert encode_channels([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_coincidence_counts_the_channels_of_the_rule_it_is_asked_for():
    """Gain outliers {3, 9} at layer 0's norm2; the absolute rule flags channel 3 there, the relative rule 3 and 9."""
    from outlierlab.probes.channel_outliers import coincidence, encode_channels
    gammas = {"norm2": {"per_layer": {0: {"gain": [3, 9]}}}}
    summary = {"layers.0.norm2.out": {"absolute": {"channels": encode_channels([3])},
                                      "relative": {"channels": encode_channels([3, 9, 20])}}}
    assert coincidence(gammas, summary)["norm2"] == {"gain_outliers": 2, "also_activation_outliers": 1,
                                                     "activation_outliers": 1, "with_outlier_gain": 1}
    assert coincidence(gammas, summary, "relative")["norm2"] == {"gain_outliers": 2, "also_activation_outliers": 2,
                                                                 "activation_outliers": 3, "with_outlier_gain": 2}
