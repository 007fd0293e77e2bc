"""The command line on MoE and Pythia: super experts listed from a tiny MoE directory with a planted one and none
without; a Pythia revision sweep from a local Hugging Face cache of tiny checkpoints; bad input in one line, exit 2,
before any weights load."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from scripts.tiny_checkpoints import plant_super_expert, tiny, write, write_revisions

SMALL = ["logger=none", "eval.ppl.wikitext2.seqlen=64", "eval.ppl.wikitext2.windows=2", "eval.ppl.c4.seqlen=64",
         "eval.ppl.c4.windows=2"]


def _run(*overrides, tmp_path, env=None, multirun=False):
    return subprocess.run([sys.executable, "run.py", *(["-m"] if multirun else []), *overrides, *SMALL,
                           f"paths.results_dir={tmp_path / 'results'}", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", **(env or {})})


def _one_line_exit_2(done, says, tmp_path):
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert says in lines[-1] and not any("Traceback" in line for line in lines), done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("planted", [True, False])
def test_super_experts_run_lists_the_planted_super_expert_and_none_without(planted, tmp_path):
    loaded = tiny("tiny_qwen3_moe")
    if planted:
        plant_super_expert(loaded, layer=1, expert=3)
    directory = write(loaded, tmp_path / "moe")
    done = _run("+exp=super_experts", "model=path", f"model.source={directory}", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "results" / "super_experts" / "moe" / "quick.json").read_text())
    listed = [(e["layer"], e["expert"]) for e in record["super_experts"]]
    assert listed == ([(1, 3)] if planted else [])
    assert ("super experts: layers.1 expert 3" if planted else "super experts: none") in done.stdout
    rows = {row["variant"]: row for row in record["table"]["rows"]}
    assert record["weights_restored"] and rows["original"]["sink_rate"] is not None
    assert (rows["prune_super_experts"].get("max_abs_h") is not None) == planted


def test_pythia_revisions_sweep_from_a_local_hf_cache(tmp_path):
    cache = tmp_path / "hf"
    write_revisions(cache, "EleutherAI/pythia-160m", ["step1000", "step8000"])
    done = _run("+exp=atlas", "model=pythia_160m", "model.revision=step1000,step8000", "exp.data.corpus.windows=2",
                "exp.data.corpus.seqlen=64", tmp_path=tmp_path, multirun=True,
                env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    records = {step: json.loads((tmp_path / "results" / "atlas" / f"pythia_160m_{step}" / "quick.json").read_text())
               for step in ("step1000", "step8000")}
    assert {r["model"]["revision"] for r in records.values()} == {"step1000", "step8000"}
    assert records["step1000"]["weights_sha256"] != records["step8000"]["weights_sha256"]
    assert all(r["model"]["family"] == "gpt-neox-parallel" for r in records.values())


@pytest.mark.parametrize(("overrides", "says"), [
    (("+exp=super_experts", "model=tiny_qwen3_moe", "exp.interventions.prune_super_experts.experts=[[1,99]]"),
     "exp.interventions.prune_super_experts: [1, 99]: expert 99 is outside layers.1's 8 experts"),
    (("+exp=prune_sw", "model=tiny_qwen3_moe", "model.super_weights=[{coord:'(1, 7, 11)'}]"),
     "super weight (1, 7, 11): layers.1 is a mixture of experts; write (layer, expert, row, col)"),
    (("+exp=prune_sw", "model=tiny_qwen3_moe", "model.super_weights=[{coord:'(1, 9, 7, 11)'}]"),
     "expert 9 is outside layers.1's 8 experts"),
], ids=["expert-index", "sw-3-element", "sw-expert"])
def test_bad_moe_input_stops_in_one_line(overrides, says, tmp_path):
    _one_line_exit_2(_run(*overrides, tmp_path=tmp_path), says, tmp_path)


def test_a_revision_not_in_the_cache_with_the_hub_unreachable_stops_in_one_line(tmp_path):
    cache = tmp_path / "hf"
    write_revisions(cache, "EleutherAI/pythia-160m", ["step1000"])
    done = _run("+exp=atlas", "model=pythia_160m", "model.revision=step2000", tmp_path=tmp_path,
                env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    _one_line_exit_2(done, "the model at revision step2000 is not in the local HF cache", tmp_path)
    local = write(tiny("tiny_gpt_neox"), tmp_path / "neox")
    done = _run("+exp=atlas", "model=path", f"model.source={local}", "model.revision=step1000", tmp_path=tmp_path)
    _one_line_exit_2(done, "model.revision=step1000: a local directory holds one revision", tmp_path)


def test_atlas_of_a_mixture_of_experts_lists_its_super_expert(tmp_path):
    loaded = tiny("tiny_mixtral")
    plant_super_expert(loaded, layer=1, expert=3)
    directory = write(loaded, tmp_path / "moe")
    done = _run("+exp=atlas", "model=path", f"model.source={directory}", "exp.data.corpus.windows=4",
                "exp.data.corpus.seqlen=64", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "results" / "atlas" / "moe" / "quick.json").read_text())
    row = record["table"]["rows"][0]
    assert row["super_experts"] == "1.3" and row["sw_in_experts"] == "none"
    assert record["weights_restored"]
