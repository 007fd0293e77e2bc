"""Training data for small-model pretraining: documents -> a BPE tokenizer trained on them -> token streams.

The default corpus is the local English Wikipedia sample (`wikipedia-en-sample/` in paths.data_dir); any JSON-lines
file (optionally gzipped) with a text field, or a Hugging Face dataset (`data.hub`), can stand in by config.
The held-out validation documents are the last `val_documents` of the corpus, whatever `max_chars` takes for
training, so every size preset is validated on the same text. Tokenizer and token streams are cached under
`paths.cache_dir/pretrain/<key>`, keyed by the corpus file's sha256 and every data setting.

A token shard (`write_shard`: the tokenizer + both streams, lzma-compressed, with the provenance of the corpus it was
cut from) stands in for the corpus when `data.shard` names one: a machine without the corpus (a lent GPU, which
receives only the working tree) trains on exactly the tokens prepared here (outlierlab.gpu_check --prepare).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from outlierlab.evals.data import DataError
from outlierlab.models.source import file_sha256

END_OF_TEXT = "<|endoftext|>"  # separates documents in the token stream (GPT-2 style)
SINK = "<|sink|>"  # the sink-token variant starts every window with it; other variants never see it


@dataclass
class TokenStreams:
    train: torch.Tensor  # 1-D int64 token ids, documents joined by END_OF_TEXT
    val: torch.Tensor
    tokenizer: PreTrainedTokenizerFast
    meta: dict


def corpus_path(data_cfg, data_dir: str | None) -> Path | None:
    """The local corpus file, or None when the corpus comes from the hub."""
    if data_cfg.get("hub"):
        return None
    path = Path(str(data_cfg.path)).expanduser()
    if not path.is_absolute():
        if data_dir is None:
            raise DataError(f"train.data.path={data_cfg.path} is relative but paths.data_dir is null")
        path = Path(data_dir) / path
    return path


def check_data(data_cfg, data_dir: str | None) -> None:
    """Pre-flight: the token shard or the corpus file exists (nothing is read)."""
    if data_cfg.get("shard"):
        if not (Path(str(data_cfg.shard)).expanduser() / SHARD_TOKENS).is_file():
            raise DataError(f"train.size.data.shard: no token shard in {data_cfg.shard} (python -m "
                            f"outlierlab.gpu_check --prepare writes one)")
        return
    path = corpus_path(data_cfg, data_dir)
    if path is not None and not path.is_file():
        raise DataError(f"train.data.path: corpus file {path} not found (paths.data_dir={data_dir})")


def _read_documents(data_cfg, data_dir) -> tuple[list[str], dict]:
    path = corpus_path(data_cfg, data_dir)
    field = data_cfg.text_field
    if path is None:
        from datasets import load_dataset
        hub = data_cfg.hub
        rows = load_dataset(hub.name, hub.get("config"), split=hub.split)
        return [row[field] for row in rows], {"origin": "hub", "dataset": dict(hub)}
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        documents = [json.loads(line)[field] for line in handle if line.strip()]
    return documents, {"origin": "local", "file": str(path), "sha256": file_sha256(path)}


def split_documents(documents: list[str], val_documents: int, max_chars: int | None) -> tuple[list[str], list[str]]:
    """Validation = the last `val_documents`; training = the others, in order, up to `max_chars` characters."""
    if val_documents >= len(documents):
        raise DataError(f"train.data.val_documents={val_documents} leaves no training documents "
                        f"(the corpus has {len(documents)})")
    train, total = [], 0
    for document in documents[:-val_documents]:
        if max_chars is not None and total >= max_chars:
            break
        train.append(document)
        total += len(document)
    return train, documents[-val_documents:]


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenisation) with END_OF_TEXT and SINK as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT, SINK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT)
    return fast


def encode_stream(tokenizer: PreTrainedTokenizerFast, documents: list[str], desc: str,
                  chunk: int = 256) -> torch.Tensor:
    """All documents as one stream, each followed by END_OF_TEXT."""
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    pieces = []
    for start in tqdm(range(0, len(documents), chunk), desc=f"tokenize {desc}", leave=False):
        for encoding in tokenizer.backend_tokenizer.encode_batch(documents[start:start + chunk],
                                                                 add_special_tokens=False):
            pieces.append(torch.tensor([*encoding.ids, eot], dtype=torch.int32))
    return torch.cat(pieces).long()


def _cache_key(data_cfg, provenance: dict) -> str:
    settings = {"corpus": provenance.get("sha256") or provenance.get("dataset"), "text_field": data_cfg.text_field,
                "val_documents": data_cfg.val_documents, "max_chars": data_cfg.max_chars,
                "vocab_size": data_cfg.vocab_size, "version": 1}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepare(data_cfg, data_dir: str | None, cache_dir: str | Path) -> TokenStreams:
    """Tokenizer + train/val token streams, built once per data setting and cached (or read from `data.shard`)."""
    if data_cfg.get("shard"):
        return read_shard(data_cfg.shard)
    documents, provenance = _read_documents(data_cfg, data_dir)
    key = _cache_key(data_cfg, provenance)
    target = Path(cache_dir).expanduser() / "pretrain" / key
    if not (target / "streams.pt").is_file():
        train_docs, val_docs = split_documents(documents, data_cfg.val_documents, data_cfg.max_chars)
        tokenizer = train_tokenizer(train_docs, data_cfg.vocab_size)
        streams = {"train": encode_stream(tokenizer, train_docs, "train"),
                   "val": encode_stream(tokenizer, val_docs, "val"),
                   "documents": {"train": len(train_docs), "val": len(val_docs)},
                   "chars": {"train": sum(map(len, train_docs)), "val": sum(map(len, val_docs))}}
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
            tokenizer.save_pretrained(staging / "tokenizer")
            torch.save(streams, staging / "streams.pt")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    streams = torch.load(target / "streams.pt")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(target / "tokenizer")
    meta = {"data": provenance, "cache": str(target), "vocab_size": len(tokenizer),
            "documents": streams["documents"], "chars": streams["chars"],
            "tokens": {"train": len(streams["train"]), "val": len(streams["val"])}}
    return TokenStreams(streams["train"], streams["val"], tokenizer, meta)


SHARD_TOKENS = "tokens.pt.xz"


def write_shard(streams: TokenStreams, directory: str | Path) -> dict:
    """The streams as a token shard: tokenizer/ + tokens.pt.xz (int16 ids when the vocabulary allows, lzma) +
    shard.json (the corpus provenance and sizes). Returns shard.json's content."""
    directory = Path(directory)
    small = len(streams.tokenizer) <= torch.iinfo(torch.int16).max
    dtype = torch.int16 if small else torch.int32
    buffer = io.BytesIO()
    torch.save({"train": streams.train.to(dtype), "val": streams.val.to(dtype)}, buffer)
    directory.mkdir(parents=True, exist_ok=True)
    streams.tokenizer.save_pretrained(directory / "tokenizer")
    (directory / SHARD_TOKENS).write_bytes(lzma.compress(buffer.getvalue(), preset=6))
    meta = {key: value for key, value in streams.meta.items() if key != "cache"}
    meta["shard_bytes"] = (directory / SHARD_TOKENS).stat().st_size
    (directory / "shard.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_shard(directory: str | Path) -> TokenStreams:
    directory = Path(str(directory)).expanduser()
    tokens = torch.load(io.BytesIO(lzma.decompress((directory / SHARD_TOKENS).read_bytes())))
    meta = json.loads((directory / "shard.json").read_text())
    meta["data"] = {"origin": "shard", "shard": str(directory), "sha256": file_sha256(directory / SHARD_TOKENS),
                    "cut_from": meta.get("data")}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory / "tokenizer")
    return TokenStreams(tokens["train"].long(), tokens["val"].long(), tokenizer, meta)


