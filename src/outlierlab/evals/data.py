"""Evaluation corpora: a local data directory when it has the files, else the Hugging Face hub via `datasets`.

Each corpus returns a `Corpus`: the documents as the paper protocols define them, plus provenance (where they came
from and sha256 of the source files) so that every result can say exactly which text it measured.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from outlierlab.errors import DataError  # noqa: F401 (re-exported)
from outlierlab.models.source import file_sha256


def data_directory(value) -> str | None:
    """paths.data_dir normalised, once (runner.preflight; recipes read plan.data_dir): None reads the hub."""
    return None if value in (None, "", "null") else str(Path(str(value)).expanduser())


@dataclass
class Corpus:
    name: str
    split: str
    documents: list[str]
    provenance: dict = field(default_factory=dict)

    def joined(self, separator: str) -> tuple[str, str]:
        """The documents joined by `separator`, and the sha256 of that exact text."""
        text = separator.join(self.documents)
        return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def _wikitext2_files(data_dir: Path, split: str) -> list[Path]:
    # The raw files name the Hugging Face "validation" split "valid".
    return [data_dir / "wikitext-2-raw-v1" / f"wiki.{ {'validation': 'valid'}.get(split, split)}.raw"]


def _wikitext2_local(data_dir: Path, split: str) -> tuple[list[str], list[Path]]:
    path, = _wikitext2_files(data_dir, split)
    with open(path, encoding="utf-8") as handle:
        # The Hugging Face rows of wikitext-2-raw-v1: one per line, blank lines as "" (see the data README).
        return [line if line.strip() else "" for line in handle.readlines()], [path]


def _wikitext2_hub(split: str) -> list[str]:
    from datasets import load_dataset
    return list(load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"])


def _c4_files(data_dir: Path, split: str) -> list[Path]:
    if split != "validation":
        raise DataError(f"the local C4 sample has only the validation split, not '{split}'")
    return sorted((data_dir / "c4").glob("*.jsonl.gz")) or [data_dir / "c4" / "*.jsonl.gz"]


def _c4_local(data_dir: Path, split: str) -> tuple[list[str], list[Path]]:
    paths = _c4_files(data_dir, split)
    documents = []
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            documents.extend(json.loads(line)["text"] for line in handle if line.strip())
    return documents, paths


def _c4_hub(split: str) -> list[str]:
    from datasets import load_dataset
    # GPTQ's protocol reads the first validation shard of allenai/c4 "en".
    files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    return list(load_dataset("allenai/c4", data_files=files, split=split)["text"])


def _wikipedia_files(data_dir: Path, split: str) -> list[Path]:
    if split != "train":
        raise DataError(f"the local Wikipedia sample has only the train split, not '{split}'")
    return [data_dir / "wikipedia-en-sample" / "enwiki_pages_sample.jsonl.gz"]


def _wikipedia_local(data_dir: Path, split: str) -> tuple[list[str], list[Path]]:
    paths = _wikipedia_files(data_dir, split)
    with gzip.open(paths[0], "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()], paths


def _wikipedia_hub(split: str) -> list[str]:
    from datasets import load_dataset
    # Online stand-in for the local sample: the first 10,000 articles of the 2023-11-01 English dump.
    return list(load_dataset("wikimedia/wikipedia", "20231101.en", split=f"{split}[:10000]")["text"])


# name -> (expected local files, local reader, hub reader, hub dataset)
CORPORA = {
    "wikitext2": (_wikitext2_files, _wikitext2_local, _wikitext2_hub, "Salesforce/wikitext wikitext-2-raw-v1"),
    "c4": (_c4_files, _c4_local, _c4_hub, "allenai/c4 en validation shard 0"),
    # A pretraining-style corpus for activation statistics (the MA paper samples RedPajama; not an eval set).
    "wikipedia": (_wikipedia_files, _wikipedia_local, _wikipedia_hub, "wikimedia/wikipedia 20231101.en"),
}


def check_corpus(name: str, split: str, data_dir: str | None) -> None:
    """Cheap pre-flight check (before any weights load): the corpus is known and its local files exist, or no
    local data directory is configured (then the hub is used)."""
    if name not in CORPORA:
        raise DataError(f"unknown dataset '{name}' (available: {', '.join(CORPORA)})")
    if data_dir is None:
        return
    if not Path(data_dir).is_dir():
        raise DataError(f"paths.data_dir={data_dir} does not exist (set OUTLIERLAB_DATA_DIR or paths.data_dir, "
                        f"or paths.data_dir=null to read from the Hugging Face hub)")
    files, _, _, _ = CORPORA[name]
    for path in files(Path(data_dir), split):
        if not path.is_file():
            raise DataError(f"dataset '{name}' split '{split}': data file {path} not found (paths.data_dir={data_dir})")


def load_corpus(name: str, split: str, data_dir: str | None) -> Corpus:
    check_corpus(name, split, data_dir)
    _, local, hub, hub_name = CORPORA[name]
    if data_dir is not None:
        documents, paths = local(Path(data_dir), split)
        provenance = {"origin": "local", "files": {str(p): file_sha256(p) for p in paths}}
    else:
        try:
            documents = hub(split)
        except Exception as error:
            raise DataError(f"dataset '{name}': could not load {hub_name} from the hub ({type(error).__name__}); "
                            f"set paths.data_dir to a local copy") from error
        provenance = {"origin": "hub", "dataset": hub_name}
    return Corpus(name=name, split=split, documents=documents, provenance=provenance)
