"""Sweeps: cell identity, skipping finished cells before weights load, atomic results, SLURM job sizes, and real
sweeps through hydra/launcher=slurm (tests marked `slurm` submit to the cluster `sinfo` reaches; start one with
`bash scripts/slurm_local.sh start`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONF, DATA_DIR, ROOT, SMALL_EVAL, compose_cfg
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from outlierlab import launcher, runner, sweep
from outlierlab.models.source import resolve_source
from outlierlab.results import read_result, write_result


def environment(**extra) -> dict:
    """The user's environment, this checkout's src/ first (whatever an editable install points at); SLURM jobs
    inherit it (sbatch passes the environment on)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "OUTLIERLAB_DATA_DIR": str(DATA_DIR),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


def identity(overrides):
    cfg = compose_cfg(overrides)
    return sweep.cell_identity(cfg, resolve_source(cfg.model))["key"]


def test_cell_identity_follows_what_determines_the_result():
    base = ["+exp=prune_sw", "model=tiny_llama", *SMALL_EVAL]
    key = identity(base)
    # Where results, caches and data live, the logger and overwrite do not change the result.
    assert identity([*base, "paths.results_dir=/elsewhere", "paths.cache_dir=/c", "logger=none",
                     "overwrite=true"]) == key
    # The exp, the weights, the eval protocol and an intervention's parameter do.
    assert identity([*base, "eval.ppl.wikitext2.seqlen=32"]) != key
    assert identity([*base, "model.tiny.seed=1"]) != key
    assert identity(["+exp=prune_sw", "model=tiny_gpt2", *SMALL_EVAL]) != key
    assert identity([*base, "exp.interventions.prune_non_sw.k=10"]) != key
    assert identity(["+exp=sw_index", "model=tiny_llama", *SMALL_EVAL]) != key


@pytest.fixture
def as_sweep_cell(tmp_path):
    """Compose a config as Hydra gives it to one cell of a multirun (HydraConfig current, mode MULTIRUN)."""
    def cell(overrides):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("config", return_hydra_config=True, overrides=[
                *overrides, "hydra.mode=MULTIRUN", "hydra.job.num=0", f"hydra.runtime.output_dir={tmp_path}/job"])
        HydraConfig.instance().set_config(cfg)
        task = cfg.copy()
        with open_dict(task):
            del task["hydra"]
        return task
    yield cell
    HydraConfig.instance().cfg = None


@pytest.mark.requires("data")
def test_a_finished_cell_is_skipped_before_weights_load(tmp_path, monkeypatch, capsys, as_sweep_cell):
    overrides = ["+exp=prune_sw", "model=tiny_llama", "logger=none", f"paths.results_dir={tmp_path}",
                 f"paths.data_dir={DATA_DIR}", *SMALL_EVAL]
    first = runner.execute(as_sweep_cell(overrides))
    output = tmp_path / "prune_sw" / "tiny_llama" / "quick.json"
    assert read_result(output)["cell"]["key"] == first["cell"]["key"]
    assert read_result(tmp_path / "job" / "cell.json")["status"] == "done"
    written = output.stat().st_mtime_ns

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(runner, "load_model", no_loading)
    again = runner.execute(as_sweep_cell(overrides))
    assert "skipped: prune_sw on tiny_llama is finished" in capsys.readouterr().out
    assert again["table"] == first["table"] and output.stat().st_mtime_ns == written
    assert read_result(tmp_path / "job" / "cell.json")["status"] == "skipped"
    # overwrite=true, or a change that matters, runs the cell (here: reaches load_model); so does a single run.
    for changed in (["overwrite=true"], ["eval.ppl.c4.windows=1"]):
        with pytest.raises(AssertionError, match="weights loaded"):
            runner.execute(as_sweep_cell([*overrides, *changed]))
    HydraConfig.instance().cfg = None
    with pytest.raises(AssertionError, match="weights loaded"):
        runner.execute(compose_cfg(overrides))


WRITER = """
import sys
from pathlib import Path
from outlierlab.results import write_result
write_result({"big": list(range(int(sys.argv[2])))}, Path(sys.argv[1]))
"""


@pytest.mark.parametrize("previous", [True, False], ids=["over_a_result", "first_result"])
def test_a_writer_killed_mid_write_leaves_the_previous_result_or_none(tmp_path, previous):
    path = tmp_path / "exp" / "model" / "quick.json"
    before = {"table": {"rows": [{"variant": "original", "wikitext2": 12.5}]}}
    if previous:
        write_result(before, path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "3000000"], env=environment())
    staging = []
    deadline = time.time() + 120
    while time.time() < deadline and writer.poll() is None:  # kill it once the new JSON is partly on disk
        staging = [p for p in path.parent.glob(f".{path.name}.*.tmp") if p.stat().st_size > 1 << 16]
        if staging:
            break
        time.sleep(0.005)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert staging, "the writer finished before it could be killed mid-write"
    with pytest.raises(json.JSONDecodeError):  # what was on disk when it died was a partial file...
        json.loads(staging[0].read_text())
    if previous:  # ...but the result file is the previous one, whole
        assert read_result(path) == before
    else:
        assert not path.exists()


