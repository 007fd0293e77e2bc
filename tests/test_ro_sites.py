"""Paper RO's sites inside a block: every point resolves and hooks on each tiny family, and holds the tensor it names
(recomputed from its neighbours with the block's own modules)."""
import pytest
import torch
from conftest import TINY_MODELS, compose_cfg
from transformers.activations import ACT2FN

from outlierlab.models.load import load_model
from outlierlab.models.sites import BLOCK_POINTS

# The five tiny families of conf/model/, plus Gemma-2/3's sandwich norms (tiny_gemma with another model_type).
CASES = [[f"model={name}"] for name in TINY_MODELS] + [
    ["model=tiny_gemma", f"model.tiny.model_type={model_type}"] for model_type in ("gemma2", "gemma3_text")]


def _act(config):
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) \
        or config.activation_function
    return ACT2FN[name]


def _capture(loaded, layer: int):
    sites = loaded.sites
    seen = {}
    points = sites.block_points(layer)
    handles = [sites.register(point, lambda t, p=point: seen.__setitem__(p.split(".", 2)[2], t.detach().clone()))
               for point in points]
    handles.append(sites.register(f"layers.{layer - 1}.out", lambda t: seen.__setitem__("block_in", t.clone())))
    try:
        with torch.no_grad():
            loaded.model(torch.tensor([loaded.encode("The quick brown fox, again.")]))
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: o[-1].split("=")[-1])
def test_block_points_resolve_hook_and_hold_their_tensors(overrides, tmp_path):
    loaded = load_model(compose_cfg(overrides).model, tmp_path)
    sites, config = loaded.sites, loaded.model.config
    points = [p.split(".", 2)[2] for p in sites.block_points(1)]
    # every point a pre-norm family has, in forward order; the gate only where the MLP is gated
    gated = sites.family.gate_proj is not None
    expected = [p for p in BLOCK_POINTS if (gated or p != "mlp.gate_proj.out")
                and (sites.family.norm_attn_out is not None or p != "norm_attn_out.out")
                and (sites.family.norm_mlp_out is not None or p != "norm_mlp_out.out")
                and p not in ("norm_after_attn.out", "norm_after_mlp.out")  # post-LN (bert): test_ro_encoder.py
                and not (sites.family.parallel_blocks and p == "mid")]  # GPT-NeoX: no residual after attention
    assert points == expected
    seen = _capture(loaded, 1)
    assert set(seen) == {*points, "block_in"}
    close = dict(rtol=1e-5, atol=1e-5)
    module = sites.module
    with torch.no_grad():
        assert torch.allclose(seen["attn.in"], module("layers.1.norm1")(seen["block_in"]), **close)
        attn_branch = seen["attn.out"]
        if "norm_attn_out.out" in seen:
            assert torch.allclose(seen["norm_attn_out.out"], module("layers.1.norm_attn_out")(attn_branch), **close)
            attn_branch = seen["norm_attn_out.out"]
        # parallel blocks (GPT-NeoX): both sublayers read the block input, out = in + attn + mlp
        mid = seen["block_in"] + attn_branch
        if "mid" in seen:
            assert torch.allclose(seen["mid"], mid, **close)
        norm2_input = seen["block_in"] if sites.family.parallel_blocks else mid
        assert torch.allclose(seen["mlp.in"], module("layers.1.norm2")(norm2_input), **close)
        assert torch.allclose(seen["mlp.up_proj.out"], module("layers.1.mlp.up_proj")(seen["mlp.in"]), **close)
        act = _act(config)
        if gated:
            assert torch.allclose(seen["mlp.gate_proj.out"], module("layers.1.mlp.gate_proj")(seen["mlp.in"]), **close)
            expected_act = act(seen["mlp.gate_proj.out"]) * seen["mlp.up_proj.out"]
        else:
            expected_act = act(seen["mlp.up_proj.out"])
        assert torch.allclose(seen["mlp.act.out"], expected_act, **close)  # y6 (y4 ungated) = down_proj's input
        assert seen["mlp.act.out"].shape[-1] == sites.down_proj(1).shape[1]
        assert torch.allclose(seen["mlp.out"], module("layers.1.mlp.down_proj")(seen["mlp.act.out"]), **close)
        mlp_branch = seen["mlp.out"]
        if "norm_mlp_out.out" in seen:
            mlp_branch = seen["norm_mlp_out.out"]
        assert torch.allclose(seen["out"], mid + mlp_branch, **close)
    # paper RO's anchors (our reading): y6 is the down_proj input of gated blocks, y4 that of GPT-style blocks
    assert sites.paper_label("mlp.act.out") == ("y6" if gated else "y4")
    assert sites.paper_label("mlp.out") is None


def test_a_replacing_hook_at_a_block_point_changes_the_output(tiny_llama):
    ids = torch.tensor([tiny_llama.encode("hello world")])
    with torch.no_grad():
        before = tiny_llama.model(ids).logits
        with tiny_llama.sites.hook("layers.1.mlp.act.out", lambda t: t * 0):
            zeroed = tiny_llama.model(ids).logits
        after = tiny_llama.model(ids).logits
    assert not torch.allclose(before, zeroed) and torch.equal(before, after)


def test_norm_sites_and_their_gain_convention(tmp_path):
    llama = load_model(compose_cfg(["model=tiny_llama"]).model, tmp_path / "l")
    gemma3 = load_model(compose_cfg(["model=tiny_gemma", "model.tiny.model_type=gemma3_text"]).model, tmp_path / "g")
    assert llama.sites.norms(0) == ["layers.0.norm1", "layers.0.norm2"]
    assert gemma3.sites.norms(0) == ["layers.0.norm1", "layers.0.norm_attn_out", "layers.0.norm2",
                                     "layers.0.norm_mlp_out"]
    # Gemma stores w and multiplies by 1 + w (a fresh model has w = 0: gain 1); Llama stores the gain itself
    assert torch.equal(gemma3.sites.norm_gain("layers.0.norm2"), 1 + gemma3.sites.module("layers.0.norm2").weight)
    assert torch.equal(llama.sites.norm_gain("layers.0.norm2"), llama.sites.module("layers.0.norm2").weight)
    with pytest.raises(KeyError, match="llama-like models have no norm_mlp_out"):
        llama.sites.module("layers.0.norm_mlp_out")
