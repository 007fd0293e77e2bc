"""Block layouts the site table tells apart from the config (never the model name), and layouts it refuses in one
line when the model loads: Falcon's three blocks, OPT's pre-/post-LN and flattened MLP, an unsupported mixture of experts."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_cfg, weights_hash

from outlierlab.interventions.base import EditSession
from outlierlab.models.load import auto_class, byte_tokenizer, load_model
from outlierlab.models.sites import Sites, UnsupportedArchitecture, supported_model_types
from outlierlab.probes.stats import DownProjStats
from outlierlab.interventions.quant import SmoothQuant
from outlierlab.quant.smoothing import smoothing_groups

FALCON = ["model=tiny_llama", "model.tiny.model_type=falcon", "+model.tiny.alibi=false", "+model.tiny.bias=true",
          "+model.tiny.ffn_hidden_size=128"]
# (overrides, family, norms of block 0, whether the block has a residual after attention)
LAYOUTS = {
    "falcon-rw": (FALCON + ["+model.tiny.parallel_attn=false", "+model.tiny.new_decoder_architecture=false"],
                  "falcon", ["input_layernorm", "post_attention_layernorm"], True),
    "falcon-7b": (FALCON + ["+model.tiny.parallel_attn=true", "+model.tiny.new_decoder_architecture=false"],
                  "falcon-parallel", ["input_layernorm"], False),
    "falcon-40b": (FALCON + ["+model.tiny.parallel_attn=true", "+model.tiny.new_decoder_architecture=true"],
                   "falcon-parallel-2ln", ["ln_attn", "ln_mlp"], False),
    "opt-125m": (["model=tiny_opt"], "opt", ["self_attn_layer_norm", "final_layer_norm"], True),
    "opt-350m": (["model=tiny_opt", "+model.tiny.do_layer_norm_before=false"], "opt-post-ln", [], False),
}


def _load(overrides, tmp_path):
    return load_model(compose_cfg(overrides).model, tmp_path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_is_read_from_the_config(layout, tmp_path):
    overrides, family, norms, has_mid = LAYOUTS[layout]
    loaded = _load(overrides, tmp_path)
    sites = loaded.sites
    assert sites.family.name == family
    block = sites.module("layers.0")
    assert [sites.module(site) for site in sites.norms(0)] == [getattr(block, name) for name in norms]
    assert sites.has("layers.0.mid") is has_mid
    # Every block point the model has hooks and sees [batch, positions, channels] of this forward.
    ids = torch.tensor([loaded.encode("one two"), loaded.encode("three f")])
    seen = {}
    points = sites.block_points(0)
    with sites.hooks({point: (lambda p: lambda x: seen.__setitem__(p, tuple(x.shape)))(point) for point in points}):
        loaded.model(ids)
    assert set(seen) == set(points) and all(shape[:2] == tuple(ids.shape) for shape in seen.values())


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if LAYOUTS[name][2]])
def test_smoothquant_groups_come_from_the_family_and_keep_the_model(layout, tmp_path):
    loaded = _load(LAYOUTS[layout][0], tmp_path)
    groups = smoothing_groups(loaded.sites)
    assert {norm.split(".", 2)[2] for _, norm, _ in groups} == {"norm1", "norm2"} & {
        role for role in ("norm1", "norm2") if loaded.sites.has(f"layers.0.{role}")}
    ids = torch.tensor([loaded.encode("SmoothQuant on every block layout.")])
    with torch.no_grad():
        logits = loaded.model(ids).logits
    before = weights_hash(loaded.model)
    with EditSession(loaded, {"calibration_ids": torch.randint(0, 256, (2, 16))}) as session:
        session.apply([SmoothQuant(alpha=0.5)])
        with torch.no_grad():
            assert torch.allclose(loaded.model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert weights_hash(loaded.model) == before


def test_opt_flattened_mlp_is_seen_per_sequence_and_edits_land_where_they_should(tmp_path):
    loaded = _load(["model=tiny_opt"], tmp_path)
    sites = loaded.sites
    ids = torch.stack([torch.tensor(loaded.encode("abcdef")), torch.tensor(loaded.encode("uvwxyz"))])
    flat = {}
    fc2 = sites.module("layers.1.mlp.down_proj")
    handle = fc2.register_forward_pre_hook(lambda _m, args: flat.__setitem__("in", args[0].clone()))
    with sites.hook("layers.1.mlp.down_proj.in", lambda x: flat.__setitem__("hooked", x.clone())):
        logits = loaded.model(ids).logits
    handle.remove()
    assert flat["in"].dim() == 2 and flat["hooked"].shape == (*ids.shape, flat["in"].shape[-1])
    assert torch.equal(flat["hooked"].reshape(flat["in"].shape), flat["in"])
    # A replacement at (sequence 1, position 2) changes sequence 1 from position 2 on and nothing of sequence 0.
    def bump(x):
        x = x.clone()
        x[1, 2] += 10.0
        return x
    with sites.hook("layers.1.mlp.out", bump):
        bumped = loaded.model(ids).logits
    assert torch.equal(bumped[0], logits[0]) and torch.equal(bumped[1, :2], logits[1, :2])
    assert not torch.allclose(bumped[1, 2], logits[1, 2])
    # The probe that read OPT's 2-D input wrongly now gets positions per sequence.
    with DownProjStats(sites) as stats:
        loaded.model(ids)
    peak = stats.summary()[1]["output_max"]
    assert 0 <= peak["position"] < ids.shape[1] and peak["sequence"] in (0, 1)


def test_post_ln_opt_has_no_input_or_final_norm_to_address(tmp_path):
    sites = _load(LAYOUTS["opt-350m"][0], tmp_path).sites
    for site, says in (("layers.0.norm1", "no norm1"), ("final_norm", "no norm before the LM head")):
        assert not sites.has(site)
        with pytest.raises(KeyError, match=says):
            sites.module(site)


def _tiny_llama_model():
    cfg = compose_cfg(["model=tiny_llama"]).model
    return load_model(cfg, "/nonexistent").model


def test_a_block_without_a_module_the_table_names_fails_in_one_line():
    model = _tiny_llama_model()
    del model.model.layers[2].post_attention_layernorm
    with pytest.raises(UnsupportedArchitecture, match=r"layers\.2 has no post_attention_layernorm \(the llama-like"):
        Sites(model)


def test_an_mlp_without_a_linear_down_proj_fails_in_one_line():
    model = _tiny_llama_model()
    model.model.layers[1].mlp.down_proj = torch.nn.Identity()
    with pytest.raises(UnsupportedArchitecture, match=r"layers\.1\.mlp\.down_proj is a Identity, not a linear"):
        Sites(model)


def test_an_unsupported_mixture_of_experts_model_stops_before_any_weights_load(tmp_path):
    """A local directory of an MoE type the table does not have (GraniteMoE) holding only its config: preflight
    stops with one line (exit 2); no weights file exists, so nothing could have loaded. (The MoE families the table
    has: tests/test_moe.py.)"""
    from transformers import AutoConfig
    config = AutoConfig.for_model("granitemoe", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, vocab_size=300)
    config.save_pretrained(tmp_path / "granitemoe")
    byte_tokenizer().save_pretrained(tmp_path / "granitemoe")
    done = _run("model=path", f"model.source={tmp_path / 'granitemoe'}", tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert "architecture 'granitemoe' has no site table" in lines[-1]
    assert not (tmp_path / "results").exists()


def test_attention_observability_is_recorded_at_load(tmp_path):
    """Llama's attention goes through transformers' AttentionInterface; Falcon's modeling file has no eager function
    to dispatch to, so observing it stops in one line instead of observing nothing."""
    from outlierlab.models.attention import AttentionNotObservable
    assert _load(["model=tiny_llama"], tmp_path).info["attention_observable"] is True
    falcon = _load(LAYOUTS["falcon-7b"][0], tmp_path)
    assert falcon.info["attention_observable"] is False
    with pytest.raises(AttentionNotObservable, match="cannot be observed"), falcon.sites.hook(
            "layers.0.attn.probs", lambda probs: None):
        pass


def _run(*overrides, tmp_path):
    return subprocess.run([sys.executable, "run.py", "+exp=prune_sw", "logger=none",
                           f"paths.results_dir={tmp_path / 'results'}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("overrides", "says"), [
    # Falcon's new block with one sequential pair of norms is no layout the table has: no ln_attn in its blocks.
    ((*FALCON, "+model.tiny.new_decoder_architecture=true", "+model.tiny.parallel_attn=false"),
     "layers.0 has no ln_attn (the falcon-parallel-2ln table's norm1)"),
    # A protocol key becomes a table column key: a label-like key is refused before anything runs.
    (("model=tiny_llama", "+eval/ppl@eval.ppl.WT2=wikitext2"), "eval.ppl.WT2: 'WT2'"),
], ids=["layout", "table-key"])
def test_preflight_stops_in_one_line_before_weights_load(overrides, says, tmp_path):
    done = _run(*overrides, tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert says in lines[-1] and len([line for line in lines if "Traceback" in line]) == 0, done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("model_type", [t for t in supported_model_types() if t != "outlierlab_llama"])
def test_every_supported_model_type_validates_on_its_default_config(model_type):
    """transformers' default config of each type, built on the meta device (no memory): the table's entry names
    modules that exist in every block."""
    from transformers import AutoConfig
    config = AutoConfig.for_model(model_type, num_hidden_layers=2)
    with torch.device("meta"):  # the class the loader uses (AutoModel for an encoder family)
        sites = Sites(auto_class(config).from_config(config))
    assert sites.num_layers == 2
    if 1 in sites.moe_layers:  # fused experts: per-expert and router sites instead of one down_proj
        assert sites.has("layers.1.mlp.experts.0.down_proj.out") and sites.has("layers.1.mlp.router.weights")
        assert sites.has("layers.1.mlp.out") and not sites.has("layers.1.mlp.down_proj")
    else:
        assert sites.has("layers.1.mlp.down_proj") and sites.has("layers.1.mlp.act.out")


@pytest.mark.parametrize("model", ["tiny_opt", "tiny_llama"])
def test_hook_interventions_treat_each_sequence_of_a_batch_on_its_own(model, tmp_path):
    """Activation quantization (one range per sequence) and restore-SA (the peak of each sequence) give a batch of
    two sequences exactly what each gives alone, on OPT's flattened MLP as on every other family."""
    from outlierlab.interventions.quant import QuantizeActivations
    from outlierlab.interventions.super_weight import RestoreSuperActivation, ScaleSuperWeights
    from outlierlab.models.coords import SuperWeight
    loaded = _load([f"model={model}"], tmp_path)
    ids = torch.stack([torch.tensor(loaded.encode("abcdefgh")), torch.tensor(loaded.encode("zyxwvuts"))])
    edits = {"quantize": ([QuantizeActivations(bits=4, holdout=1)], {}),
             "restore_sa": ([ScaleSuperWeights(0.0), RestoreSuperActivation()],
                            {"super_weights": [SuperWeight(1, 3, 5)]})}
    for name, (interventions, context) in edits.items():
        with EditSession(loaded, context) as session, torch.no_grad():
            session.apply(interventions)
            batched = loaded.model(ids).logits
            alone = torch.cat([loaded.model(ids[i:i + 1]).logits for i in range(2)])
        with torch.no_grad():
            plain = loaded.model(ids).logits
        assert torch.allclose(batched, alone, atol=1e-5), name
        assert not torch.allclose(batched, plain, atol=1e-4), f"{name} changed nothing"
