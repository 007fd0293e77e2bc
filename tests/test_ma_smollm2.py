"""The real model: SmolLM2-135M's massive activation (channel 507, first token). Setting it to its mean leaves
perplexity where it was, setting it to zero in every layer wrecks the model, and later layers attend to it as a
sink with positive logits."""
import pytest
import torch
from conftest import DATA_DIR, compose_cfg, weights_hash

from outlierlab.evals.data import load_corpus
from outlierlab.evals.ppl import build_windows, perplexity
from outlierlab.interventions.base import EditSession
from outlierlab.interventions.massive_activation import SetMassiveActivations
from outlierlab.models import massive
from outlierlab.models.load import load_model
from outlierlab.probes.activation_means import calibrated_means
from outlierlab.probes.attention import AttentionSinks

pytestmark = [pytest.mark.smollm2,
              pytest.mark.requires("smollm2"),
              pytest.mark.requires("data")]


def test_set_to_mean_keeps_ppl_and_zero_everywhere_wrecks_it(tmp_path):
    cfg = compose_cfg(["model=smollm2_135m", "+calibration=wikitext2_valid"])
    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    found, _ = massive.parse(cfg.model.massive_activations, bos=cfg.model.bos)
    assert found == [massive.MassiveActivation(11, (247, 507), (0,))]  # the registry entry for BOS none
    before = weights_hash(loaded.model)
    calibration = cfg.calibration
    calibration.seqlen, calibration.windows = 128, 2
    windows = build_windows(calibration, load_corpus("wikitext2", "validation", str(DATA_DIR)), loaded)
    means = calibrated_means(loaded, found, windows, tmp_path)
    assert means["locations"][0]["mean"][11][0][1] > 1000 * means["median_abs"][11]  # channel 507: massive indeed
    protocol = cfg.eval.ppl.wikitext2
    protocol.seqlen, protocol.windows = 128, 1
    test = build_windows(protocol, load_corpus("wikitext2", "test", str(DATA_DIR)), loaded)
    context = {"massive_activations": found, "ma_means": means}
    original = perplexity(loaded.model, test)["ppl"]
    ppl = {}
    edits = {"mean": SetMassiveActivations("mean"), "zero_all": SetMassiveActivations("zero", "all")}
    for name, intervention in edits.items():
        with EditSession(loaded, context) as session:
            session.apply([intervention])
            ppl[name] = perplexity(loaded.model, test)["ppl"]
    assert ppl["mean"] == pytest.approx(original, rel=0.05)
    # x7.9 on this one 128-token window (x20,000 on 8 x 512 tokens: the damage grows with the context)
    assert ppl["zero_all"] > 4 * original
    assert weights_hash(loaded.model) == before

    with AttentionSinks(loaded.sites, [0], layers=[20]) as probe:
        loaded.model(test.ids[:, :64])
    row = probe.summary()[0]
    assert torch.tensor(row["sink_share"]).mean() > 0.3
    assert min(row["logit_sink"]) > 0 > torch.tensor(row["logit_other"]).mean()
