"""Weight edits are undone bit-exactly (checked by hashing every weight), and each edit does what it says."""
import functools

import hydra
import pytest
import torch
from conftest import CONF, DATA_DIR, TINY_MODELS, compose_cfg, weights_hash
from omegaconf import open_dict

from outlierlab.errors import ConfigError
from outlierlab.evals.ppl import Windows
from outlierlab.interventions.base import EditSession
from outlierlab.interventions.super_weight import (
    NoSuperWeights,
    PruneLargestWeights,
    RestoreSuperActivation,
    ScaleSuperWeights,
)
from outlierlab.models.load import load_model
from outlierlab.models.massive import MassiveActivation
from outlierlab.probes.activation_means import measure_means
from outlierlab.runner import preflight

SW = (1, 5, 17)
MA = MassiveActivation(first_layer=1, channels=(3, 7), positions=(0, 2))
# Every intervention YAML: a new one is covered by the tests below without touching them.
INTERVENTIONS = sorted(p.stem for p in (CONF / "intervention").glob("*.yaml"))


@functools.cache
def intervention_cfg(name: str):
    return compose_cfg([f"+intervention@edit={name}"]).edit


# Pruning experts needs a mixture of experts: tests/test_moe.py runs every intervention YAML on one.
DENSE_INTERVENTIONS = [name for name in INTERVENTIONS if not intervention_cfg(name)._target_.endswith("PruneExperts")]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# Interventions that by themselves have nothing to do: what makes them act in the test below.
PRECEDED_BY = {"restore_sa": "zero_sw"}  # puts back the super activation that zeroing the super weight removed
ARGUMENTS = {"scale_sw": {"scale": 2.0}}  # the YAML's scale 1 is the identity (a sweep sets the scale)


