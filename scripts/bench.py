"""Cost of the probes relative to a plain forward (the probes must stay close to free).

    python scripts/bench.py [--model smollm2_135m] [--seqlen 512] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from outlierlab.models.load import load_model
from outlierlab.probes.stats import DownProjStats, ResidualStats

CONF = Path(__file__).resolve().parents[1] / "conf"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}"])
    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    ids = torch.randint(0, len(loaded.tokenizer), (args.batch, args.seqlen), device=loaded.device)
    forward = lambda: loaded.model(ids)  # noqa: E731

    def with_probes():
        with ResidualStats(loaded.sites) as residual, DownProjStats(loaded.sites):
            residual.observe(ids)
            loaded.model(ids)

    with torch.no_grad():
        plain, probed = timed(forward, args.repeats), timed(with_probes, args.repeats)
    print(f"{args.model} batch {args.batch} x {args.seqlen} tokens on {loaded.device} "
          f"({torch.get_num_threads()} threads)")
    print(f"plain forward   {plain * 1000:8.1f} ms")
    print(f"with probes     {probed * 1000:8.1f} ms   ({probed / plain:.2f}x)")


if __name__ == "__main__":
    main()
