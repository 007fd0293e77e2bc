"""Mixtures of experts (every MoE family, tiny random models): the observable experts forward equals transformers',
expert and router sites, super experts and super weights inside experts found when planted and nothing when not,
pruning by router mask and every edit of the fused parameters undone bit-exactly; bad input in one line."""
import hydra
import pytest
import torch
from conftest import ROOT, TINY_MOE, compose_cfg, weights_hash

from outlierlab.errors import UnsupportedArchitecture
from outlierlab.evals.ppl import Windows
from outlierlab.interventions.base import EditSession
from outlierlab.interventions.experts import NoSuperExperts, PruneExperts
from outlierlab.interventions.quant import SmoothQuant
from outlierlab.interventions.super_weight import ScaleSuperWeights
from outlierlab.models.coords import SuperWeight, check_in_shape
from outlierlab.models.experts import OBSERVABLE
from outlierlab.models.load import load_model
from outlierlab.models.massive import MassiveActivation
from outlierlab.probes.activation_means import measure_means
from outlierlab.probes.expert_super_weights import detect_expert_super_weights
from outlierlab.probes.super_experts import SuperExpertCriterion, find_super_experts, profile_experts
from scripts.tiny_checkpoints import plant_super_expert

IDS = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
CRITERION = SuperExpertCriterion(**{k: v for k, v in compose_cfg(["+exp=super_experts", "model=tiny_mixtral"])
                                    .exp.detection.items() if k != "provenance"})


@pytest.fixture(params=TINY_MOE)
def moe(request, tmp_path):
    return load_model(compose_cfg([f"model={request.param}"]).model, tmp_path)


def _logits(loaded):
    with torch.no_grad():
        return loaded.model(IDS).logits


def test_every_moe_family_has_moe_layers_and_the_observable_forward_equals_transformers(moe):
    sites = moe.sites
    assert sites.moe_layers and sites.family.moe
    layer = sites.moe_layers[0]
    plain = _logits(moe)
    moe.model.set_experts_implementation("eager")
    eager = _logits(moe)
    moe.model.set_experts_implementation("grouped_mm")
    seen = []
    with sites.hooks({f"layers.{layer}.mlp.experts.1.down_proj.out": lambda out: seen.append(out.shape),
                      f"layers.{layer}.mlp.router.weights": lambda weights: seen.append(weights.shape)}):
        observed = _logits(moe)
    assert moe.model.config._experts_implementation == OBSERVABLE
    assert torch.allclose(observed, plain, atol=1e-5) and torch.allclose(observed, eager, atol=1e-4)
    # the router's top-k weights of every token, then expert 1's output rows (its routed tokens x hidden)
    assert seen[0] == (IDS.numel(), moe.model.config.num_experts_per_tok)
    assert seen[1][-1] == moe.model.config.hidden_size


def test_an_expert_hook_replaces_that_experts_output(moe):
    sites, layer = moe.sites, moe.sites.moe_layers[0]
    plain = _logits(moe)
    with sites.hook(f"layers.{layer}.mlp.experts.2.down_proj.out", lambda out: out * 0):
        zeroed = _logits(moe)
    view = sites.weight(f"layers.{layer}.mlp.experts.2.down_proj.weight")
    with EditSession(moe) as session:
        session.set(view.param, view.whole, 0.0)
        if moe.model.config.model_type == "gpt_oss":  # its expert output has a bias too
            bias = moe.sites.module(f"layers.{layer}.mlp.experts").down_proj_bias
            session.set(bias, (2,), 0.0)
        by_weights = _logits(moe)
    assert not torch.allclose(zeroed, plain) and torch.allclose(zeroed, by_weights, atol=1e-5)


def test_bad_expert_sites_fail_in_one_line(moe):
    sites, layer = moe.sites, moe.sites.moe_layers[0]
    with pytest.raises(KeyError, match="expert 99 does not exist"):
        sites.weight(f"layers.{layer}.mlp.experts.99.down_proj.weight")
    with pytest.raises(KeyError, match="is a mixture of experts"):
        sites.hook(f"layers.{layer}.mlp.act.out", print).__enter__()
    dense = [i for i in range(sites.num_layers) if i not in sites.moe_layers]
    for i in dense:  # DeepSeek-V3's first layer, Qwen3-MoE's mlp_only_layers: dense sites, no experts
        assert sites.has(f"layers.{i}.mlp.act.out") and not sites.has(f"layers.{i}.mlp.router.weights")