def compose_launcher(overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def sizes(overrides):
    params = launcher.sized_params(compose_launcher(["+exp=prune_sw", *overrides]))
    return params["gpus_per_node"], params["cpus_per_task"], params["mem_gb"]


def test_slurm_jobs_are_sized_from_the_model():
    # weights of a 6.74B-parameter float16 model: 6.74e9 x 2 / 2^30 = 12.55 GiB
    seven_b = ["model=llama7b", "hydra/launcher=slurm", "hydra.launcher.resources.params_b=6.74"]
    assert sizes(seven_b) == (1, 8, 30)                                       # ceil(12.55 x 2 + 4)
    assert sizes([*seven_b, "model.dtype=float32"]) == (1, 8, 55)             # twice the bytes
    assert sizes([*seven_b, "hydra.launcher.resources.gpu_mem_gb=8"]) == (3, 24, 30)  # ceil(12.55 x 1.3 / 8)
    assert sizes([*seven_b, "hydra.launcher.mem_gb=100", "hydra.launcher.cpus_per_task=2"]) == (1, 2, 100)
    assert sizes([*seven_b, "hydra.launcher.gpus_per_node=2"]) == (2, 16, 30)
    assert sizes(["model=llama7b", "hydra/launcher=slurm_cpu", "hydra.launcher.resources.params_b=6.74"]) == (0, 8, 30)
    # A tiny model (model.device=cpu) counted on the meta device: no GPU, one CPU.
    assert sizes(["model=tiny_llama", "hydra/launcher=slurm"]) == (0, 1, 5)


def cli(args, env=None, **kwargs):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=environment(**(env or {})),
                          capture_output=True, text=True, **kwargs)


