"""Sweeps: what identifies a cell, skipping finished cells, the sweep summary, and SLURM jobs sized to the model.

A *cell* is one run of a multirun (`python run.py -m ...`). Its identity is what determines its result: the exp,
the model's source identity (the GGUF file's sha256, the hub commit, a local directory's config and weight files,
a tiny model's config) and the resolved config minus what only says where things are (`IGNORED`). Every result
records it (`record["cell"]`); a run whose result file already holds the same identity is skipped before any
weights load, unless `overwrite=true`.

In a multirun, each cell writes `cell.json` (done / skipped / failed with the reason) into its Hydra job folder;
`SweepSummary` (a Hydra callback) gathers them at the end of the multirun, prints one line per cell and writes
`sweep_summary.{json,md}` into the sweep folder and `<results_dir>/sweeps/`. `SlurmLauncher` (hydra/launcher=slurm)
is Hydra's submitit launcher that sizes each cell's job from its own config (a model sweep submits one job array
per distinct size), reads job states from squeue/scontrol on clusters without accounting, and records cells that
SLURM ended (scancel, time limit, node failure) as failed instead of waiting forever.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import subprocess
import sys
import time
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


# ---------------------------------------------------------------------------------------------- SLURM job sizes

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}


def parameter_count(model_cfg) -> int:
    """Parameters of the model, counted on the meta device from its config alone (no weights are read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from outlierlab.models.load import model_config
    from outlierlab.models.source import resolve_source
    config = model_config(model_cfg, resolve_source(model_cfg))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.get("trust_remote_code", False))
    return sum(p.numel() for p in model.parameters())


def job_size(model_cfg, resources, gpus: int | None = None) -> dict:
    """{"gpus", "cpus", "mem_gb"} for one cell, from its model's size and dtype (conf/hydra/launcher/slurm.yaml);
    `gpus` given: the CPUs follow that GPU count."""
    params = resources.get("params_b")
    params = float(params) * 1e9 if params is not None else parameter_count(model_cfg)
    source = str(model_cfg.source)
    # A GGUF file is dequantized to float32 in host memory whatever model.dtype says.
    gguf = source.endswith(".gguf") or source.startswith("pkg://")
    weights_gb = params * max(BYTES.get(str(model_cfg.dtype), 4), 4 if gguf else 0) / 2**30
    if gpus is None:
        gpus = 0
        if str(model_cfg.get("device", "auto")) != "cpu":
            gpus = max(1, math.ceil(weights_gb * resources.gpu_overhead / resources.gpu_mem_gb))
    cpus = gpus * int(resources.cpus_per_gpu) if gpus else int(min(resources.max_cpus, max(1, math.ceil(weights_gb))))
    return {"gpus": gpus, "cpus": cpus,
            "mem_gb": int(math.ceil(weights_gb * resources.host_mem_factor + resources.host_mem_base_gb))}


AUTO = {"gpus_per_node": "gpus", "cpus_per_task": "cpus", "mem_gb": "mem_gb"}


def sized_params(cell: DictConfig) -> dict:
    """The submitit parameters of one cell: its hydra.launcher keys, the `auto` ones sized from its model."""
    params = OmegaConf.to_container(cell.hydra.launcher, resolve=True)
    params.pop("_target_", None)
    resources = OmegaConf.create(params.pop("resources", None) or {})
    auto = [key for key in AUTO if params.get(key) == "auto"]
    if auto:
        gpus = params.get("gpus_per_node")
        size = job_size(cell.model, resources, None if gpus == "auto" else int(gpus or 0))
        for key in auto:
            params[key] = size[AUTO[key]]
    return params


# ----------------------------------------------------------------------------------- SLURM without accounting

def _install_watcher() -> None:
    """Job states from sacct when the cluster keeps accounting, else from squeue (a finished job stays listed for
    MinJobAge); a job squeue no longer lists is over. submitit alone would retry sacct forever, warning each time
    ("Bypassing sacct error"), and never see a cancelled job end."""
    from submitit.slurm import slurm

    if isinstance(slurm.SlurmJob.watcher, _SqueueWatcher):
        return

    class SqueueWatcher(_SqueueWatcher, slurm.SlurmInfoWatcher):
        pass

    slurm.SlurmJob.watcher = SqueueWatcher(delay_s=slurm.SlurmJob.watcher._delay_s)


class _SqueueWatcher:
    accounting: bool | None = None

    def update(self) -> None:
        if self.accounting is None:
            try:
                probe = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=60)
                self.accounting, why = probe.returncode == 0, probe.stderr.strip() or f"exit {probe.returncode}"
            except (OSError, subprocess.SubprocessError) as error:
                self.accounting, why = False, str(error)
            if not self.accounting:
                log.info("sacct unavailable (%s): job states from squeue", why)
        if self.accounting:
            return super().update()
        pending = self._registered - self._finished
        if not pending:
            return
        self._num_calls += 1
        try:
            listed = subprocess.run(["squeue", "--me", "-h", "-r", "-t", "all", "-o", "%i|%T|%N"],
                                    capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as error:
            log.debug("squeue failed: %s", error)
            self._last_status_check = time.time()
            return
        info = self.read_info("JobID|State|NodeList\n" + listed)
        for job_id in pending:
            info.setdefault(job_id, {"JobID": job_id, "State": "NOT_LISTED", "NodeList": ""})
        self._info_dict.update(info)
        self._last_status_check = time.time()
        for job_id in pending:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)