def test_a_planted_super_expert_is_found_and_none_when_not_planted(moe):
    layer = moe.sites.moe_layers[0]
    assert find_super_experts(profile_experts(moe, IDS), moe.sites.num_layers, CRITERION)["super_experts"] == []
    plant_super_expert(moe, layer, expert=3)
    found = find_super_experts(profile_experts(moe, IDS), moe.sites.num_layers, CRITERION)["super_experts"]
    assert [(e["layer"], e["expert"], e["channel"]) for e in found] == [(layer, 3, 5)]


def test_pruning_experts_by_router_mask_is_undone_exactly(moe):
    layer = moe.sites.moe_layers[0]
    before, plain = weights_hash(moe.model), _logits(moe)
    context = {"super_experts": [(layer, 3)]}
    for rule in ("super", "random", [[layer, 3], [layer, 4]]):
        with EditSession(moe, context) as session:
            PruneExperts(rule, seed=1).apply(session)
            pruned = _logits(moe)
        assert not torch.allclose(pruned, plain) and weights_hash(moe.model) == before
        assert torch.equal(_logits(moe), plain)
    with pytest.raises(NoSuperExperts), EditSession(moe) as session:
        PruneExperts("super").apply(session)
    with pytest.raises(ValueError, match="layer, expert"):
        PruneExperts([[1]])


def _plant_expert_super_weight(loaded, layer: int, expert: int, row: int, col: int, gain: float, weight: float):
    """Make expert `expert`'s activation channel `col` spike (its gate and up rows x gain, wherever the fused layout
    keeps them) and plant a large weight at (row, col) of its down_proj."""
    experts = loaded.sites.module(f"layers.{layer}.mlp.experts")
    size = experts.down_proj.shape[-1 if not experts.is_transposed else -2]
    rows = [2 * col, 2 * col + 1] if not experts.is_concatenated else [col, size + col]
    with torch.no_grad():
        fused = experts.gate_up_proj[expert]
        for out in rows:
            (fused[:, out] if experts.is_transposed else fused[out]).mul_(gain)
        view = loaded.sites.weight(f"layers.{layer}.mlp.experts.{expert}.down_proj.weight")
        view.param.data[view.index(row, col)] = weight


def test_a_super_weight_inside_an_expert_is_found_zeroed_and_restored(moe):
    layer = moe.sites.moe_layers[-1]
    detection = compose_cfg(["+exp=sw_index", "model=tiny_llama"]).exp.detection
    rule = dict(spike_layer_ratio=detection.spike_layer_ratio, min_share=detection.min_share,
                min_weight_zscore=detection.min_weight_zscore)
    assert detect_expert_super_weights(moe, IDS, **rule)["super_weights"] == []
    _plant_expert_super_weight(moe, layer, expert=4, row=7, col=11, gain=300.0, weight=8.0)
    found = detect_expert_super_weights(moe, IDS, **rule)["super_weights"]
    assert [f["coord"] for f in found] == [[layer, 4, 7, 11]]
    before, plain = weights_hash(moe.model), _logits(moe)
    with EditSession(moe, {"super_weights": [SuperWeight.parse(found[0]["coord"])]}) as session:
        ScaleSuperWeights(0.0).apply(session)
        assert session.log[0]["original"] == 8.0 and not torch.allclose(_logits(moe), plain)
    assert weights_hash(moe.model) == before


def test_super_weight_coordinates_inside_experts():
    weight = SuperWeight.parse("(1, 3, 7, 11)")
    assert (weight.layer, weight.expert, weight.row, weight.col) == (1, 3, 7, 11) and str(weight) == "(1, 3, 7, 11)"
    assert SuperWeight.parse([2, 5, 6]).expert is None and SuperWeight.parse([2, 5, 6]).coord == [2, 5, 6]
    experts = {1: (8, 64, 32)}
    with pytest.raises(ValueError, match="layers.1 is a mixture of experts; write \\(layer, expert, row, col\\)"):
        check_in_shape(SuperWeight(1, 7, 11), 4, 64, 128, experts)
    with pytest.raises(ValueError, match="expert 9 is outside layers.1's 8 experts"):
        check_in_shape(SuperWeight(1, 7, 11, 9), 4, 64, 128, experts)
    with pytest.raises(ValueError, match="layers.0 is not a mixture of experts"):
        check_in_shape(SuperWeight(0, 7, 11, 1), 4, 64, 128, {})
    check_in_shape(SuperWeight(1, 7, 31, 7), 4, 64, 128, experts)
    check_in_shape(SuperWeight(1, 7, 11, 9), 4, 64, 128, None)  # layout unknown before loading (GGUF): layer only


