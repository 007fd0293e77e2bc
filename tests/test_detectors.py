"""probes/detectors.py, the one definition of each outlier criterion: every rule on planted outliers (found when
planted, nothing when not, the boundaries where the papers put them), and the three studies (atlas, paper RO,
fine-tuning) finding the same planted outliers through it in every tiny family."""
import pytest
import torch
from conftest import TINY_MODELS, compose_cfg

from outlierlab.finetune import atlas as finetune_atlas
from outlierlab.models.load import load_model
from outlierlab.probes import channel_outliers as ro
from outlierlab.probes import detectors
from outlierlab.probes import outliers as atlas


def jitter(size: int, seed: int = 0, scale: float = 0.01) -> torch.Tensor:
    """Uniform noise: never beyond 1.8 sigma, so never a 3-sigma outlier."""
    return 1 + scale * (2 * torch.rand(size, generator=torch.Generator().manual_seed(seed)) - 1)


# ------------------------------------------------------------------------------------------------- BERT Busters
@pytest.mark.parametrize("ddof", [0, 1])
def test_sigma_outliers_planted_high_and_low_and_none(ddof):
    gain = jitter(256)
    assert detectors.sigma_outliers(gain, ddof=ddof) == []
    gain[7], gain[100] = 5.0, -3.0
    assert detectors.sigma_outliers(gain, ddof=ddof) == [7, 100]
    assert detectors.sigma_outliers(gain, tail="high", ddof=ddof) == [7]
    assert detectors.sigma_outliers(torch.ones(64), ddof=ddof) == []  # constant: no std, no outlier
    with pytest.raises(ValueError, match="tail"):
        detectors.sigma_outliers(gain, tail="low")


def test_sigma_outliers_is_strict_and_invariant_to_the_gain_parametrisation():
    alternating = torch.tensor([-1.0, 1.0] * 8)  # mean 0, population std 1: every |deviation| is exactly 1 sigma
    assert detectors.sigma_outliers(alternating, sigma=1.0, ddof=0) == []  # "more than", not "at least"
    assert detectors.sigma_outliers(alternating, sigma=0.999, ddof=0) == list(range(16))
    gain = jitter(128, seed=3)
    gain[9] = 4.0
    found = detectors.sigma_outliers(gain)
    assert found == [9]
    for a, b in ((-1.0, 1.0), (0.0, 0.999995), (10.0, 3.0)):  # 1 + w (Gemma), w / sqrt(1 + eps), any affine gain
        assert detectors.sigma_outliers(a + b * gain) == found


def test_sample_and_population_std_differ_only_near_the_threshold():
    values = torch.zeros(11)
    values[0] = 1.0  # one spike among n = 11: z = sqrt(n - 1) = 3.16 (population), (n - 1) / sqrt(n) = 3.02 (sample)
    assert detectors.sigma_outliers(values, ddof=0) == detectors.sigma_outliers(values, ddof=1) == [0]
    assert detectors.sigma_outliers(values, sigma=3.1, ddof=0) == [0]
    assert detectors.sigma_outliers(values, sigma=3.1, ddof=1) == []


# ----------------------------------------------------------------------------------------------------- LLM.int8
def test_int8_counts_at_the_threshold_and_shares():
    x = torch.zeros(2, 50, 8)  # 100 positions, 8 channels
    x[..., 3] = 6.0          # exactly 6: counted (>= 6)
    x[..., 4] = -7.0         # the magnitude counts
    x[:, :3, 5] = 9.0        # 6 of 100 positions: exactly 6%, wide
    x[:, :2, 6] = 9.0        # 4 of 100: not wide
    x[..., 7] = 5.999
    counts = detectors.count_exceeding(x)
    assert counts.tolist() == [0, 0, 0, 100, 100, 6, 4, 0]
    assert detectors.wide(counts, 100).nonzero().flatten().tolist() == [3, 4, 5]
    assert not detectors.wide(torch.zeros(8, dtype=torch.long), 100).any()


def test_int8_features_need_a_quarter_of_the_layers():
    per_layer = {0: [1, 2], 1: [2], 2: [], 3: [3], 4: [], 5: [], 6: [], 7: []}  # 8 layers: need >= 2
    assert detectors.int8_features(per_layer, 8) == {2: 2}
    assert detectors.int8_features({layer: [] for layer in range(8)}, 8) == {}
    assert detectors.int8_features(per_layer, 8, min_layer_share=0.125) == {1: 1, 2: 2, 3: 1}


