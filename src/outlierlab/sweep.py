"""Sweeps: what identifies a cell, skipping finished cells, the sweep summary, and SLURM jobs sized to the model.

A *cell* is one run of a multirun (`python run.py -m ...`). Its identity is what determines its result: the exp,
the model's source identity (the GGUF file's sha256, the hub commit, a local directory's config and weight files,
a tiny model's config) and the resolved config minus what only says where things are (`IGNORED`). Every result
records it (`record["cell"]`); a run whose result file already holds the same identity is skipped before any
weights load, unless `overwrite=true`.

In a multirun, each cell writes `cell.json` (done / skipped / failed with the reason) into its Hydra job folder;
`SweepSummary` (a Hydra callback) gathers them at the end of the multirun, prints one line per cell and writes
`sweep_summary.{json,md}` into the sweep folder and `<results_dir>/sweeps/`. The SLURM launcher that runs a sweep's
cells as jobs is `outlierlab.launcher` (above the runner: it preflights each cell; this module stays below it).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from outlierlab.results import read_result, write_result

log = logging.getLogger(__name__)

# Config keys that say where things are or how they are reported, not what the result is.
IGNORED = ("paths.results_dir", "paths.cache_dir", "paths.data_dir", "logger", "overwrite", "allow_dirty")
CELL_FILE = "cell.json"


# ------------------------------------------------------------------------------------------------- cell identity

def _files_identity(directory: Path) -> dict:
    """A local HF directory: config.json's sha256 and the names and sizes of its weight files (not their content:
    hashing 100 GB on every resume would cost more than it saves; the result's weights_sha256 is the content)."""
    config = hashlib.sha256((directory / "config.json").read_bytes()).hexdigest()
    weights = sorted((p.name, p.stat().st_size) for p in directory.iterdir()
                     if p.suffix in (".safetensors", ".bin", ".pt", ".gguf") or p.name.endswith(".index.json"))
    return {"config_sha256": config, "weight_files": weights}


def source_identity(model_cfg, source) -> dict:
    """What names the weights, cheaply and before loading them."""
    identity = {"source": str(model_cfg.source), "kind": source.kind, "revision": model_cfg.get("revision")}
    if source.kind == "tiny":
        identity["tiny"] = OmegaConf.to_container(model_cfg.tiny, resolve=True)
    elif source.kind == "gguf":
        from outlierlab.models.source import file_sha256
        identity["file_sha256"] = file_sha256(source.gguf_path)
    elif source.kind == "local":
        identity.update(_files_identity(Path(source.location)))
    elif source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(source.location, "config.json", revision=model_cfg.get("revision"))
        if isinstance(cached, str):  # .../snapshots/<commit>/config.json
            identity["commit"] = Path(cached).parent.name
    return identity


def _drop(container: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        container = container.get(key)
        if not isinstance(container, dict):
            return
    container.pop(last, None)


def cell_identity(cfg: DictConfig, source) -> dict:
    # Key by key: a sweep cell composed in the launcher still carries Hydra's own node, partly unset until it runs.
    config = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
              for key in cfg if key != "hydra"}
    for dotted in IGNORED:
        _drop(config, dotted)
    identity = {"exp": cfg.exp.name,
                "model": source_identity(cfg.model, source) if source is not None else {"name": cfg.model.name}}
    key = hashlib.sha256(json.dumps({**identity, "config": config}, sort_keys=True, default=str).encode())
    # The record keeps the key and the weights' identity; the config it hashes is the record's own "config" less
    # the IGNORED keys.
    return {"key": key.hexdigest(), **identity, "ignored": list(IGNORED)}


def finished(cfg: DictConfig, output: Path, cell: dict) -> bool:
    """True when this is a sweep cell (-m), `output` holds a complete result of this very cell and overwrite is not
    set. A single run always runs (code is not part of a cell's identity: after changing a recipe, run it again
    or sweep with overwrite=true)."""
    if _mode() != "MULTIRUN" or cfg.get("overwrite", False) or not output.is_file():
        return False
    try:
        previous = read_result(output)
    except (OSError, ValueError):  # unreadable: run again (write_result never leaves a partial file)
        return False
    recorded = (previous.get("cell") or {}).get("key")
    if recorded != cell["key"]:
        print(f"rerun: {output} was made by another cell ({'no key' if recorded is None else recorded[:12]}); "
              f"this one is {cell['key'][:12]}")
        return False
    return True


