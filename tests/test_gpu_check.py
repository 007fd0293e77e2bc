"""The prepared GPU check (src/outlierlab/gpu_check.py, scripts/gpu_check.sh): the token shard stands in for the
corpus exactly, the time budget skips what does not fit (never vanilla or kv_bias), the carried wheels are the lock's
versions, a run without CUDA or without a shard is one clear error, and the --smoke run goes the whole path on the
CPU (slow: about a minute)."""
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from conftest import DATA_DIR, ROOT, compose_cfg
from omegaconf import OmegaConf

from outlierlab import gpu_check
from outlierlab.errors import DataError
from outlierlab.train.data import check_data, prepare, read_shard


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A smoke token shard, prepared once from ../shared/data (as `--prepare --smoke` does)."""
    directory = tmp_path_factory.mktemp("gpu_check")
    gpu_check.main(["--prepare", "--smoke", "--workdir", str(directory), "--data-dir", str(DATA_DIR)])
    return directory


def smoke_mode(workdir, results, variants):
    args = gpu_check.parse_args(["--smoke", "--workdir", str(workdir), "--results", str(results),
                                 "--scratch", str(results / "scratch"), "--variants", ",".join(variants)])
    return gpu_check.make_mode(args)


@pytest.mark.requires("data")
def test_the_shard_is_the_tokens_the_corpus_gives(workdir, tmp_path):
    cfg = compose_cfg(["+exp=pretrain", *gpu_check.SMOKE_DATA, f"paths.data_dir={DATA_DIR}",
                       f"paths.cache_dir={tmp_path}"])
    direct = prepare(cfg.train.size.data, str(DATA_DIR), tmp_path)
    shard = read_shard(workdir / "shard_smoke")
    assert torch.equal(shard.train, direct.train) and torch.equal(shard.val, direct.val)
    assert shard.tokenizer.get_vocab() == direct.tokenizer.get_vocab()
    assert shard.meta["data"]["origin"] == "shard" and shard.meta["data"]["cut_from"]["sha256"]
    prepared = json.loads((workdir / gpu_check.PREPARED).read_text())
    assert prepared["shard"]["tokens"]["train"] == len(direct.train) and prepared["wheels"] == []
    check_data(OmegaConf.merge(cfg.train.size.data, {"shard": str(workdir / "shard_smoke")}), None)  # no corpus
    with pytest.raises(DataError, match="no token shard in /nowhere"):
        check_data(OmegaConf.merge(cfg.train.size.data, {"shard": "/nowhere"}), str(DATA_DIR))


@pytest.mark.requires("data")
def test_the_budget_skips_what_does_not_fit_but_never_the_contrast(workdir, tmp_path):
    mode = smoke_mode(workdir, tmp_path, ["vanilla", "kv_bias", "softpick"])
    runs = gpu_check.train_variants(mode, deadline=time.time())  # no time at all
    assert set(runs) == {"vanilla", "kv_bias", "softpick"}
    assert runs["vanilla"]["steps"] == runs["kv_bias"]["steps"] == 4
    assert runs["softpick"]["skipped"].startswith("time budget")
    assert (tmp_path / "cpu_smoke" / "pretrain" / "tiny_kv_bias" / "train.json").is_file()


# Packages the device image has (/work/.library/device/KINDS.md) among what the carried ones require.
ON_THE_IMAGE = {"torch", "transformers", "huggingface-hub", "cloudpickle", "httpx", "pyyaml", "tqdm", "packaging",
                "typing-extensions"}


def test_the_carried_wheels_are_the_locks_versions_and_bring_what_they_need():
    """Every carried package is pinned by the lock, and everything they require is carried or on the image (a lock
    refresh that gives nnsight or hydra a new dependency fails here, not on the GPU)."""
    from importlib import metadata
    versions = gpu_check.lock_versions(gpu_check.CARRIED)
    assert set(versions) == set(gpu_check.CARRIED)
    assert all(metadata.version(name) == version for name, version in versions.items())
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    needed = {canonicalize_name(requirement.name) for name in gpu_check.CARRIED
              for requirement in map(Requirement, metadata.requires(name) or [])
              if requirement.marker is None or requirement.marker.evaluate({"extra": "", "python_version": "3.12"})}
    assert needed - set(gpu_check.CARRIED) - ON_THE_IMAGE == set()


def test_no_cuda_or_no_shard_is_one_clear_error(tmp_path, capsys):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as stop:
            gpu_check.main(["--workdir", str(tmp_path)])
        assert stop.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--smoke", "--workdir", str(tmp_path), "--results", str(tmp_path)])
    assert stop.value.code == 2 and "--prepare --smoke" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.requires("data")
def test_the_smoke_run_goes_the_whole_path(workdir, tmp_path):
    """bash scripts/gpu_check.sh --smoke: bench (every way, PPL-eval throughput), every variant trained with the
    same steps, the variants table, summary and archive."""
    archive = tmp_path / "out" / "gpu_check.tar.gz"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--workdir", str(workdir),
                           "--results", str(tmp_path / "results"), "--scratch", str(tmp_path / "scratch"),
                           "--archive", str(archive)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "cpu_smoke" / "summary.json").read_text())
    assert list(summary["training"]) == list(gpu_check.PRIORITY)
    assert {run["steps"] for run in summary["training"].values()} == {4}
    assert set(summary["table"]) == set(gpu_check.PRIORITY)
    assert all(row["massive"] in ("yes", "no") and row["fp_ppl"] > 1 for row in summary["table"].values())
    bench = summary["bench"]
    assert set(bench["cases"]) == {"plain", "ours_residual", "ours", "ours_all", "nnsight", "host_copy",
                                   "hidden_states"}
    assert bench["ppl_eval"]["tokens_per_s"] > 0 and bench["memory"]
    assert "| vanilla |" in (tmp_path / "results" / "cpu_smoke" / "summary.md").read_text()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any(name.endswith("cpu_smoke/summary.json") for name in names)
    assert any(name.endswith("variants_table/tiny/table.json") for name in names)
