"""Pretraining with attention variants: the SDPA attention equals transformers' reference attention, each variant
trains, keeps a KV cache and padding right, k'/v' and the gates reduce to vanilla at neutral parameters, clipped
softmax, softpick, sigmoid attention and SSNorm are their formulas, resuming continues the same loss curve, and a
trained checkpoint loads through `model.source` like any HF directory."""
import math

import pytest
import torch
from conftest import CONF, DATA_DIR, compose_cfg
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from outlierlab.interventions.base import EditSession
from outlierlab.interventions.fake_quant import W8A8, quantize_rtn
from outlierlab.models.load import byte_tokenizer, load_model
from outlierlab.probes.moments import SiteMoments
from outlierlab.runner import execute, preflight
from outlierlab.models.outlier_llama import VARIANT_FIELDS, SSNorm
from outlierlab.models.variant_attention import ATTENTION_VARIANTS, clipped_softmax, softpick
from outlierlab.train.data import TokenStreams
from outlierlab.train.loop import next_token_loss, train
from outlierlab.train.modeling import OutlierLlamaForCausalLM, build_model

VARIANTS = sorted(p.stem for p in (CONF / "train" / "variant").glob("*.yaml"))
ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": True}
SEQLEN = 32


def settings(steps: int, **extra):
    """The tiny preset as composed from conf/, shrunk for a unit test."""
    size = OmegaConf.to_container(compose_cfg(["+exp=pretrain"]).train.size)
    size.update({"steps": steps, "warmup_steps": 1, "seqlen": SEQLEN, "batch_size": 4, "eval_every": steps,
                 "checkpoint_every": 3, "eval_batch_size": 4, "lr": 1e-2, "seed": 0, "l1_gamma": 0.0, **extra})
    return OmegaConf.create(size)


@pytest.fixture(scope="module")
def streams():
    """A learnable synthetic stream: a fixed 'sentence' of byte tokens repeated, so loss falls within a few steps."""
    tokenizer = byte_tokenizer()
    pattern = torch.tensor(list(b"the cat sat on the mat and the dog ate the log. "), dtype=torch.long)
    stream = pattern.repeat(60)
    return TokenStreams(stream, stream[: 8 * SEQLEN].clone(), tokenizer, {})


def model_for(variant_cfg, tokenizer, arch=ARCH):
    return build_model(dict(arch), OmegaConf.to_container(variant_cfg.attention), tokenizer, seed=0)


def variant_cfg(name):
    return compose_cfg(["+exp=pretrain", f"train/variant={name}"]).train.variant


def transformers_llama(ours):
    """transformers' own Llama with our vanilla model's config (the variant keys dropped); weights not yet loaded."""
    return LlamaForCausalLM(ours.config.__class__.__base__(**{
        k: v for k, v in ours.config.to_dict().items()
        if k not in ("model_type", "architectures", "transformers_version", *VARIANT_FIELDS)}))


def test_sdpa_vanilla_attention_matches_transformers_eager_llama():
    tokenizer = byte_tokenizer()
    ours = model_for(variant_cfg("vanilla"), tokenizer).eval()
    reference = transformers_llama(ours)
    reference.config._attn_implementation = "eager"
    reference.load_state_dict(ours.state_dict())
    reference.eval()
    ids = torch.randint(0, 250, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, reference(ids).logits, atol=1e-5)
        # with padding (left-padded attention mask) and with a KV cache (the explicit mask's offset)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        assert torch.allclose(ours(ids, attention_mask=mask).logits[:, 5:], reference(ids, attention_mask=mask).logits[:, 5:],
                              atol=1e-5)
        past = ours(ids[:, :20], use_cache=True).past_key_values
        step = ours(ids[:, 20:], past_key_values=past).logits
        assert torch.allclose(step, reference(ids).logits[:, 20:], atol=1e-5)