def skip(cfg: DictConfig, output: Path, cell: dict) -> dict:
    """A finished cell: say so, record it, return its result."""
    print(f"skipped: {cfg.exp.name} on {cfg.model.name} is finished: {output} (cell {cell['key'][:12]}; "
          f"overwrite=true runs it again)", flush=True)
    note_cell("skipped", result=output, key=cell["key"])
    return read_result(output)


# ---------------------------------------------------------------------------------------------- per-cell status

def _mode() -> str | None:
    """RUN or MULTIRUN under Hydra, else None."""
    from hydra.core.hydra_config import HydraConfig
    try:
        mode = HydraConfig.get().mode
    except ValueError:
        return None
    return getattr(mode, "name", None if mode is None else str(mode))


def _job_dir() -> Path | None:
    """This cell's Hydra job folder in a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    return Path(HydraConfig.get().runtime.output_dir) if _mode() == "MULTIRUN" else None


def note_cell(status: str, *, result: Path | str | None = None, key: str | None = None, reason: str | None = None,
              job_dir: Path | None = None, number: int | None = None, overrides: list | None = None) -> None:
    """Record a cell's outcome in its job folder: this job's (multiruns only), or the one given."""
    if job_dir is None:
        from hydra.core.hydra_config import HydraConfig
        job_dir = _job_dir()
        if job_dir is None:
            return
        overrides, number = list(HydraConfig.get().overrides.task), HydraConfig.get().job.num
    entry = {"num": number, "overrides": overrides, "status": status, "result": str(result) if result else None,
             "cell": key, "reason": reason, "at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    write_result(entry, job_dir / CELL_FILE)


def _reason(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".strip().rstrip(":")


def summarize(sweep_dir: Path, results_dir: Path | None) -> dict:
    """Gather every cell.json of a sweep folder; print the summary; write it beside the results."""
    cells = {}
    for path in sorted(Path(sweep_dir).glob(f"*/{CELL_FILE}")):
        try:
            cells[path.parent.name] = read_result(path)
        except (OSError, ValueError):
            continue
    ordered = [cells[k] for k in sorted(cells, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else k))]
    counts = {status: sum(c["status"] == status for c in ordered) for status in ("done", "skipped", "failed")}
    summary = {"sweep_dir": str(sweep_dir), "counts": counts, "cells": ordered,
               "at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    lines = [f"sweep summary: {len(ordered)} cell{'' if len(ordered) == 1 else 's'}: {counts['done']} done, "
             f"{counts['skipped']} skipped, {counts['failed']} failed ({sweep_dir})"]
    for cell in ordered:
        detail = cell.get("reason") if cell["status"] == "failed" else cell.get("result")
        lines.append(f"  #{cell.get('num')} {cell['status']:<7} {' '.join(cell.get('overrides') or [])}"
                     + (f"  ->  {detail}" if detail else ""))
    text = "\n".join(lines)
    print(text, flush=True)
    targets = [Path(sweep_dir)]
    if results_dir is not None:
        targets.append(Path(results_dir) / "sweeps" / "_".join(Path(sweep_dir).parts[-2:]))
    for target in targets:
        write_result(summary, target / "sweep_summary.json")
        (target / "sweep_summary.md").write_text(text + "\n")
    return summary


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml hydra.callbacks): a failed cell's reason into its cell.json; the summary at
    the end of the multirun."""

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        if job_return.status == JobStatus.FAILED:
            note_cell("failed", reason=_reason(job_return._return_value))  # .return_value would raise it

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        summarize(Path(config.hydra.sweep.dir), _results_dir(config))


def _results_dir(config: DictConfig) -> Path | None:
    try:
        return Path(str(config.paths.results_dir))
    except Exception:
        return None
