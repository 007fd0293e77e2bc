"""Attention observation sites and the attention-sink statistics (paper MA Sec. 4)."""
from types import SimpleNamespace

import pytest
import torch
from conftest import DATA_DIR, TINY_MODELS, compose_cfg

from outlierlab.models.load import load_model
from outlierlab.probes.attention import AttentionSinks
from outlierlab.reports import ma_intervention
from outlierlab.runner import execute


@pytest.mark.parametrize("name", TINY_MODELS)
def test_logits_and_probs_sites_agree_with_the_model(name, tmp_path):
    loaded = load_model(compose_cfg([f"model={name}"]).model, tmp_path)
    ids = torch.tensor([loaded.encode("Attention sinks at the first token.")] * 2)
    implementation = loaded.model.config._attn_implementation
    plain = loaded.model(ids).logits
    seen = {}
    with loaded.sites.hook("layers.1.attn.logits", lambda t: seen.__setitem__("logits", t)), \
            loaded.sites.hook("layers.1.attn.probs", lambda t: seen.__setitem__("probs", t)), \
            loaded.sites.hook("layers.1.attn.values", lambda t: seen.__setitem__("values", t)):
        observed = loaded.model(ids).logits
    length = ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    heads = loaded.model.config.num_attention_heads
    assert seen["probs"].shape == (2, heads, length, length) and seen["values"].shape[:3] == (2, heads, length)
    assert torch.allclose(torch.softmax(seen["logits"] + causal, dim=-1), seen["probs"], atol=1e-6)
    assert torch.allclose(observed, plain, atol=1e-4)  # eager vs the model's own attention: rounding only
    assert loaded.model.config._attn_implementation == implementation  # restored when the last hook went
    assert torch.equal(loaded.model(ids).logits, plain)


def test_unknown_attention_point_is_an_error(tiny_llama):
    with pytest.raises(KeyError):
        tiny_llama.sites.register("layers.1.attn.scores", lambda t: None)


def test_sink_statistics_match_a_hand_computation():
    """One head, three tokens, sink = token 0; only queries 1 and 2 count (query 0 sees only the sink)."""
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.5, 0.2, 0.3]])[None, None]
    logits = torch.tensor([[9.0, 9.0, 9.0], [2.0, -1.0, 9.0], [1.0, 0.5, -0.5]])[None, None]  # 9 = masked out
    values = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]])[None, None]
    probe = AttentionSinks(SimpleNamespace(num_layers=1), sink_positions=[0])
    probe._fold(0, logits, values, probs)
    row = probe.summary()[0]
    assert row["queries"] == 2
    assert row["sink_share"] == pytest.approx([(0.7 + 0.5) / 2])
    assert row["logit_sink"] == pytest.approx([(2.0 + 1.0) / 2])
    assert row["logit_other"] == pytest.approx([(-1.0 + 0.5 - 0.5) / 3])
    assert row["logit_gap"] == pytest.approx([((2.0 - -1.0) + (1.0 - 0.0)) / 2])
    assert row["positive_sink"] == pytest.approx([1.0]) and row["positive_other"] == pytest.approx([1 / 3])
    assert row["sink_argmax"] == pytest.approx([1.0])
    v0, v1, v2 = values[0, 0]
    sink = torch.stack([0.7 * v0, 0.5 * v0])
    rest = torch.stack([0.3 * v1, 0.2 * v1 + 0.3 * v2])
    for name, part in (("sink", sink), ("rest", rest)):
        energy = part.square().sum(-1).mean()
        spread = (part - part.mean(0)).square().sum(-1).mean()
        assert row[f"{name}_relvar"] == pytest.approx([float(spread / energy)])
        assert row[f"{name}_relvar_layer"] == pytest.approx(float(spread / energy))
        assert row[f"{name}_norm"] == pytest.approx([float(part.norm(dim=-1).mean())])
        unit = part / part.norm(dim=-1, keepdim=True)
        assert row[f"{name}_dirvar"] == pytest.approx([float(1 - unit.mean(0).square().sum())], abs=1e-6)
    assert row["sink_dirvar"] == pytest.approx([0.0], abs=1e-6)  # 0.7 v0 and 0.5 v0: one direction