def test_all_experts_point_holds_every_experts_rows_in_expert_order(moe):
    sites, layer = moe.sites, moe.sites.moe_layers[0]
    seen = {}
    hooks = {f"layers.{layer}.mlp.router.experts": lambda ids: seen.__setitem__("ids", ids.clone()),
             f"layers.{layer}.mlp.experts.down_proj.out": lambda rows: seen.__setitem__("all", rows.clone()),
             **{f"layers.{layer}.mlp.experts.{e}.down_proj.out": (lambda rows, e=e: seen.__setitem__(e, rows.clone()))
                for e in range(sites.num_experts(layer))}}
    with sites.hooks(hooks), torch.no_grad():
        moe.model(IDS)
    order = torch.sort(seen["ids"].flatten()).values
    for expert in range(sites.num_experts(layer)):
        assert torch.equal(seen["all"][order == expert], seen[expert])


INTERVENTIONS = sorted(p.stem for p in (ROOT / "conf" / "intervention").glob("*.yaml"))
# Edits that refuse a mixture of experts in one line (what they would need is not built): tested below.
REFUSE_MOE = {"rotate": "is a mixture of experts"}


@pytest.mark.parametrize("name", sorted(REFUSE_MOE))
def test_an_edit_that_cannot_act_on_experts_refuses_in_one_line_and_leaves_the_model(name, tmp_path):
    loaded = load_model(compose_cfg(["model=tiny_qwen3_moe"]).model, tmp_path)
    before = weights_hash(loaded.model)
    intervention = hydra.utils.instantiate(compose_cfg([f"+intervention@edit={name}"]).edit)
    with pytest.raises(UnsupportedArchitecture, match=REFUSE_MOE[name]) as refused:
        with EditSession(loaded, {}) as session:
            session.apply([intervention])
    assert "\n" not in str(refused.value) and weights_hash(loaded.model) == before


@pytest.mark.parametrize("name", [name for name in INTERVENTIONS if name not in REFUSE_MOE])
def test_every_intervention_yaml_on_an_moe_model_is_undone_bit_exactly(name, tmp_path):
    """On a mixture of experts (a dense first layer, then fused experts), with a super weight inside an expert and a
    super expert: weights, hooks and logits are as before once the session ends; RTN and the SW edits reach the fused
    parameters."""
    loaded = load_model(compose_cfg(["model=tiny_qwen3_moe"]).model, tmp_path)
    ids = IDS[:2, :16]
    massive = MassiveActivation(first_layer=1, channels=(5,), positions=(0,))
    context = {"super_weights": [SuperWeight(2, 7, 11, expert=4)], "super_experts": [(1, 3)],
               "massive_activations": [massive], "calibration_ids": ids,
               "ma_means": measure_means(loaded, [massive], Windows(ids=ids, meta={}), batch_size=2)}
    before, logits_before = weights_hash(loaded.model), _logits(loaded)
    intervention = hydra.utils.instantiate(compose_cfg([f"+intervention@edit={name}"]).edit)
    with EditSession(loaded, context) as session:
        session.apply([intervention])
        edited = _logits(loaded)
    assert weights_hash(loaded.model) == before and torch.equal(_logits(loaded), logits_before)
    assert hook_count(loaded.model) == 0
    if name in CHANGE_THIS_MODEL:
        assert not torch.equal(edited, logits_before)


def test_smoothquant_on_every_moe_family_keeps_the_model(moe):
    """SmoothQuant scales the router, every expert's gate_up_proj and the shared expert with the MLP norm's output:
    in float the model computes the same (routing unchanged), and undo is bit-exact."""
    before, logits = weights_hash(moe.model), _logits(moe)
    with EditSession(moe, {"calibration_ids": IDS[:2, :16]}) as session:
        session.apply([SmoothQuant(alpha=0.5)])
        scaled = [norm for norm in session.log[0]["norms"] if norm.endswith("norm2")]
        assert torch.allclose(_logits(moe), logits, rtol=1e-4, atol=1e-4)
        assert any(f"layers.{moe.sites.moe_layers[0]}.mlp.experts.0" in name
                   for name in session.log[0]["norms"][f"layers.{moe.sites.moe_layers[0]}.norm2"]["linears"])
    assert scaled and weights_hash(moe.model) == before


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# The edits that must change a random MoE's logits (scale_sw's default scale is 1; a random model has no norm-gain
# outliers to reset; the MA edits act on a planted-free MA position and may be no-ops).
CHANGE_THIS_MODEL = {"zero_sw", "quantize_weights", "sw_aware_quantize_weights", "prune_non_sw", "prune_non_sw_scaled",
                     "prune_super_experts", "prune_random_experts", "quantize_activations"}
