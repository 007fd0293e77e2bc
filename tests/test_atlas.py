"""The outlier atlas and its detectors: planted channel outliers, outlier tokens and norm gains are found in random
models of every family and nothing is found unplanted; attention on OutlierAttention (the pretraining variants) is
observed or refused, never silently skipped; the atlas end to end on a tiny model with a planted super weight."""
import json

import pytest
import torch
from conftest import SMALL_EVAL, TINY_MODELS, compose_cfg, plant_super_weight
from omegaconf import OmegaConf

from outlierlab.models.attention import AttentionNotObservable, observe
from outlierlab.models.load import byte_tokenizer, load_model
from outlierlab.models.sites import Sites
from outlierlab.probes.outliers import (
    ChannelOutliers,
    OutlierTokens,
    SinkRate,
    norm_gains,
    norm_modules,
)
from outlierlab.runner import execute
from outlierlab.models.variant_attention import ATTENTION_VARIANTS, VARIANTS
from outlierlab.train.modeling import build_model

ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": True}


def text_batch(loaded, length=48, count=2):
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog. " * 4, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[i:i + length] for i in range(count)])


@torch.no_grad()
def effective_gain(module: torch.nn.Module, size: int) -> torch.Tensor:
    """The per-channel gain a norm applies, measured by calling it: for x = (+1, -1, +1, ...) (mean 0, RMS 1),
    (norm(x) - norm(-x)) / 2x is the gain whatever the parametrisation (w, 1 + w, ...), up to the norm's own
    1 / sqrt(1 + eps), and cancels any bias."""
    parameter = next(module.parameters())
    x = torch.ones(1, 1, size, dtype=parameter.dtype, device=parameter.device)
    x[..., 1::2] = -1.0
    return ((module(x) - module(-x)) / (2 * x)).reshape(-1).float().cpu()


def set_gain(loaded, module, channel: int, gain: float):
    """Give a norm the gain `gain` at `channel` in its family's convention (gain = norm_gain_offset + w)."""
    with torch.no_grad():
        module.weight[channel] = gain - loaded.sites.family.norm_gain_offset


@pytest.fixture(params=TINY_MODELS)
def tiny(request, tmp_path):
    return load_model(compose_cfg([f"model={request.param}"]).model, tmp_path)


def test_the_family_gain_is_the_gain_the_module_applies(tiny):
    """Family.norm_gain_offset (the one gain reading, Sites.norm_gain) agrees with what every norm computes, measured
    by calling it, including a planted channel: a family entry with the wrong convention fails here."""
    hidden, sites = tiny.model.config.hidden_size, tiny.sites
    name, layer, module = next(n for n in norm_modules(tiny) if n[1] == 1)
    set_gain(tiny, module, 5, 300.0)
    for site in sites.all_norms():
        measured, family = effective_gain(sites.module(site), hidden), sites.norm_gain(site).cpu()
        assert torch.allclose(measured, family, rtol=1e-4, atol=1e-5), site
    assert abs(float(effective_gain(module, hidden)[5]) - 300.0) < 1e-2


def test_norm_gains_follow_the_family_and_planted_outliers_found(tiny):
    rows = norm_gains(tiny)
    assert rows and all(abs(r["max_ratio_to_median"] - 1) < 1e-3 and not r["outlier_channels"] for r in rows)
    assert [r["name"] for r in rows] == [tiny.sites.module_name(site) for site in tiny.sites.all_norms()]
    name, layer, module = next(n for n in norm_modules(tiny) if n[1] == 1)
    set_gain(tiny, module, 5, 300.0)
    planted = next(r for r in norm_gains(tiny) if r["name"] == name)
    assert (planted["max_channel"], round(planted["max_gain"])) == (5, 300) and planted["outlier_channels"] == [5]
    # Gemma's RMSNorms (1, 2 and 3) compute x * (1 + w): the family table says so (this list is the test's own).
    expected = "1 + w" if tiny.model.config.model_type in ("gemma", "gemma2", "gemma3_text") else "w"
    assert {r["parametrisation"] for r in rows} == {expected}


