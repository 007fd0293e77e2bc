"""Tiny checkpoints written to disk, standing in for real ones no test can download.

    python scripts/tiny_checkpoints.py moe OUT [--model tiny_qwen3_moe] [--plant LAYER EXPERT]
        a tiny mixture of experts as a Hugging Face directory; --plant makes expert EXPERT of layers.LAYER a super
        expert (one output channel of its down_proj x 300), for `+exp=super_experts model=path model.source=OUT`
    python scripts/tiny_checkpoints.py revisions HF_CACHE REPO_ID step1000 step8000 ... [--model tiny_gpt_neox]
        one tiny checkpoint per revision in a Hugging Face cache layout (models--owner--name/refs/<revision> ->
        snapshots/<commit>/), which is what a user who downloaded those Pythia revisions has: with
        HF_HUB_CACHE=HF_CACHE HF_HUB_OFFLINE=1, `model=pythia_160m model.revision=step1000` loads from it
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
SUPER_EXPERT_GAIN = 300.0


def tiny(model: str, seed: int | None = None):
    from outlierlab.models.load import load_model
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}"] + ([f"model.tiny.seed={seed}"] if seed is not None else []))
    return load_model(cfg.model, "/nonexistent")


def plant_super_expert(loaded, layer: int, expert: int, channel: int = 5, gain: float = SUPER_EXPERT_GAIN) -> None:
    """Scale output channel `channel` of expert `expert`'s down_proj in layers.`layer` by `gain`: whenever a token
    is routed to it, that expert's output spikes there (the expert's weights only; routing is unchanged)."""
    view = loaded.sites.weight(f"layers.{layer}.mlp.experts.{expert}.down_proj.weight")
    with torch.no_grad():
        view.as_out_in()[channel] *= gain


def write(loaded, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out


def write_revisions(cache: Path, repo_id: str, revisions: list[str], model: str = "tiny_gpt_neox") -> dict[str, str]:
    """A checkpoint per revision (seeded differently, as training would change them) in the HF cache layout;
    returns {revision: commit}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commits = {}
    for number, revision in enumerate(revisions):
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        write(tiny(model, seed=number), repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        commits[revision] = commit
    return commits


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True)
    moe = kinds.add_parser("moe")
    moe.add_argument("out", type=Path)
    moe.add_argument("--model", default="tiny_qwen3_moe")
    moe.add_argument("--plant", type=int, nargs=2, metavar=("LAYER", "EXPERT"))
    revisions = kinds.add_parser("revisions")
    revisions.add_argument("cache", type=Path)
    revisions.add_argument("repo_id")
    revisions.add_argument("revisions", nargs="+")
    revisions.add_argument("--model", default="tiny_gpt_neox")
    args = parser.parse_args(argv)
    if args.kind == "moe":
        loaded = tiny(args.model)
        if args.plant:
            plant_super_expert(loaded, *args.plant)
        print(write(loaded, args.out))
    else:
        print(write_revisions(args.cache, args.repo_id, args.revisions, args.model))


if __name__ == "__main__":
    main(sys.argv[1:])