def plant_gain_outliers(loaded, channel: int = 11, gain: float = 8.0):
    """Every norm's gain ~1 (jittered, so it has a spread) with one > 3 sigma channel: reset_norm_gamma acts."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for site in loaded.sites.all_norms():
            weight = loaded.sites.module(site).weight
            jitter = 1.0 + 0.02 * torch.rand(weight.shape, generator=generator) - 0.01
            jitter[channel] = gain
            weight.copy_(jitter - loaded.sites.family.norm_gain_offset)


@pytest.mark.parametrize("name", DENSE_INTERVENTIONS)
def test_every_intervention_yaml_acts_and_is_undone_bit_exactly(name, tiny_llama):
    """While the session is on, the edit acted (logits or weights changed against the model before it); once the
    session ends, weights (hash of every tensor), hooks and logits are as before."""
    plant_gain_outliers(tiny_llama)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    context = {"super_weights": [SW], "massive_activations": [MA], "calibration_ids": ids,
               "ma_means": measure_means(tiny_llama, [MA], Windows(ids=ids, meta={}), batch_size=2)}
    before, logits_before = weights_hash(tiny_llama.model), tiny_llama.model(ids).logits
    with EditSession(tiny_llama, context) as session:
        if name in PRECEDED_BY:
            session.apply([hydra.utils.instantiate(intervention_cfg(PRECEDED_BY[name]))])
        reference, reference_hash = tiny_llama.model(ids).logits, weights_hash(tiny_llama.model)
        session.apply([hydra.utils.instantiate(intervention_cfg(name), **ARGUMENTS.get(name, {}))])
        during, during_hash = tiny_llama.model(ids).logits, weights_hash(tiny_llama.model)
        assert during_hash != reference_hash or not torch.equal(during, reference), f"{name} changed nothing"
    assert weights_hash(tiny_llama.model) == before
    assert hook_count(tiny_llama.model) == 0
    assert torch.equal(tiny_llama.model(ids).logits, logits_before)


@pytest.fixture(scope="module")
def prune_sw_cfg(tmp_path_factory):
    return compose_cfg(["+exp=prune_sw", "model=tiny_llama", "logger=none", f"paths.data_dir={DATA_DIR}",
                        f"paths.results_dir={tmp_path_factory.mktemp('results')}"])


@pytest.mark.requires("data")
@pytest.mark.parametrize("name,key", [(name, key) for name in INTERVENTIONS
                                      for key in [*intervention_cfg(name), "no_such_argument"] if key != "_target_"])
def test_every_bad_intervention_argument_fails_before_load(name, key, prune_sw_cfg):
    """A wrong value for any argument of any intervention YAML (or a misspelled argument) is a config error at
    preflight, which loads no weights."""
    cfg, intervention = prune_sw_cfg.copy(), intervention_cfg(name).copy()
    with open_dict(cfg), open_dict(intervention):
        intervention[key] = "(("
        cfg.exp.interventions.probe = intervention
    with pytest.raises(ConfigError, match=r"^exp\.interventions\.probe: "):
        preflight(cfg)


def down_proj_value(loaded, layer, row, col):
    view = loaded.sites.down_proj(layer)
    return float(view.param.data[view.index(row, col)])


@pytest.mark.parametrize("name", TINY_MODELS)
def test_every_edit_is_undone_bit_exactly(name, tmp_path):
    loaded = load_model(compose_cfg([f"model={name}"]).model, tmp_path)
    before = weights_hash(loaded.model)
    ids = torch.tensor([loaded.encode("The quick brown fox jumps over the lazy dog.")])
    logits_before = loaded.model(ids).logits
    with EditSession(loaded, {"super_weights": [SW]}) as session:
        session.apply([ScaleSuperWeights(0.0), PruneLargestWeights(k=500), ScaleSuperWeights(3.0),
                       RestoreSuperActivation()])
        assert weights_hash(loaded.model) != before
        loaded.model(ids)
    assert weights_hash(loaded.model) == before
    assert torch.equal(loaded.model(ids).logits, logits_before)  # hooks are gone too


def test_the_study_context_is_typed(tiny_llama):
    with pytest.raises(TypeError, match="super_weight"):  # a misspelled field is an error, not an empty context
        EditSession(tiny_llama, {"super_weight": [SW]})
    assert EditSession(tiny_llama, {"super_weights": [SW]}).context.super_weights == [SW]


def test_undo_happens_on_error(tiny_llama):
    before = weights_hash(tiny_llama.model)
    with pytest.raises(RuntimeError):
        with EditSession(tiny_llama, {"super_weights": [SW]}) as session:
            session.apply([ScaleSuperWeights(0.0)])
            raise RuntimeError("evaluation crashed")
    assert weights_hash(tiny_llama.model) == before


def test_scale_and_zero_super_weight(tiny_llama):
    original = down_proj_value(tiny_llama, *SW)
    with EditSession(tiny_llama, {"super_weights": [SW]}) as session:
        session.apply([ScaleSuperWeights(2.5)])
        assert down_proj_value(tiny_llama, *SW) == pytest.approx(2.5 * original)
        assert session.original(tiny_llama.sites.down_proj(1).param, (5, 17)) == original
    with EditSession(tiny_llama, {"super_weights": [SW]}) as session:
        session.apply([ScaleSuperWeights(0.0)])
        assert down_proj_value(tiny_llama, *SW) == 0.0
    with pytest.raises(NoSuperWeights):
        EditSession(tiny_llama, {}).apply([ScaleSuperWeights(0.0)])


def test_prune_largest_spares_super_weights_and_takes_the_largest(tiny_llama):
    view = tiny_llama.sites.down_proj(1)
    with torch.no_grad():
        view.param.data[view.index(5, 17)] = 100.0  # the largest weight of the model, but a super weight
    matrices = [p for p in tiny_llama.model.model.layers.parameters() if p.dim() == 2]
    magnitudes = torch.cat([p.detach().abs().reshape(-1) for p in matrices])
    threshold = magnitudes.sort(descending=True).values[1 + 300 - 1]  # 300 largest after the super weight
    with EditSession(tiny_llama, {"super_weights": [SW]}) as session:
        session.apply([PruneLargestWeights(k=300)])
        assert down_proj_value(tiny_llama, *SW) == 100.0
        zeroed = sum(int((p.detach() == 0).sum()) for p in matrices)
        assert zeroed == 300
        remaining = torch.cat([p.detach().abs().reshape(-1) for p in matrices])
        assert (remaining[remaining != 100.0] < threshold + 1e-12).all()
        assert session.log[-1]["k"] == 300


def test_prune_by_fraction_counts_weights_in_scope(tiny_llama):
    in_scope = sum(tiny_llama.sites.down_proj(i).param.numel() for i in range(tiny_llama.sites.num_layers))
    with EditSession(tiny_llama, {"super_weights": []}) as session:
        session.apply([PruneLargestWeights(k=None, fraction=0.01, scope="down_proj")])
        assert session.log[-1]["k"] == round(0.01 * in_scope)


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"k": None, "fraction": 2.0}, {"k": 5, "fraction": 0.1},
                                    {"scope": "everything"}])
def test_prune_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        PruneLargestWeights(**kwargs)


def test_restore_super_activation_puts_back_only_the_peak(tiny_llama):
    layer, row, col = SW
    captured = {}

    def capture(name):
        def observe(y):
            captured[name] = y.clone()  # returns None: observe only
        return observe
    ids = torch.tensor([tiny_llama.encode("Apple Inc. is a worldwide tech company.")])
    with tiny_llama.sites.hook(f"layers.{layer}.mlp.down_proj.out", capture("orig")):
        tiny_llama.model(ids)
    with EditSession(tiny_llama, {"super_weights": [SW]}) as session:
        session.apply([ScaleSuperWeights(0.0)])
        with tiny_llama.sites.hook(f"layers.{layer}.mlp.down_proj.out",capture("pruned")):
            tiny_llama.model(ids)
        session.apply([RestoreSuperActivation()])
        with tiny_llama.sites.hook(f"layers.{layer}.mlp.down_proj.out",capture("restored")):
            tiny_llama.model(ids)
    orig, pruned, restored = captured["orig"][0], captured["pruned"][0], captured["restored"][0]
    peak = int(orig[:, row].abs().argmax())
    assert restored[peak, row] == pytest.approx(float(orig[peak, row]), rel=1e-5)
    others = [p for p in range(orig.shape[0]) if p != peak]
    assert torch.equal(restored[others][:, row], pruned[others][:, row])
    assert torch.equal(torch.cat([restored[:, :row], restored[:, row + 1:]], 1),
                       torch.cat([pruned[:, :row], pruned[:, row + 1:]], 1))