try:
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        SlurmLauncher as _SubmititSlurm,
    )
except ImportError:  # pragma: no cover - the launcher plugin is a dependency
    _SubmititSlurm = object


class SlurmLauncher(_SubmititSlurm):
    """hydra/launcher=slurm: Hydra's submitit SLURM launcher, with

    - every cell checked (runner.preflight) before anything is queued; finished cells skipped without a job;
    - each cell's job sized from that cell's model (the `auto` keys): cells of equal size
      share one job array;
    - job states read without sacct when the cluster has no accounting;
    - a cell SLURM ended (scancel, time limit, node failure) recorded as failed with its state, the other cells
      still collected, and the sweep summary printed before the multirun reports the failure."""

    def __init__(self, resources=None, **params) -> None:
        super().__init__(**params)  # `resources` sizes the `auto` keys per cell (sized_params), not for submitit

    def launch(self, job_overrides, initial_job_idx):
        import submitit
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.singleton import Singleton
        from hydra.core.utils import JobReturn, JobStatus, filter_overrides

        from outlierlab.runner import USER_ERRORS, preflight

        _install_watcher()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        groups: dict[str, list] = {}
        outputs: dict[Path, str] = {}
        skipped: dict[int, JobReturn] = {}
        for offset, overrides in enumerate(job_overrides):
            number, line = initial_job_idx + offset, " ".join(filter_overrides(overrides))
            (sweep_dir / str(number) / CELL_FILE).unlink(missing_ok=True)  # an earlier launch into this folder
            cell = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            # Every cell's input is checked here, before anything is queued (the job checks again), with the
            # cell's own Hydra config current (preflight reads the command's overrides from it).
            primary = HydraConfig.instance().cfg
            HydraConfig.instance().set_config(cell)
            try:
                plan = preflight(cell)
                identity = cell_identity(cell, plan.source)
                params = None if finished(cell, plan.output, identity) else sized_params(cell)
            except USER_ERRORS as error:
                print(f"error: {error} (cell #{number}: {line})", file=sys.stderr)
                raise SystemExit(2) from None
            finally:
                HydraConfig.instance().cfg = primary
            if plan.output in outputs:
                print(f"error: run_tag={cell.run_tag}: cells '{outputs[plan.output]}' and '{line}' both write "
                      f"{plan.output}; make run_tag name the swept key, e.g. run_tag='{cell.run_tag}_${{seed}}'",
                      file=sys.stderr)
                raise SystemExit(2)
            outputs[plan.output] = line
            if params is None:
                log.info(f"\t#{number} : {line}  skipped: finished ({plan.output})")
                note_cell("skipped", result=plan.output, key=identity["key"], job_dir=sweep_dir / str(number),
                          number=number, overrides=list(overrides))
                skipped[number] = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
                continue
            log.info(f"\t#{number} : {line}  (gpus {params.get('gpus_per_node')}, cpus {params.get('cpus_per_task')}, "
                     f"mem {params.get('mem_gb')} GB)")
            groups.setdefault(json.dumps(params, sort_keys=True), []).append(
                (list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state()))
        submitted = []
        for key, cells in groups.items():
            params = json.loads(key)
            folder = params.pop("submitit_folder")
            init = {"folder": folder}
            if "max_num_timeout" in params:
                init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
            if not params.get("gpus_per_node"):  # no --gpus-per-node=0: clusters without GPU gres reject it
                params["gpus_per_node"] = None
            executor = submitit.AutoExecutor(cluster="slurm", **init)
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
            jobs = executor.map_array(self, *zip(*cells))
            submitted += [(cell[2], cell[0], job) for cell, job in zip(cells, jobs)]
        if submitted:
            log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir} "
                     f"(jobs {', '.join(job.job_id for _, _, job in submitted)})")
        returns, failed = dict(skipped), 0
        for number, overrides, job in submitted:
            try:
                returns[number] = job.results()[0]
            except Exception as error:  # the job ended without a result: scancel, time limit, node failure
                state = job.state
                reason = f"SLURM job {job.job_id} {state}" if state not in ("UNKNOWN", "NOT_LISTED") else _reason(error)
                job_dir = sweep_dir / str(number)
                if not (job_dir / CELL_FILE).is_file() or read_result(job_dir / CELL_FILE)["status"] != "failed":
                    note_cell("failed", reason=reason, job_dir=job_dir, number=number, overrides=overrides)
                ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
                ret._return_value = RuntimeError(reason)
                returns[number] = ret
            if returns[number].status == JobStatus.FAILED:
                failed += 1
        if failed:
            summarize(sweep_dir, _results_dir(self.config))
            log.error("%d of %d cells failed; the same command again runs only the cells not done", failed,
                      len(returns))
            raise SystemExit(1)
        return [returns[number] for number in sorted(returns)]