def test_streaming_over_batches_equals_one_pass(tiny_llama):
    ids = torch.tensor([tiny_llama.encode("Streaming attention statistics, one batch or many.")] * 3)
    ids[1, 5:] = ids[1, 5:].flip(0)
    with AttentionSinks(tiny_llama.sites, [0]) as whole:
        tiny_llama.model(ids)
    with AttentionSinks(tiny_llama.sites, [0]) as parts:
        for row in ids.split(1):
            tiny_llama.model(row)
    for a, b in zip(whole.summary(), parts.summary()):
        for key in ("sink_share", "logit_gap", "sink_relvar", "rest_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6)


def test_resampled_statistics_are_those_of_the_chosen_sequences(tiny_llama):
    """Sums are kept per sequence: weighting one sequence alone gives what a probe that saw only it reports, and
    weighting all once gives the summary (a bootstrap resample is such a weighting)."""
    ids = torch.tensor([tiny_llama.encode("Per-sequence sums, resampled as the bootstrap draws them.")] * 3)
    ids[1, 4:] = ids[1, 4:].flip(0)
    with AttentionSinks(tiny_llama.sites, [0]) as probe:
        tiny_llama.model(ids)
    with AttentionSinks(tiny_llama.sites, [0]) as second:
        tiny_llama.model(ids[1:2])
    assert probe.bootstrap_units() == 3 and second.bootstrap_units() == 1
    weights = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    for row, alone, whole in zip(probe.resampled(weights), second.summary(), probe.summary()):
        for key in ("sink_share", "logit_gap", "sink_relvar", "rest_dirvar"):
            assert row[key][0].tolist() == pytest.approx(whole[key], rel=1e-6, abs=1e-9)
            assert row[key][1].tolist() == pytest.approx(alone[key], rel=1e-4, abs=1e-6)
            assert row[key][2].tolist() == pytest.approx(alone[key], rel=1e-6, abs=1e-9)  # ratios of sums
        assert float(row["rest_relvar_layer"][1]) == pytest.approx(alone["rest_relvar_layer"], rel=1e-4, abs=1e-6)
    with AttentionSinks(tiny_llama.sites, [0], units=2) as grouped:  # past `units` sequences, n adds into n mod units
        tiny_llama.model(ids)
    assert grouped.bootstrap_units() == 2
    for row, whole in zip(grouped.resampled(torch.ones(1, 2)), probe.summary()):
        assert row["sink_share"][0].tolist() == pytest.approx(whole["sink_share"], rel=1e-6, abs=1e-9)


@pytest.mark.requires("data")
def test_ma_attention_end_to_end_on_a_tiny_model(tmp_path):
    cfg = compose_cfg(["+exp=ma_attention", "model=tiny_llama", "logger=none",
                       "exp.massive_activations=[{first_layer:1,channels:[5],positions:[0]}]",
                       "exp.calibration.seqlen=32", "exp.calibration.windows=2",
                       "exp.attention_data.seqlen=32", "exp.attention_data.windows=2",
                       f"paths.results_dir={tmp_path}/results", f"paths.cache_dir={tmp_path}/c",
                       f"paths.data_dir={DATA_DIR}"])
    record = execute(cfg)
    assert record["weights_restored"] is True
    rows = {row["variant"]: row for row in record["table"]["rows"]}
    assert list(rows) == ["original", "set_to_zero", "set_to_mean"]
    for row in rows.values():  # every number with its interval over the windows
        low, high = row["sink_share_ma_layers_ci"]
        assert low <= row["sink_share_ma_layers"] <= high and len(row["rest_dir_var_ci"]) == 2
    assert "sink_share_ma_layers_change" not in rows["original"]
    change = rows["set_to_zero"]["sink_share_ma_layers_change"]  # paired: the same windows for both variants
    original = rows["original"]["sink_share_ma_layers"]
    assert change == pytest.approx(rows["set_to_zero"]["sink_share_ma_layers"] - original)
    low, high = rows["set_to_zero"]["sink_share_ma_layers_change_ci"]
    assert low <= change <= high
    assert record["paired_changes"]["set_to_mean"]["logit_gap_ma_layers"]["change"] == pytest.approx(
        rows["set_to_mean"]["logit_gap_ma_layers_change"])
    layers = record["variants"]["original"]["layers"]
    assert len(layers) == 4 and all(0 <= s <= 1 for row in layers for s in row["sink_share"])
    figures = ma_intervention.build_figures(tmp_path / "results", tmp_path / "figures")
    assert sorted(p.name for p in figures if p.suffix == ".png") == [
        f"ma_attention_{name}_tiny_llama_quick.png" for name in ("decomposition", "logits", "sinks")]
    assert ma_intervention.build_figures(tmp_path / "empty", tmp_path / "figures") == []
