"""Weight edits are undone bit-exactly (checked by hashing every weight), and each edit does what it says."""
import pytest
import torch
from conftest import TINY_MODELS, compose_cfg, weights_hash

from outlierlab.interventions.base import EditSession
from outlierlab.interventions.super_weight import (
    NoSuperWeights,
    PruneLargestWeights,
    RestoreSuperActivation,
    ScaleSuperWeights,
)
from outlierlab.models.load import load_model

SW = (1, 5, 17)


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