def test_cached_generation_equals_uncached_and_transformers(tmp_path):
    """The KV cache reaches OutlierAttention under whatever name this transformers release passes it (`cache` from
    5.24, `past_key_values` before): greedy generation with the cache equals generation without it and
    transformers' own Llama, on the locked release and on the newest (scripts/check_latest.sh)."""
    tokenizer = byte_tokenizer()
    ours = model_for(variant_cfg("vanilla"), tokenizer).eval()
    reference = transformers_llama(ours)
    reference.load_state_dict(ours.state_dict())
    reference.eval()
    prompt = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(2))
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = ours.generate(prompt, use_cache=True, **greedy)
        uncached = ours.generate(prompt, use_cache=False, **greedy)
        expected = reference.generate(prompt, use_cache=True, **greedy)
        step_cached = ours(cached[:, :-1], use_cache=True)
    assert step_cached.past_key_values.get_seq_length() == cached.shape[1] - 1  # the cache was filled
    assert torch.equal(cached, uncached) and torch.equal(cached, expected)


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_trains_with_falling_loss(name, streams, tmp_path):
    variant = variant_cfg(name)
    model = model_for(variant, streams.tokenizer)
    prefix = streams.tokenizer.bos_token_id if variant.sink_token else None
    val = streams.val[: 4 * SEQLEN].view(4, SEQLEN)
    outcome = train(model, streams, streams.tokenizer, settings(8, l1_gamma=variant.l1_gamma), tmp_path,
                    {"variant": name}, val, prefix)
    losses = [entry["loss"] for entry in outcome["history"]]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    if variant.l1_gamma:
        assert "l1_gamma" in outcome["history"][0]
    assert (tmp_path / "config.json").is_file() and (tmp_path / "checkpoint" / "trainer_state.pt").is_file()


def _attention_pair(variant_name, tokenizer, **attention):
    vanilla = model_for(variant_cfg("vanilla"), tokenizer).model.layers[0].self_attn.eval()
    config = OmegaConf.create({"attention": {"attention_variant": variant_name, **attention}})
    other = model_for(config, tokenizer).model.layers[0].self_attn.eval()
    other.load_state_dict(vanilla.state_dict(), strict=False)
    return vanilla, other


def _inputs(model_config, length=12):
    hidden = torch.randn(2, length, model_config.hidden_size, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(length)[None]
    cos, sin = LlamaRotaryEmbedding(model_config)(hidden, positions)
    return hidden, (cos, sin)


def test_gated_attention_with_an_open_gate_is_vanilla():
    tokenizer = byte_tokenizer()
    vanilla, gated = _attention_pair("gated", tokenizer)
    with torch.no_grad():
        gated.gate_weight.zero_()
        gated.gate_bias.fill_(40.0)  # sigmoid(40) = 1 - 4e-18: the gate is fully open
        hidden, rope = _inputs(gated.config)
        assert torch.allclose(gated(hidden, rope)[0], vanilla(hidden, rope)[0], atol=1e-6)
        gated.gate_bias.fill_(0.0)  # half open: exactly half the vanilla output
        assert torch.allclose(gated(hidden, rope)[0], 0.5 * vanilla(hidden, rope)[0], atol=1e-6)


def test_kv_bias_with_zero_value_is_vanilla_scaled_by_the_mass_left_to_real_keys():
    """k'/v' has no exactly neutral point (k' always takes some probability); with v' = 0 the output must be the
    vanilla output times (1 - p'), p' = the probability on k'; and as k' 's logit goes to -inf it becomes vanilla."""
    tokenizer = byte_tokenizer()
    vanilla, biased = _attention_pair("kv_bias", tokenizer)
    config = biased.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    identity = torch.eye(config.hidden_size)
    with torch.no_grad():
        for module in (vanilla, biased):
            module.o_proj.weight.copy_(identity)  # keep heads apart so each can be scaled separately
        biased.v_bias.zero_()
        hidden, (cos, sin) = _inputs(config)
        batch, length, _ = hidden.shape
        query = vanilla.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
        key = vanilla.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key = key.repeat_interleave(heads // config.num_key_value_heads, dim=1)
        scale = head_dim ** -0.5
        scores = (query @ key.transpose(-1, -2) * scale).masked_fill(
            ~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
        extra = (query * biased.k_bias[None, :, None, :]).sum(-1) * scale  # [batch, heads, length]
        p_extra = torch.sigmoid(extra - torch.logsumexp(scores, dim=-1))
        expected = vanilla(hidden, (cos, sin))[0].view(batch, length, heads, head_dim) * \
            (1 - p_extra).transpose(1, 2)[..., None]
        got = biased(hidden, (cos, sin))[0].view(batch, length, heads, head_dim)
        assert torch.allclose(got, expected, atol=1e-6)
        assert p_extra.min() > 0.01  # the identity is not trivially satisfied by a vanishing p'


def test_clipped_softmax_is_its_formula():
    scores = torch.tensor([[4.0, 0.0, -3.0, 1.0]])
    probs = torch.softmax(scores, dim=-1)
    gamma, zeta = -0.03, 1.05
    expected = torch.clamp((zeta - gamma) * probs + gamma, 0, 1)
    got = clipped_softmax(scores, gamma, zeta)
    assert torch.allclose(got, expected)
    assert got[0, 2] == 0.0 and got[0, 0] == min(1.0, float((zeta - gamma) * probs[0, 0] + gamma))
    # gamma=0, zeta=1 is the plain softmax, and the explicit attention path then equals SDPA's
    assert torch.allclose(clipped_softmax(scores, 0.0, 1.0), probs)
    vanilla, clipped = _attention_pair("clipped_softmax", byte_tokenizer(), clip_gamma=0.0, clip_zeta=1.0)
    hidden, rope = _inputs(clipped.config)
    with torch.no_grad():
        assert torch.allclose(clipped(hidden, rope)[0], vanilla(hidden, rope)[0], atol=1e-6)


def model_variant(name):
    """Every attention variant, and SSNorm (a norm variant with vanilla attention), as a variant config."""
    attention = {"attention_variant": name} if name != "ssnorm" else {"attention_variant": "vanilla", "norm": name}
    return OmegaConf.create({"attention": attention})


@pytest.mark.parametrize("name", [*ATTENTION_VARIANTS, "ssnorm"])
def test_every_variant_keeps_the_kv_cache_and_padding_right(name):
    """A cached step equals the full forward (sigmoid's b is fixed, not the current key count), and a left-padded
    batch, with the position ids generation gives it, equals the same tokens unpadded."""
    model = model_for(model_variant(name), byte_tokenizer()).eval()
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        past = model(ids[:, :20], use_cache=True).past_key_values
        assert torch.allclose(model(ids[:, 20:], past_key_values=past).logits, full[:, 20:], atol=1e-5)
        padded = torch.cat([torch.zeros(2, 5, dtype=ids.dtype), ids], dim=1)
        mask = torch.ones_like(padded)
        mask[:, :5] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        assert torch.allclose(model(padded, attention_mask=mask, position_ids=positions).logits[:, 5:], full,
                              atol=1e-5)


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name == "softpick" else pytest.mark.slow)
                                  for name in [*ATTENTION_VARIANTS, "ssnorm"]])
