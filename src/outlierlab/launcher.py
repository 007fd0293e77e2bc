"""hydra/launcher=slurm: Hydra's submitit launcher that sizes each cell's job from its own config (a model sweep
submits one job array per distinct size), reads job states from squeue/scontrol on clusters without accounting, and
records cells that SLURM ended (scancel, time limit, node failure) as failed instead of waiting forever.

It sits above the runner (every cell is preflighted before anything is queued) and uses the sweep's cell identity,
skip and summary (`outlierlab.sweep`), which stay below the runner: no import cycle.
"""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from outlierlab.results import read_result
from outlierlab.runner import USER_ERRORS, preflight
from outlierlab.sweep import CELL_FILE, _reason, _results_dir, cell_identity, finished, note_cell, summarize

log = logging.getLogger(__name__)


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
        """Check every cell, skip the finished ones, submit the rest as SLURM job arrays (one per resource shape),
        wait, and return every cell's result in cell order; exit 1 when a cell failed."""
        _install_watcher()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        groups, skipped = self._plan(job_overrides, initial_job_idx, sweep_dir)
        returns, failed = self._collect(self._submit(groups, sweep_dir), skipped, sweep_dir)
        if failed:
            summarize(sweep_dir, _results_dir(self.config))
            log.error("%d of %d cells failed; the same command again runs only the cells not done", failed,
                      len(returns))
            raise SystemExit(1)
        return [returns[number] for number in sorted(returns)]

    def _plan(self, job_overrides, initial_job_idx, sweep_dir: Path) -> tuple[dict[str, list], dict]:
        """Every cell checked before anything is queued (exit 2 on bad input): the cells to run grouped by their
        resource parameters, and the finished ones as skipped JobReturns."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.singleton import Singleton
        from hydra.core.utils import JobReturn, JobStatus, filter_overrides

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
        return groups, skipped

    def _submit(self, groups: dict[str, list], sweep_dir: Path) -> list[tuple]:
        """One submitit job array per group: [(cell number, overrides, job)]."""
        import submitit

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
        return submitted

    @staticmethod
    def _collect(submitted: list[tuple], skipped: dict, sweep_dir: Path) -> tuple[dict, int]:
        """Wait for every job: {cell number: JobReturn} (a job that ended without a result is a failed cell, noted
        in its folder with SLURM's reason) and how many failed."""
        from hydra.core.utils import JobReturn, JobStatus

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
        return returns, failed
