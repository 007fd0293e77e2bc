"""Paper RO's interventions: the gamma reset (to 1 / to the others' mean, hand-computed, Gemma's 1 + w included;
random control; exact undo) and MA smoothing at birth vs on the skip path (mean / clip)."""
import hydra
import pytest
import torch
from conftest import compose_cfg, weights_hash
from test_ro_probes import TEXT, plant_gain, plant_mlp

from outlierlab.interventions.base import EditSession
from outlierlab.interventions.norm_gamma import ResetNormGamma
from outlierlab.interventions.smooth_ma import SmoothMassiveActivation
from outlierlab.models.load import load_model
from outlierlab.models.massive import MassiveActivation


def _intervention(name: str, **overrides):
    cfg = compose_cfg([f"+intervention={name}", *(f"intervention.{k}={v}" for k, v in overrides.items())])
    return hydra.utils.instantiate(cfg.intervention)


@pytest.mark.parametrize("name,stored_one", [("tiny_llama", 1.0), ("tiny_gemma", 0.0)])
def test_reset_to_one_and_to_mean_hand_computed_and_undone(name, stored_one, tmp_path):
    loaded = load_model(compose_cfg([f"model={name}"]).model, tmp_path)
    plant_gain(loaded, "norm2", 7, 60.0)
    weight = loaded.sites.module("layers.1.norm2").weight
    before, stored = weights_hash(loaded.model), weight.detach().clone()
    offset = 1.0 if name == "tiny_gemma" else 0.0
    others = torch.cat([stored[:7], stored[8:]]) + offset  # the other channels' gains
    for config, expected in (("reset_norm_gamma", stored_one),
                             ("reset_norm_gamma_mean", float(others.mean()) - offset)):
        with EditSession(loaded) as session:
            session.apply([_intervention(config, norms="[norm2]")])
            assert weight[7].item() == pytest.approx(expected, abs=1e-6)
            assert torch.equal(torch.cat([weight[:7], weight[8:]]), torch.cat([stored[:7], stored[8:]]))
            assert loaded.sites.module("layers.1.norm1").weight.equal(loaded.sites.module("layers.0.norm1").weight)
            (log,) = session.log
            assert log["norms_edited"] == loaded.sites.num_layers
            assert log["norms"]["layers.1.norm2"]["gain_before"] == [pytest.approx(60.0)]
        assert weights_hash(loaded.model) == before  # undone bit-exactly


def test_reset_changes_the_output_and_the_random_control_picks_other_channels(tmp_path):
    loaded = load_model(compose_cfg(["model=tiny_llama"]).model, tmp_path)
    plant_gain(loaded, "norm2", 7, 60.0)
    ids = torch.tensor([loaded.encode(TEXT)])
    with torch.no_grad():
        original = loaded.model(ids).logits
    with EditSession(loaded) as session:
        session.apply([_intervention("reset_norm_gamma_random", norms="[norm2]", seed=3)])
        chosen = [entry["channels"] for entry in session.log[0]["norms"].values()]
        assert all(len(c) == 1 and c != [7] for c in chosen)
        assert loaded.sites.module("layers.0.norm2").weight[7] == 60.0
    with EditSession(loaded) as session:
        session.apply([_intervention("reset_norm_gamma", channels="[7,9]")])  # explicit: every norm, both channels
        assert session.log[0]["channels_reset"] == 2 * len(loaded.sites.norms(0)) * loaded.sites.num_layers + 2
        with torch.no_grad():
            assert not torch.allclose(loaded.model(ids).logits, original)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original)


def test_reset_resets_layernorm_beta_when_asked(tmp_path):
    loaded = load_model(compose_cfg(["model=tiny_gpt2"]).model, tmp_path)
    plant_gain(loaded, "norm1", 5, 40.0)
    bias = loaded.sites.module("layers.0.norm1").bias
    with torch.no_grad():
        bias[5] = 3.0
    before = weights_hash(loaded.model)
    with EditSession(loaded) as session:
        session.apply([ResetNormGamma(norms=["norm1"], bias=True)])
        assert bias[5] == 0.0 and loaded.sites.module("layers.0.norm1").weight[5] == 1.0
    assert weights_hash(loaded.model) == before and bias[5] == 3.0


@pytest.mark.parametrize("kwargs,message", [
    ({"channels": "largest"}, "channels='largest'"), ({"value": "two"}, "value='two'"),
    ({"norms": ["norm9"]}, "norms="), ({"control": "shuffle"}, "control='shuffle'"), ({"sigma": 0}, "sigma=0")])
def test_reset_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResetNormGamma(**kwargs)


def _smoothing_case(tmp_path):
    loaded = load_model(compose_cfg(["model=tiny_llama"]).model, tmp_path)
    plant_mlp(loaded, layer=1, row=11, col=40)
    ids = torch.tensor([loaded.encode(TEXT)])
    seen, _ = _seen(loaded, ids, ["layers.1.mlp.out"])
    positions = tuple(sorted(seen["layers.1.mlp.out"][0, :, 11].abs().topk(2).indices.tolist()))  # the largest two
    context = {"massive_activations": [MassiveActivation(1, (11,), positions)], "calibration_ids": ids.repeat(2, 1)}
    return loaded, ids, context