def test_torch_compile_traces_every_variant_whole(name):
    """What the GPU run compiles (train.size.compile=auto): dynamo traces a training step of every variant without a
    graph break, and the compiled loss equals the eager one (backend aot_eager: the tracing, no C++ compiler needed)."""
    from torch._dynamo.utils import counters
    model = model_for(model_variant(name), byte_tokenizer())
    ids = torch.randint(3, 250, (2, SEQLEN), generator=torch.Generator().manual_seed(6))
    torch._dynamo.reset()
    counters.clear()
    loss = next_token_loss(torch.compile(model, backend="aot_eager")(ids, use_cache=False).logits, ids)
    loss.backward()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert torch.allclose(loss, next_token_loss(model(ids, use_cache=False).logits, ids), atol=1e-5)


def test_softpick_is_its_definition_on_a_hand_example():
    """ReLU(e^s - 1) / (sum |e^s - 1| + eps): s = (ln 3, 0, ln 0.5, masked) -> e^s - 1 = (2, 0, -0.5, -) ->
    (2, 0, 0, 0) / 2.5. A row of non-positive scores attends to nothing; a fully masked row gives zeros."""
    inf = float("inf")
    scores = torch.tensor([[math.log(3.0), 0.0, math.log(0.5), -inf],
                           [-1.0, -2.0, 0.0, -inf],
                           [-inf, -inf, -inf, -inf]])
    got = softpick(scores, eps=0.0)
    assert torch.allclose(got[0], torch.tensor([0.8, 0.0, 0.0, 0.0]))
    assert torch.equal(got[1], torch.zeros(4)) and torch.equal(softpick(scores)[2], torch.zeros(4))
    # large scores: the row-maximum shift keeps it finite, and it is still its definition (e^100 >> 1)
    big = softpick(torch.tensor([[100.0, 99.0]]))
    assert torch.allclose(big, torch.tensor([[1.0, math.exp(-1.0)]]) / (1 + math.exp(-1.0)))
    # a row sums to at most one (ReLU(a) <= |a|), and to less wherever some e^s - 1 is negative
    sums = softpick(torch.randn(64, 16, generator=torch.Generator().manual_seed(5))).sum(-1)
    assert sums.max() <= 1.0 + 1e-6 and sums.min() < 0.9