def test_int8_channel_outliers_found_when_planted_nothing_otherwise(tiny):
    batch = text_batch(tiny)
    with ChannelOutliers(tiny.sites) as probe, torch.no_grad():
        tiny.model(batch)
    assert probe.summary()["features"] == [] and max(probe.summary()["count_per_layer"]) == 0
    for name, layer, module in norm_modules(tiny):
        if layer is not None:
            set_gain(tiny, module, 11, 40.0)  # every norm of every block: channel 11 large at nearly every token
    with ChannelOutliers(tiny.sites) as probe, torch.no_grad():
        tiny.model(batch)
    summary = probe.summary()
    assert summary["features"] == [11] and min(summary["count_per_layer"]) >= 1


def test_prefixquant_outlier_tokens_found_when_planted_nothing_otherwise(tiny):
    batch = text_batch(tiny)
    with OutlierTokens(tiny.sites) as probe, torch.no_grad():
        tiny.model(probe.observe(batch) and batch)
    assert sum(row["outlier_tokens"] for row in probe.summary()) == 0

    def plant(x):  # one token of sequence 0 (position 5) gets a channel 1000x the largest |x| of the batch
        x = x.clone()
        x.reshape(-1, x.shape[-1])[5, 33] = 1000 * float(x.abs().max())
        return x
    with tiny.sites.hook("layers.1.mlp.down_proj.in", plant), OutlierTokens(tiny.sites) as probe, torch.no_grad():
        tiny.model(probe.observe(batch) and batch)
    rows = probe.summary()
    assert (rows[1]["outlier_tokens"], rows[1]["positions"]) == (1, [(5, 1)]) and rows[1]["max_ratio"] > 64
    assert sum(row["outlier_tokens"] for row in rows) == 1


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_outlier_attention_is_observed_and_unchanged(variant):
    attention = {"attention_variant": variant, "clip_gamma": -0.03, "clip_zeta": 1.0, "gate_init": 0.5}
    model = build_model(dict(ARCH), attention, byte_tokenizer(), seed=0).eval()
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
    sites, seen = Sites(model), []
    with sites.hook("layers.1.attn.probs", seen.append), torch.no_grad():
        observed = model(ids).logits
    assert len(seen) == 1  # called once per forward, not 0 times
    keys = 17 if variant == "kv_bias" else 16  # k' is delivered as the last key column
    assert seen[0].shape == (2, 4, 16, keys)
    assert torch.allclose(observed, plain, atol=1e-5)
    if VARIANTS[variant].sums_to_one:  # clipped softmax, softpick and sigmoid weights need not sum to one
        assert torch.allclose(seen[0].sum(-1), torch.ones(2, 4, 16), atol=1e-5)
    with SinkRate(sites) as sinks, torch.no_grad():
        model(ids)
    assert 0.0 <= sinks.summary()["sink_rate"] <= 1.0


def test_attention_that_cannot_be_observed_is_refused(tiny):
    with pytest.raises(AttentionNotObservable, match="cannot be observed"):
        observe(tiny.model, torch.nn.Linear(2, 2), "probs", print)


def test_sink_rate_is_gu_et_als_metric(tiny):
    batch = text_batch(tiny, length=80)
    with SinkRate(tiny.sites) as probe, torch.no_grad():
        tiny.model(batch)
    summary = probe.summary()
    # Recompute from the probabilities directly: queries 0..63, attention to key 0, mean over queries and
    # sequences, share of (layer, head) above 0.3.
    probs = []
    with tiny.sites.hook("layers.0.attn.probs", probs.append), torch.no_grad():
        tiny.model(batch)
    direct = probs[0][:, :, :64, 0].mean(-1).mean(0)
    assert summary["per_layer"][0]["sink_heads"] == int((direct > 0.3).sum())
    assert torch.allclose(torch.tensor(summary["per_layer"][0]["mean_attention_to_first"], dtype=torch.float64),
                          direct.double(), atol=1e-6)


