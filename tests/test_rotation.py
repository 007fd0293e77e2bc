"""The fused residual rotation (interventions/rotation.py, quant/hadamard.py): the rotated float model computes the
same logits on every family it supports, the rest are refused in one line, and undo restores the weights bit-exactly."""
import pytest
import torch
from conftest import compose_cfg, weights_hash

from outlierlab.errors import UnsupportedArchitecture
from outlierlab.interventions.base import EditSession
from outlierlab.interventions.rotation import Rotate, rotation_refusal
from outlierlab.models.load import load_model
from outlierlab.quant.hadamard import hadamard, rotation

# Gemma-3's sandwich norms (gemma3_text) on the tiny Gemma shapes.
GEMMA3 = ["model=tiny_gemma", "model.tiny.model_type=gemma3_text", "+model.tiny.sliding_window=16"]
SUPPORTED = {"tiny_llama": ["model=tiny_llama"], "tiny_qwen2": ["model=tiny_qwen2"],
             "tiny_gemma": ["model=tiny_gemma"], "tiny_gemma3": GEMMA3}
REFUSED = {"tiny_gpt2": (["model=tiny_gpt2"], "LayerNorm"), "tiny_opt": (["model=tiny_opt"], "LayerNorm")}


def _load(overrides, tmp_path):
    return load_model(compose_cfg(overrides).model, tmp_path)


def _logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids).logits.double()


@pytest.mark.parametrize("n", [4, 12, 20, 64, 96, 576, 640, 1536])
def test_hadamard_sizes_of_the_studied_models_are_hadamard(n):
    matrix = hadamard(n)
    assert torch.equal(matrix.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.allclose(matrix @ matrix.T, n * torch.eye(n, dtype=torch.float64))


def test_a_size_without_hadamard_falls_back_to_a_recorded_orthogonal_one():
    assert hadamard(9) is None
    q, note = rotation(9, "hadamard", seed=3)
    assert "orthogonal fallback" in note
    assert torch.allclose(q @ q.T, torch.eye(9, dtype=torch.float64))
    assert torch.equal(q, rotation(9, "hadamard", seed=3)[0]) and not torch.equal(q, rotation(9, "hadamard", 4)[0])


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("kind,online", [("hadamard", False), ("orthogonal", True)])
def test_rotated_float_model_computes_the_same_logits_and_undo_is_exact(name, kind, online, tmp_path):
    loaded = _load(SUPPORTED[name], tmp_path)
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    before, digest = _logits(loaded, ids), weights_hash(loaded.model)
    embed = loaded.sites.module("embed")
    with EditSession(loaded) as session:
        session.apply([Rotate(kind=kind, seed=1, online_down_proj=online)])
        after = _logits(loaded, ids)
        rotated_embedding = embed.weight.detach().clone()
        entry = session.log[-1]
    # The edit did something (the embedding is another matrix) and the function is the same.
    assert not torch.allclose(rotated_embedding, embed.weight)
    assert torch.allclose(after, before, atol=1e-4 * before.abs().max().item()), float((after - before).abs().max())
    assert weights_hash(loaded.model) == digest
    assert loaded.model.get_output_embeddings().weight is embed.weight or not loaded.model.config.tie_word_embeddings
    assert entry["kind"] == kind and ("online_down_proj" in entry) == online
    assert bool(entry["online_output_norms"]) == (name == "tiny_gemma3")


def test_rotation_spreads_a_planted_massive_channel(tmp_path):
    """A residual channel made huge by a planted embedding column is spread over every channel once rotated, while
    the token's norm stays."""
    loaded = _load(["model=tiny_llama"], tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    embed = loaded.sites.module("embed").weight
    with EditSession(loaded) as plant:
        plant.set(embed, (5, 3), 500.0)
        seen = {}
        with loaded.sites.hook("layers.0.in", lambda x: seen.__setitem__("plain", x[0, 0].clone())):
            loaded.model(ids)
        with EditSession(loaded) as session:
            session.apply([Rotate(seed=0)])
            with loaded.sites.hook("layers.0.in", lambda x: seen.__setitem__("rotated", x[0, 0].clone())):
                loaded.model(ids)
    plain, rotated = seen["plain"], seen["rotated"]
    assert plain.abs().argmax() == 3 and plain.abs().max() > 0.9 * plain.norm()
    assert torch.isclose(rotated.norm(), plain.norm(), rtol=1e-4)
    assert rotated.abs().max() < 0.2 * rotated.norm()  # 1/sqrt(64) of the norm per channel, plus the rest


@pytest.mark.parametrize("name", REFUSED)
def test_layer_norm_families_are_refused_in_one_line(name, tmp_path):
    overrides, reason = REFUSED[name]
    loaded = _load(overrides, tmp_path)
    assert reason in rotation_refusal(loaded.sites.family)
    digest = weights_hash(loaded.model)
    with pytest.raises(UnsupportedArchitecture, match=f"rotation: .*{reason}"):
        with EditSession(loaded) as session:
            session.apply([Rotate()])
    assert weights_hash(loaded.model) == digest


@pytest.mark.parametrize("kwargs,key", [({"seed": 1.5}, "seed"), ({"seed": True}, "seed"), ({"seed": "1"}, "seed"),
                                        ({"kind": "givens"}, "kind")])
def test_bad_arguments_are_refused_when_built(kwargs, key):
    with pytest.raises(ValueError, match=key):
        Rotate(**kwargs)