def _explicit(module, hidden, rope, weights):
    """The attention output computed by hand: weights(q k^T / sqrt(d), causal mask at -inf) v, then o_proj."""
    config = module.config
    batch, length, _ = hidden.shape
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    query = module.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
    key = module.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    value = module.v_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, *rope)
    groups = heads // config.num_key_value_heads
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2) / math.sqrt(head_dim)).masked_fill(
        ~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    output = weights(scores) @ value
    return module.o_proj(output.transpose(1, 2).reshape(batch, length, -1))


def test_sigmoid_attention_is_an_explicit_computation():
    """sigmoid(s - log n) v, n = max_position_embeddings by default or sigmoid_bias_length; masked keys weigh 0."""
    for length_field, n in ((None, ARCH["max_position_embeddings"]), (10, 10)):
        _, sigmoid = _attention_pair("sigmoid", byte_tokenizer(), sigmoid_bias_length=length_field)
        hidden, rope = _inputs(sigmoid.config)
        with torch.no_grad():
            expected = _explicit(sigmoid, hidden, rope, lambda s: torch.sigmoid(s - math.log(n)))
            assert torch.allclose(sigmoid(hidden, rope)[0], expected, atol=1e-6)


def test_softpick_attention_is_an_explicit_computation():
    _, module = _attention_pair("softpick", byte_tokenizer())
    hidden, rope = _inputs(module.config)
    with torch.no_grad():
        expected = _explicit(module, hidden, rope, lambda s: torch.relu(s.exp() - 1) / (
            (s.exp() - 1).abs().nan_to_num(0.0).masked_fill(s == float("-inf"), 0.0).sum(-1, keepdim=True) + 1e-8))
        assert torch.allclose(module(hidden, rope)[0], expected, atol=1e-6)


def test_elementwise_gate_is_vanilla_when_open_and_gates_each_channel():
    tokenizer = byte_tokenizer()
    vanilla, gated = _attention_pair("gated_elementwise", tokenizer)
    config = gated.config
    hidden, rope = _inputs(config)
    with torch.no_grad():
        gated.gate_proj.weight.zero_()
        gated.gate_proj.bias.fill_(40.0)  # sigmoid(40) = 1 - 4e-18: every gate fully open
        assert torch.allclose(gated(hidden, rope)[0], vanilla(hidden, rope)[0], atol=1e-6)
        # one gate value per head and channel: with o_proj the identity, channel c of the output is scaled by
        # sigmoid(bias_c) (a per-head scalar gate could not do this)
        identity = torch.eye(config.hidden_size)
        for module in (vanilla, gated):
            module.o_proj.weight.copy_(identity)
        bias = torch.linspace(-3, 3, config.hidden_size)
        gated.gate_proj.bias.copy_(bias)
        assert torch.allclose(gated(hidden, rope)[0], vanilla(hidden, rope)[0] * torch.sigmoid(bias), atol=1e-6)
        # the gate depends on the query's own input: W_theta x moves it
        gated.gate_proj.weight.normal_(0, 0.5)
        assert not torch.allclose(gated(hidden, rope)[0], vanilla(hidden, rope)[0] * torch.sigmoid(bias), atol=1e-3)


def test_ssnorm_is_its_formula_with_one_gain_per_norm():
    norm = SSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.fill_(1.7)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(4))
    expected = 1.7 * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(norm(x), expected, atol=1e-6)
    model = model_for(variant_cfg("ssnorm"), byte_tokenizer())
    norms = [module for module in model.modules() if isinstance(module, SSNorm)]
    assert len(norms) == 2 * ARCH["num_hidden_layers"] + 1 and all(n.weight.shape == (1,) for n in norms)
    assert all(float(n.weight) == 1.0 for n in norms)  # gamma = 1 at start, as RMSNorm's gains
    from outlierlab.train.loop import l1_gamma_penalty
    assert float(l1_gamma_penalty(model)) == pytest.approx(len(norms))  # the L1-on-gamma penalty sees the one gain


def test_resuming_continues_the_same_loss_curve(streams, tmp_path):
    variant = variant_cfg("kv_bias")
    val = streams.val[: 4 * SEQLEN].view(4, SEQLEN)
    straight = train(model_for(variant, streams.tokenizer), streams, streams.tokenizer, settings(6),
                     tmp_path / "straight", {}, val, None)
    interrupted = train(model_for(variant, streams.tokenizer), streams, streams.tokenizer, settings(6),
                        tmp_path / "resumed", {}, val, None, stop_at=3)
    assert interrupted["steps"] == 3 and not (tmp_path / "resumed" / "config.json").exists()
    fresh = model_for(variant, streams.tokenizer)  # a new process would start from a freshly built model
    resumed = train(fresh, streams, streams.tokenizer, settings(6), tmp_path / "resumed", {}, val, None)
    assert resumed["resumed_from"] == 3
    first = [entry["loss"] for entry in straight["history"]]
    second = [entry["loss"] for entry in resumed["history"]]
    assert len(second) == 6
    assert second == pytest.approx(first, abs=1e-5)
    assert straight["history"][-1]["val_loss"] == pytest.approx(resumed["history"][-1]["val_loss"], abs=1e-5)


