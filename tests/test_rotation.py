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


def test_a_planted_super_weight_is_detected_and_no_longer_after_rotation(tmp_path):
    """Positive: the planted super weight is found in the original basis; negative: in the rotated basis its row is
    spread over every output channel, so no single weight makes the down_proj spike."""
    from conftest import plant_super_weight

    from outlierlab.studies.rotation import super_weights
    loaded = _load(["model=tiny_llama"], tmp_path)
    plant_super_weight(loaded, layer=1, row=7, col=11)
    detection = dict(compose_cfg(["+exp=rotation", "model=tiny_llama"]).exp.detection)
    assert super_weights(loaded, detection)["detected"] == [[1, 7, 11]]
    with EditSession(loaded) as session:
        session.apply([Rotate(seed=0)])
        rotated = super_weights(loaded, detection)
    assert rotated["detected"] == []
    assert rotated["largest_down_proj"][1]["row"] != 7 or rotated["largest_down_proj"][1]["col"] != 11


SMALL_ROTATION = ["exp.data.probe.windows=2", "exp.data.probe.seqlen=32", "exp.calibration.windows=2",
                  "exp.calibration.seqlen=32", "~exp.settings.w8a8", "~exp.settings.w4a8", "~exp.methods.smoothquant",
                  "~exp.methods.sw_aware"]


def test_rotation_study_end_to_end_on_a_tiny_model(tmp_path):
    from conftest import SMALL_EVAL

    from outlierlab.runner import execute
    cfg = compose_cfg(["+exp=rotation", "model=tiny_gemma", f"paths.results_dir={tmp_path}", "logger=none",
                       *SMALL_EVAL, *SMALL_ROTATION])
    record = execute(cfg)
    assert record["weights_restored"]
    protocol = record["quant_protocol"]
    assert protocol["weights"] == "per_channel" and protocol["activations"] == "per_token"
    rows = {row["variant"]: row for row in record["table"]["rows"]}
    assert set(rows) == {"original", "rotated", "w4a4_naive", "w4a4_rotated", "w4a4_rotated_sw_aware", "prune_sw",
                         "prune_largest", "rotated_prune_largest"}
    assert rows["rotated"]["wikitext2"] == pytest.approx(rows["original"]["wikitext2"], rel=1e-4)
    assert rows["w4a4_naive"]["wikitext2"] != rows["original"]["wikitext2"]
    original, rotated = record["atlas"]["original"]["ma_token"], record["atlas"]["rotated"]["ma_token"]
    assert rotated["norm"] == pytest.approx(original["norm"], rel=1e-4)  # the MA token's norm survives rotation
    assert record["table"]["reference"]["values"]["w4a4_rotated"]["wikitext2"] == 6.4


@pytest.mark.parametrize("overrides,message", [
    (["model=tiny_gpt2"], "rotation on model tiny_gpt2: family gpt2 uses LayerNorm"),
    (["model=tiny_opt"], "family opt uses LayerNorm"),
    (["model=tiny_gpt_neox"], "uses LayerNorm"),
    (["model=tiny_qwen3_moe"], "is a mixture of experts"),
    (["model=tiny_llama", "exp.settings.w4a4=[4,9]"], r"exp.settings.w4a4=\[4, 9\] must be"),
    (["model=tiny_llama", "exp.settings.w4a4=[1,4]"], r"exp.settings.w4a4=\[1, 4\] must be"),
    (["model=tiny_llama", "exp.interventions.rotate.seed=1.5"], "seed=1.5 must be an integer"),
    (["model=tiny_llama", "exp.interventions.rotate.seed=abc"], "seed='abc' must be an integer"),
])
def test_bad_rotation_config_is_one_line_before_loading(overrides, message):
    from outlierlab.errors import ConfigError
    from outlierlab.runner import preflight
    with pytest.raises(ConfigError, match=message):
        preflight(compose_cfg(["+exp=rotation", *overrides]))


def test_a_refused_family_exits_2_with_one_line(tmp_path):
    from conftest import ROOT
    from test_end_to_end import run_cli
    done = run_cli(["+exp=rotation", "model=tiny_gpt2"], tmp_path, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "LayerNorm" in done.stderr and not (tmp_path / "results").exists()


@pytest.mark.requires("data")
def test_zeroshot_scores_the_rotated_model_as_edited(tmp_path, monkeypatch):
    """lm-eval's HFLM calls model.tie_weights() when it wraps a model, which would tie the rotated model's own head
    back to the (rotated) embedding: zero-shot must score the model as the edit left it, so every request's
    log-likelihood of the rotated model equals the original's (the function is the same)."""
    from conftest import DATA_DIR
    from lm_eval.models.huggingface import HFLM
    from omegaconf import OmegaConf

    from outlierlab.evals.zeroshot import build_tasks, evaluate_zeroshot
    loaded = _load(SUPPORTED["tiny_llama"] + ["+model.tiny.tie_word_embeddings=true"], tmp_path)
    assert loaded.model.get_output_embeddings().weight is loaded.sites.module("embed").weight  # tied
    suite = OmegaConf.create({"tasks": ["arc_easy"], "limit": 4, "batch_size": 4})
    tasks = build_tasks(suite.tasks, str(DATA_DIR), tmp_path / "zeroshot")
    scores, score = [], HFLM._loglikelihood_tokens
    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", lambda self, *a, **k: scores.extend(score(self, *a, **k))
                        or scores[-len(a[0]):])
    evaluate_zeroshot(loaded, suite, tasks)
    original, scores[:] = list(scores), []
    with EditSession(loaded) as session:
        session.apply([Rotate(kind="hadamard", seed=0)])
        evaluate_zeroshot(loaded, suite, tasks)
        assert loaded.model.get_output_embeddings().weight is not loaded.sites.module("embed").weight  # still untied
    assert len(scores) == len(original) == 16
    for (rotated, _), (plain, _) in zip(scores, original):
        assert rotated == pytest.approx(plain, abs=1e-3)