def test_relative_criterion_is_scale_free():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).abs().clamp(max=2) + 0.5
    assert detectors.count_relative(x, 9.0).sum() == 0
    x[:, 5] = 100.0
    for scale in (1e-3, 1.0, 1e3):
        counts = detectors.count_relative(scale * x, 9.0)
        assert counts.nonzero().flatten().tolist() == [5] and int(counts[5]) == 64


# ---------------------------------------------------------------------------------------------------------- OWL
def test_owl_outlier_ratio_on_a_planted_weight_and_input_channel():
    weight = torch.ones(4, 8)
    sum_sq = torch.ones(8)
    assert detectors.owl_outlier_ratio(detectors.owl_scores(weight, sum_sq), 5.0) == 0.0
    weight[2, 3] = 100.0  # one weight of 32: its score is 100, the mean ~4.1
    assert detectors.owl_outlier_ratio(detectors.owl_scores(weight, sum_sq), 5.0) == 1 / 32
    weight[2, 3] = 1.0
    sum_sq[6] = 10_000.0  # one input channel 100x the others: its whole column
    assert detectors.owl_outlier_ratio(detectors.owl_scores(weight, sum_sq), 5.0) == 4 / 32


# ------------------------------------------------------------------------------- the three studies agree
@pytest.fixture(params=TINY_MODELS)
def tiny(request, tmp_path):
    return load_model(compose_cfg([f"model={request.param}"]).model, tmp_path)


def _set_norm_gains(loaded, planted: dict[int, float]):
    """Every per-block norm over the hidden size: jittered gain ~1 (family convention), `planted` channel -> gain."""
    sites = loaded.sites
    for index, (name, layer, module) in enumerate(atlas.norm_modules(loaded)):
        gain = jitter(module.weight.numel(), seed=index)
        for channel, value in planted.items():
            if layer is not None:
                gain[channel] = value
        with torch.no_grad():
            module.weight.copy_(gain - sites.family.norm_gain_offset)


@pytest.mark.parametrize("planted", [True, False])
def test_the_three_studies_find_the_same_planted_gain_outliers(tiny, planted):
    _set_norm_gains(tiny, {11: 40.0} if planted else {})
    by_atlas = {row["name"]: row["outlier_channels"] for row in atlas.norm_gains(tiny)}
    by_finetune = finetune_atlas.gamma_outliers(tiny.sites)
    expected = [11] if planted else []
    block_norms = [name for name, layer, _m in atlas.norm_modules(tiny) if layer is not None]
    assert block_norms and all(by_atlas[name] == expected for name in block_norms)
    assert all(by_finetune.get(name, []) == expected for name in block_norms)
    for role, found in ro.gamma_outliers(tiny.sites).items():
        assert found["consistent"] == expected, role
        assert all(entry["gain"] == expected for entry in found["per_layer"].values())


@pytest.mark.parametrize("planted", [True, False])
def test_the_three_studies_find_the_same_planted_int8_channel(tiny, planted):
    """A gain of 12 at channel 11 of every block norm makes |x| > 6 there at most tokens; gains ~1 make none. (Not
    much larger: with Gemma-2's sandwich norms a gain of 40 makes channel 11 dominate the residual, its pre-norm
    output reaches ~300, and attention spreads that to |x| > 6 in many channels of its output, a real secondary
    outlier, not the planted one.)"""
    _set_norm_gains(tiny, {11: 12.0} if planted else {})
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = [11] if planted else []
    with atlas.ChannelOutliers(tiny.sites) as probe, torch.no_grad():
        tiny.model(ids)
    assert probe.summary()["features"] == expected
    with ro.ChannelStats(tiny.sites, ro.channel_points(tiny.sites)) as stats:
        ro.forward_windows(tiny, ids)
    features = ro.channel_outliers(stats.summary())
    assert features["hidden"]["features"] == expected
    stats = finetune_atlas.linear_input_stats(tiny, ids, 6.0)
    assert finetune_atlas.channel_outliers(stats, tiny.model.config.hidden_size, 0.06, 0.25) == expected