def test_overwrite_trains_a_finished_run_again_and_a_requeued_one_resumes(streams, tmp_path):
    """overwrite=true on a finished run starts again at step 0 (resuming its last checkpoint would train nothing);
    an interrupted run, with or without overwrite, continues from its checkpoint."""
    from outlierlab.train.modeling import resume_training
    variant = variant_cfg("vanilla")
    val = streams.val[: 4 * SEQLEN].view(4, SEQLEN)
    output = tmp_path / "run"
    train(model_for(variant, streams.tokenizer), streams, streams.tokenizer, settings(4), output, {}, val, None)
    assert resume_training(output, resume=True, overwrite=False) is True  # a finished run, no overwrite: resumed
    again = train(model_for(variant, streams.tokenizer), streams, streams.tokenizer, settings(4), output, {}, val,
                  None, resume=resume_training(output, resume=True, overwrite=True), stop_at=2)
    assert again["resumed_from"] is None and again["steps"] == 2
    # the requeued job of that overwrite run finds no finished marker and continues its own checkpoint
    assert resume_training(output, resume=True, overwrite=True) is True
    rest = train(model_for(variant, streams.tokenizer), streams, streams.tokenizer, settings(4), output, {}, val,
                 None, resume=True)
    assert rest["resumed_from"] == 2 and len(rest["history"]) == 4


@pytest.mark.parametrize("name,model_type", [("vanilla", "llama"), ("gated", "outlierlab_llama"),
                                             ("ssnorm", "outlierlab_llama")])
def test_trained_checkpoint_loads_with_model_source(name, model_type, streams, tmp_path):
    variant = variant_cfg(name)
    model = model_for(variant, streams.tokenizer)
    val = streams.val[: 4 * SEQLEN].view(4, SEQLEN)
    train(model, streams, streams.tokenizer, settings(2), tmp_path, {"variant": name}, val, None)
    cfg = compose_cfg(["+exp=prune_sw", "model=trained", f"model.source={tmp_path}", "model.device=cpu",
                       f"paths.data_dir={DATA_DIR}"])
    plan = preflight(cfg)
    loaded = load_model(cfg.model, tmp_path / "cache", plan.source)
    assert loaded.model.config.model_type == model_type and loaded.sites.num_layers == ARCH["num_hidden_layers"]
    assert isinstance(loaded.model, OutlierLlamaForCausalLM) == (model_type == "outlierlab_llama")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model(val).logits, model(val).logits, atol=1e-5)


def test_w8a8_fake_quant_is_rtn_and_undone_bit_exactly(streams):
    x = torch.tensor([-1.0, -0.3, 0.0, 0.26, 0.5, 2.54])
    q = quantize_rtn(x, 8)
    scale = 2.54 / 127
    assert torch.allclose(q / scale, torch.round(q / scale), atol=1e-4)  # on the integer grid
    assert (q - x).abs().max() <= scale / 2 + 1e-7
    model = model_for(variant_cfg("vanilla"), streams.tokenizer).eval()
    from outlierlab.models.load import LoadedModel
    from outlierlab.models.sites import Sites
    loaded = LoadedModel(model, streams.tokenizer, Sites(model), "none")
    ids = streams.val[:SEQLEN][None]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(ids).logits
        with EditSession(loaded) as session:
            session.apply([W8A8(8, 8)])
            quantized = model(ids).logits
            assert session.log[0]["linears"] == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + LM head
        assert not torch.equal(plain, quantized) and torch.allclose(plain, quantized, atol=0.5)
        assert torch.equal(model(ids).logits, plain)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="weight_bits=1"):
        W8A8(weight_bits=1)