def _seen(loaded, ids, points):
    seen = {}
    handles = [loaded.sites.register(p, lambda t, p=p: seen.__setitem__(p, t.detach().clone())) for p in points]
    with torch.no_grad():
        logits = loaded.model(ids).logits
    for handle in handles:
        handle.remove()
    return seen, logits


def test_smoothing_at_birth_and_on_the_skip_path(tmp_path):
    loaded, ids, context = _smoothing_case(tmp_path)
    points = ["layers.1.mlp.out", "layers.1.out", "layers.2.out", "layers.3.out"]
    original, logits = _seen(loaded, ids, points)
    # at birth, to the mean: the MLP output at the MA coordinates becomes its calibration mean (= its value here)
    with EditSession(loaded, context) as session:
        session.apply([_intervention("smooth_ma_birth")])
        assert session.log[0]["sites"] == ["layers.1.mlp.out"]
        seen, _ = _seen(loaded, ids, points)
        assert torch.allclose(seen["layers.1.mlp.out"], original["layers.1.mlp.out"], atol=1e-3)
    # at birth, clipped: |x| <= 10 x the token's median |x| at the MA coordinates, everything else untouched
    with EditSession(loaded, context) as session:
        session.apply([_intervention("smooth_ma_birth", value="clip")])
        seen, _ = _seen(loaded, ids, points)
        x, ref = seen["layers.1.mlp.out"][0], original["layers.1.mlp.out"][0]
        positions = list(context["massive_activations"][0].positions)
        for position in positions:
            limit = 10 * ref[position].abs().median()
            assert float(limit) < abs(float(ref[position, 11]))
            assert float(x[position, 11].abs()) == pytest.approx(float(limit), rel=1e-5)
        untouched = torch.ones_like(x, dtype=torch.bool)
        untouched[positions, 11] = False
        assert torch.equal(x[untouched], ref[untouched])
    # on the skip path: the later block outputs are edited, the birth layer is not
    with EditSession(loaded, context) as session:
        session.apply([_intervention("smooth_ma_skip", value="clip")])
        assert session.log[0]["sites"] == ["layers.2.out", "layers.3.out"]
        seen, _ = _seen(loaded, ids, points)
        assert torch.equal(seen["layers.1.out"], original["layers.1.out"])
        p = positions[0]
        assert seen["layers.2.out"][0, p, 11].abs() < original["layers.2.out"][0, p, 11].abs() / 5
    _, after = _seen(loaded, ids, points)
    assert torch.equal(after, logits)  # hooks removed


def test_smoothing_at_birth_edits_the_mlp_output_norm_in_sandwich_families(tmp_path):
    """Gemma-2/3 add post_feedforward_layernorm(mlp(x)) to the residual: birth = that norm's output (where
    +exp=ro_locate finds Gemma-3's MAs born); Llama-like blocks keep the down_proj output; `site` still wins."""
    gemma3 = load_model(compose_cfg(["model=tiny_gemma", "model.tiny.model_type=gemma3_text"]).model, tmp_path / "g")
    ids = torch.tensor([gemma3.encode(TEXT)])
    context = {"massive_activations": [MassiveActivation(1, (5,), (0, 2))], "calibration_ids": ids.repeat(2, 1)}
    point = "layers.1.norm_mlp_out.out"
    original, logits = _seen(gemma3, ids, [point])
    with EditSession(gemma3, context) as session:
        session.apply([_intervention("smooth_ma_birth", value="clip", clip_ratio=0.01)])
        assert session.log[0]["sites"] == [point]
        seen, _ = _seen(gemma3, ids, [point])
        x, ref = seen[point][0], original[point][0]
        for position in (0, 2):
            limit = 0.01 * ref[position].abs().median()
            assert float(x[position, 5].abs()) <= float(limit) * (1 + 1e-5)
        untouched = torch.ones_like(x, dtype=torch.bool)
        untouched[[0, 2], 5] = False
        assert torch.equal(x[untouched], ref[untouched])
    _, after = _seen(gemma3, ids, [point])
    assert torch.equal(after, logits)
    llama = load_model(compose_cfg(["model=tiny_llama"]).model, tmp_path / "l")
    assert SmoothMassiveActivation(where="birth").site_for(llama.sites) == "layers.{layer}.mlp.out"
    assert SmoothMassiveActivation(where="skip").site_for(gemma3.sites) == "layers.{layer}.out"
    given = SmoothMassiveActivation(where="birth", site="layers.{layer}.mlp.out")
    assert given.site_for(gemma3.sites) == "layers.{layer}.mlp.out"


def test_smoothing_needs_calibration_for_means_and_checks_its_arguments(tmp_path):
    loaded, _, context = _smoothing_case(tmp_path)
    del context["calibration_ids"]
    with pytest.raises(ValueError, match="calibration_ids"):
        EditSession(loaded, context).apply([SmoothMassiveActivation(where="birth", value="mean")])
    with pytest.raises(ValueError, match="where='middle'"):
        SmoothMassiveActivation(where="middle")
    with pytest.raises(ValueError, match="must contain"):
        SmoothMassiveActivation(site="layers.3.out")