def with_sink(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The sink variant's tokenizer: same vocabulary, BOS = the sink token (so BOS policy `prepend` adds it)."""
    copy = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token=SINK,
                                   eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)
    return copy


def sample_batch(stream: torch.Tensor, batch_size: int, seqlen: int, seed: int, step: int,
                 prefix: int | None) -> torch.Tensor:
    """Random windows of the training stream for one step. The generator is seeded from (seed, step), so a resumed
    run draws exactly the batches an uninterrupted one would. `prefix`: a token id put first in every window."""
    body = seqlen - (1 if prefix is not None else 0)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - body, (batch_size,), generator=generator)
    rows = torch.stack([stream[s:s + body] for s in starts.tolist()])
    if prefix is not None:
        rows = torch.cat([torch.full((batch_size, 1), prefix, dtype=rows.dtype), rows], dim=1)
    return rows


def validation_windows(stream: torch.Tensor, seqlen: int, count: int, prefix: int | None) -> torch.Tensor:
    """The first `count` non-overlapping windows of the validation stream (same text for every variant)."""
    body = seqlen - (1 if prefix is not None else 0)
    available = len(stream) // body
    if available < count:
        raise DataError(f"the validation stream has {len(stream)} tokens, fewer than {count} windows of {body}")
    rows = stream[: count * body].view(count, body)
    if prefix is not None:
        rows = torch.cat([torch.full((count, 1), prefix, dtype=rows.dtype), rows], dim=1)
    return rows