def test_site_moments_kurtosis_equals_a_direct_computation(streams):
    model = model_for(variant_cfg("vanilla"), streams.tokenizer).eval()
    from outlierlab.models.sites import Sites
    sites = Sites(model)
    captured = []
    with torch.no_grad(), SiteMoments(sites) as moments, sites.hook("layers.1.attn.out", captured.append):
        for start in (0, SEQLEN):
            model(streams.val[start:start + SEQLEN][None])
    x = torch.cat([t.reshape(-1) for t in captured]).double()
    centred = x - x.mean()
    kurtosis = float((centred ** 4).mean() / (centred ** 2).mean() ** 2)
    assert moments.kurtosis()[1] == pytest.approx(kurtosis, rel=1e-6)
    assert moments.summary()["max_abs"][1] == pytest.approx(float(x.abs().max()))


@pytest.mark.parametrize("overrides,message", [
    (["+exp=pretrain", "train.variant.attention.attention_variant=softmax1"], "attention_variant=softmax1"),
    (["+exp=pretrain", "train/variant=ssnorm", "train.variant.attention.norm=layernorm"], "norm=layernorm"),
    (["+exp=pretrain", "train.size.seqlen=4096"], "exceeds architecture.max_position_embeddings"),
    (["+exp=pretrain", "train.size.data.path=nowhere.jsonl"], "nowhere.jsonl"),
    (["+exp=variants_table", "paths.checkpoints_dir=/nonexistent"], "no trained model for vanilla"),
])
def test_bad_training_input_is_one_clear_error_before_anything_runs(overrides, message):
    cfg = compose_cfg([*overrides, f"paths.data_dir={DATA_DIR}"])
    with pytest.raises(Exception, match=message) as error:
        preflight(cfg)
    assert isinstance(error.value, ValueError)


@pytest.mark.requires("data")
def test_pretrain_then_variants_table_end_to_end(tmp_path):
    """The user's two commands on the real corpus, shrunk: +exp=pretrain for two variants, then +exp=variants_table."""
    shrink = ["train.size.steps=4", "train.size.warmup_steps=1", "train.size.eval_every=2", "train.size.seqlen=32",
              "train.size.batch_size=4", "train.size.val_windows=4", "train.size.data.max_chars=100000",
              "train.size.data.vocab_size=400", "train.size.data.val_documents=5",
              "train.size.architecture.hidden_size=32", "train.size.architecture.intermediate_size=64",
              "train.size.architecture.num_hidden_layers=2", "train.size.architecture.num_attention_heads=2",
              "train.size.architecture.num_key_value_heads=2", "logger=none", "model.device=cpu",
              f"paths.results_dir={tmp_path}/results", f"paths.checkpoints_dir={tmp_path}/checkpoints",
              f"paths.cache_dir={tmp_path}/cache", f"paths.data_dir={DATA_DIR}"]
    for name in ("vanilla", "sink"):
        record = execute(compose_cfg(["+exp=pretrain", f"train/variant={name}", *shrink]))
        assert record["model"]["variant"] == name and len(record["history"]) == 4
    assert (tmp_path / "results" / "pretrain" / "tiny_sink" / "train.json").is_file()
    record = execute(compose_cfg(["+exp=variants_table", "exp.train_variants=[vanilla,sink]", *shrink]))
    rows = {row["variant"]: row for row in record["table"]["rows"]}
    assert set(rows) == {"vanilla", "sink"}
    for row in rows.values():
        assert row["fp_ppl"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["w8a8_ppl"] > 1 and row["max_inf_norm"] > 0 and row["massive"] in ("yes", "no")
        for key in ("fp_ppl", "w8a8_ppl", "w8a8_over_fp"):  # intervals over the validation windows
            low, high = row[f"{key}_ci"]
            assert low <= row[key] <= high and low < high
    assert record["variants"]["sink"]["bos"] == "prepend" and record["variants"]["vanilla"]["bos"] == "none"
    assert all(d["w8a8"]["weights_restored"] for d in record["variants"].values())
    assert record["table"]["reference"]["values"]["vanilla"]["fp_ppl"] == 15.84  # QT Table 2, OPT-125m
    assert (tmp_path / "results" / "variants_table" / "tiny" / "table.json").is_file()
    # tables and figures rebuild from results/ alone
    from outlierlab.reports.variants import build_figures, build_tables
    tables = build_tables(tmp_path / "results", tmp_path / "out")
    figures = build_figures(tmp_path / "results", tmp_path / "out")
    assert {p.name for p in tables} == {"variants_table_tiny.md", "variants_table_tiny.tex"}
    assert {p.name for p in figures} >= {"variants_layers_tiny.png", "variants_training_tiny.png"}
    assert "| sink" in (tmp_path / "out" / "variants_table_tiny.md").read_text()