@pytest.mark.requires("data")
def test_a_bad_cell_stops_a_slurm_sweep_before_anything_is_queued(tmp_path):
    # Needs no cluster: the launcher checks every cell (runner.preflight) before it submits.
    done = cli(["-m", "+exp=prune_sw", "model=tiny_llama", "eval.ppl.wikitext2.seqlen=64,1", "hydra/launcher=slurm",
                f"hydra.sweep.dir={tmp_path}/sweep", f"paths.results_dir={tmp_path}/results"], timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: eval.ppl.wikitext2.seqlen=1 must be")
    assert "(cell #1: " in done.stderr and not (tmp_path / "sweep" / ".submitit").exists()
    # Two cells writing one result file: one line naming run_tag.
    done = cli(["-m", "+exp=prune_sw", "model=tiny_llama", "seed=0,1", "hydra/launcher=slurm",
                f"hydra.sweep.dir={tmp_path}/sweep2", f"paths.results_dir={tmp_path}/results"], timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: run_tag=quick: cells")


# -------------------------------------------------------------------------------------- real sweeps on SLURM

# 2 models x 2 window lengths; run_tag names the swept length so the four cells write four results.
SWEEP = ["-m", "+exp=prune_sw", "model=tiny_llama,tiny_gpt2", "eval.ppl.wikitext2.seqlen=32,64",
         "run_tag=len${eval.ppl.wikitext2.seqlen}", "eval.ppl.wikitext2.windows=2", "eval.ppl.c4.seqlen=64",
         "eval.ppl.c4.windows=2", "logger=none", "hydra/launcher=slurm"]
CELLS = [("tiny_llama", "len32"), ("tiny_llama", "len64"), ("tiny_gpt2", "len32"), ("tiny_gpt2", "len64")]


def sweep_cli(results: Path, sweep_dir: Path, **kwargs):
    return cli([*SWEEP, f"hydra.sweep.dir={sweep_dir}"], env={"OUTLIERLAB_RESULTS_DIR": str(results)}, **kwargs)


def array_tasks(sweep_dir: Path) -> list[str]:
    """The SLURM job ids of a sweep's cells (<array job>_<task>, or <job> for one cell): submitit's job folders."""
    return sorted(p.parent.name for p in (sweep_dir / ".submitit").glob("*/*_submitted.pkl"))


def results_of(results: Path) -> dict:
    return {(p.parent.name, p.stem): p for p in sorted((results / "prune_sw").glob("*/*.json"))}


def sweep_table(results: Path) -> str:
    done = subprocess.run([sys.executable, "scripts/make_tables.py", "--results", str(results), "--only", "sweep"],
                          cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return (results / "tables" / "sweep_prune_sw.md").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("uninterrupted")
    started = time.time()
    done = sweep_cli(base / "results", base / "sweep", timeout=900)
    return base, done, time.time() - started


@pytest.mark.slurm
@pytest.mark.requires("data")
def test_a_2x2_sweep_completes_on_slurm_and_a_rerun_skips_every_cell(uninterrupted):
    base, done, _ = uninterrupted
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "sweep summary: 4 cells: 4 done, 0 skipped, 0 failed" in done.stdout
    assert "Bypassing sacct error" not in done.stdout + done.stderr
    results = results_of(base / "results")
    assert sorted(results) == sorted(CELLS)
    summary = read_result(base / "sweep" / "sweep_summary.json")
    assert summary["counts"] == {"done": 4, "skipped": 0, "failed": 0}
    assert list((base / "results" / "sweeps").glob("*/sweep_summary.md"))  # beside the results too
    # Each cell ran in its own SLURM job (submitit's folders).
    assert len(array_tasks(base / "sweep")) == 4
    written = {cell: path.stat().st_mtime_ns for cell, path in results.items()}
    again = sweep_cli(base / "results", base / "sweep_again", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 cells: 0 done, 4 skipped, 0 failed" in again.stdout
    assert again.stdout.count("skipped: finished") == 4  # by the launcher: Hydra logs to stdout
    assert not (base / "sweep_again" / ".submitit").exists()  # nothing was queued
    assert {cell: path.stat().st_mtime_ns for cell, path in results_of(base / "results").items()} == written


@pytest.mark.slurm
@pytest.mark.requires("data")
def test_a_cancelled_sweep_run_again_finishes_only_the_missing_cells(uninterrupted, tmp_path):
    reference, done, _ = uninterrupted
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results, sweep_dir = tmp_path / "results", tmp_path / "sweep"
    driver = subprocess.Popen([sys.executable, "run.py", *SWEEP, f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT,
                              env=environment(OUTLIERLAB_RESULTS_DIR=str(results)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not results_of(results) and time.time() < deadline and driver.poll() is None:
            time.sleep(0.5)
        assert results_of(results), "no cell finished"
        jobs = sorted({task.split("_")[0] for task in array_tasks(sweep_dir)})
        subprocess.run(["scancel", *jobs], check=True, timeout=60)
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, output[-3000:]
    finished = results_of(results)
    assert 1 <= len(finished) < 4, output[-3000:]
    for path in finished.values():  # whatever SLURM killed, no result file is partial
        read_result(path)
    assert f"{len(finished)} done, 0 skipped, {4 - len(finished)} failed" in output
    assert "CANCELLED" in output
    kept = {cell: path.stat().st_mtime_ns for cell, path in finished.items()}

    resumed = sweep_cli(results, tmp_path / "sweep_resumed", timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert f"4 cells: {4 - len(finished)} done, {len(finished)} skipped, 0 failed" in resumed.stdout
    assert {cell: results_of(results)[cell].stat().st_mtime_ns for cell in kept} == kept  # not run again
    # The resumed sweep's table is the uninterrupted sweep's, to the last digit of every cell.
    assert sweep_table(results) == sweep_table(reference / "results")
    for cell, path in results_of(reference / "results").items():
        assert read_result(results_of(results)[cell])["table"] == read_result(path)["table"]


@pytest.mark.slurm
@pytest.mark.requires("data")
def test_a_signalled_cell_is_requeued_by_submitit_and_runs_again(tmp_path):
    """SLURM's warning signal (sbatch --signal=USR2@signal_delay_s: before a time limit, or on pre-emption) makes
    submitit checkpoint the cell and requeue its job; the requeued job runs the cell again from its start."""
    results, sweep_dir = tmp_path / "results", tmp_path / "sweep"
    driver = subprocess.Popen([sys.executable, "run.py", "-m", "+exp=prune_sw", "model=tiny_llama", *SMALL_EVAL,
                               "logger=none", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT,
                              env=environment(OUTLIERLAB_RESULTS_DIR=str(results)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not (sweep_dir / "0" / ".hydra").is_dir() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.2)  # the cell's job runs (submitit's signal handlers are in place)
        [job] = array_tasks(sweep_dir)
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
        while time.time() < deadline and driver.poll() is None:
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout
            if "PENDING" in state:  # requeued; SLURM holds a requeued job for 2 minutes: release it now
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=60)
                break
            time.sleep(0.5)
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    log = "".join(p.read_text() for p in (sweep_dir / ".submitit" / job).glob("*_log.*"))
    assert "this job is preempted" in log and f"Requeued job {job}" in log, log[-3000:]
    assert log.count("Starting with JobEnvironment") == 2  # ran twice: before the signal and after the requeue
    assert driver.returncode == 0, output[-3000:]
    assert "sweep summary: 1 cell: 1 done, 0 skipped, 0 failed" in output
    assert read_result(results / "prune_sw" / "tiny_llama" / "quick.json")["weights_restored"] is True