def test_atlas_end_to_end_on_a_tiny_model_with_a_planted_super_weight(tmp_path):
    # A tiny llama with a super weight planted, saved as any HF directory a user would pass with model=path.
    loaded = load_model(compose_cfg(["model=tiny_llama"]).model, tmp_path)
    plant_super_weight(loaded, layer=1, row=7, col=33, input_gain=5000.0, weight=200.0)
    loaded.model.save_pretrained(tmp_path / "planted")
    loaded.tokenizer.save_pretrained(tmp_path / "planted")
    cfg = compose_cfg(["+exp=atlas", "model=path", f"model.source={tmp_path / 'planted'}", "logger=none",
                       "model.device=cpu", f"paths.results_dir={tmp_path}/results", *SMALL_EVAL,
                       "exp.data.corpus.windows=4", "exp.data.corpus.seqlen=64"])
    record = execute(cfg)
    assert (record["model"]["bos"], record["bos"]) == ("none", "none")  # auto: the byte tokenizer adds no BOS
    [candidate] = [c for c in record["super_weights"]["candidates"] if c["detected"]]
    assert candidate["coord"] == [1, 7, 33] and candidate["row_is_ma_channel"]
    assert candidate["ppl_ratio"]["wikitext2"] != 1.0  # importance measured, whatever it is
    low, high = candidate["ppl_ratio_ci"]["wikitext2"]  # with its paired interval over the same windows
    assert low <= candidate["ppl_ratio"]["wikitext2"] <= high
    [ma] = record["massive_activations"]["consistent"][:1]
    assert ma["channel"] == 7 and ma["first_layer"] == 1
    [origin] = [o for o in record["massive_activations"]["origins"] if o["channel"] == 7]
    assert origin["made_by"] == "super weight (1, 7, 33)"
    assert record["weights_restored"]
    stored = json.loads((tmp_path / "results" / "atlas" / "planted" / "quick.json").read_text())
    assert stored["table"]["rows"][0]["sw_detected"] == "(1, 7, 33)"
    assert stored["table"]["rows"][0]["sw_ppl_x_original"].count("[") == 1
    from outlierlab.reports import run_builders
    written = run_builders("tables", tmp_path / "results", tmp_path / "tables", ["atlas"])
    written += run_builders("figures", tmp_path / "results", tmp_path / "figures", ["atlas"])
    assert sorted(p.name for p in written) == ["atlas_index.md", "atlas_index.tex", "atlas_overview.pdf",
                                               "atlas_overview.png"]
    assert "(1, 7, 33)" in (tmp_path / "tables" / "atlas_index.md").read_text()


def test_atlas_on_a_model_whose_attention_cannot_be_observed_says_so_and_measures_the_rest(tmp_path):
    """Falcon's attention has no eager function to observe: its atlas records why there is no sink rate, and the
    table and figure are still built."""
    falcon = ["model=tiny_llama", "model.tiny.model_type=falcon", "+model.tiny.alibi=false", "+model.tiny.bias=true",
              "+model.tiny.ffn_hidden_size=128", "+model.tiny.parallel_attn=true"]
    cfg = compose_cfg(["+exp=atlas", *falcon, "logger=none", f"paths.results_dir={tmp_path}/results", *SMALL_EVAL,
                       "exp.data.corpus.windows=2", "exp.data.corpus.seqlen=32"])
    record = execute(cfg)
    sinks = record["attention_sinks"]
    assert sinks["observable"] is False and sinks["sink_rate"] is None and "cannot be observed" in sinks["reason"]
    assert record["per_layer"]["int8_channels"] and record["weights_restored"]
    from outlierlab.reports import run_builders
    written = run_builders("tables", tmp_path / "results", tmp_path / "tables", ["atlas"])
    written += run_builders("figures", tmp_path / "results", tmp_path / "figures", ["atlas"])
    assert {p.name for p in written} >= {"atlas_index.md", "atlas_overview.png"}
