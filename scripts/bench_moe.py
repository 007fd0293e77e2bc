"""The cost of observing every expert of a mixture of experts next to a plain forward, in one run.

    python scripts/bench_moe.py                       # tiny MoE and a 1B-class random MoE shape, CPU, float32
    python scripts/bench_moe.py --device cuda --dtype bfloat16 --shapes moe_1b

Cases, on the same random-weight model and input ids:
    plain      model(ids) with transformers' own experts forward (grouped_mm, the default)
    profile    model(ids) with probes/super_experts.ExpertProfile on (every expert's down_proj output max and the
               router's load per expert, through the expert sites: models/experts.py's registered forward)
Repeats are interleaved (plain, profile, then profile, plain, ...) after a warm-up round, so a change in machine load
hits both; the ratio is the median over rounds of profile / plain in the same round. Writes results/bench/moe_<device>
.json and .md. Goal: <= 1.10x.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]  # this checkout's code, whatever an editable install points at

from outlierlab.models.sites import Sites  # noqa: E402
from outlierlab.probes.super_experts import ExpertProfile  # noqa: E402

# Random weights from a transformers config (no download). moe_1b: Qwen3-MoE blocks with ~0.9B parameters (16
# layers x 32 experts of 512, top-4: OLMoE-1B-7B's active size class); tiny: conf/model/tiny_qwen3_moe.yaml.
SHAPES = {
    "tiny": {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 258},
    "moe_1b": {"model_type": "qwen3_moe", "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 512,
               "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
               "num_experts": 32, "num_experts_per_tok": 4, "vocab_size": 32000},
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    return model, Sites(model)


def timed(run, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def measure(shape: str, device: str, dtype: torch.dtype, seqlen: int, repeats: int) -> dict:
    model, sites = build(shape, device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0)).to(device)

    def plain():
        model.set_experts_implementation("grouped_mm")
        model(ids)

    def profile():
        with ExpertProfile(sites):
            model(ids)

    cases = {"plain": plain, "profile": profile}
    times = {name: [] for name in cases}
    for round_ in range(repeats + 1):
        order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
        measured = {name: timed(cases[name], device) for name in order}
        if round_:  # round 0 warms up
            for name, seconds in measured.items():
                times[name].append(seconds)
    ratios = [p / q for p, q in zip(times["profile"], times["plain"])]
    return {"shape": shape, "config": SHAPES[shape], "parameters": sum(p.numel() for p in model.parameters()),
            "moe_layers": len(sites.moe_layers), "experts_observed": sum(map(sites.num_experts, sites.moe_layers)),
            "seqlen": seqlen, "repeats": repeats, "plain_s": statistics.median(times["plain"]),
            "profile_s": statistics.median(times["profile"]), "ratio": statistics.median(ratios), "ratios": ratios}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,moe_1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    runs = [measure(shape, args.device, dtype, args.seqlen, args.repeats) for shape in args.shapes.split(",")]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    record = {"device": device, "dtype": args.dtype, "torch": torch.__version__, "runs": runs,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "note": "shared machine: absolute times are inflated by other jobs; the interleaved ratio is the number"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"moe_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Per-expert observation overhead ({device}, {args.dtype}, seqlen {args.seqlen})", "",
             "| shape | parameters | experts observed | plain (s) | profile (s) | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['parameters'] / 1e6:.1f}M | {r['experts_observed']} | {r['plain_s']:.4f} | "
              f"{r['profile_s']:.4f} | {r['ratio']:.3f}x |" for r in runs]
    lines += ["", record["note"]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
