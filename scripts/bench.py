"""The probes' cost next to a plain forward, and next to the ways researchers compute the same statistics.

    python scripts/bench.py                                   # SmolLM2-135M, CPU, 1 x 512 tokens
    python scripts/bench.py --device cuda --dtype bfloat16 --shape llama7b   # random weights of Llama-7B's shape

Cases, on the same model and the same input ids, in one run:
    plain            model(ids)
    ours_residual    ResidualStats (per-layer top-k + median of |h|, global top-k with coordinates)
    ours             ResidualStats + DownProjStats
    ours_all         every per-layer statistics probe at once: ResidualStats with the MA-paper exceedance scan and
                     per-coordinate moments, DownProjStats, SiteMoments of the attention output
    nnsight          the ours statistics from `.save()` inside an nnsight trace (scripts/bench_ways.py)
    host_copy        the ours statistics from hooks that copy activations to the host (the MA repo's way)
    hidden_states    the ours_residual statistics from output_hidden_states=True

Repeats are interleaved (plain, ours_residual, ..., then the same rotated by one, ...) after one warm-up round, so
a change in machine load hits every case alike; each case's ratio is the median over repeats of its time / plain's
time in the same round. On CUDA every timing synchronizes first and last. Peak memory of `ours_all` is measured in fresh
processes for each of --memory-sequences (peak RSS on the CPU, torch.cuda.max_memory_allocated on CUDA), with the
probes' own state size. `--ppl-windows N` also times the library's perplexity evaluation (evals/ppl.py) over N
random windows of --ppl-seqlen tokens, --ppl-batch at a time: tokens/s and MFU of the evaluation loop. A way whose
package is missing (nnsight on a machine without it) is left out and named in the record. Writes
results/bench/<device>.json and .md (--out to put them elsewhere).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
# This checkout's src/ first, whatever an editable install points at (as pytest's pythonpath does): the benchmark
# measures the code beside it.
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "scripts")]

import bench_ways

from outlierlab.environment import lock_status
from outlierlab.results import git_state, library_versions

CASES = ("plain", "ours_residual", "ours", "ours_all", "nnsight", "host_copy", "hidden_states")
# Shapes for --shape: random weights built from a transformers config (no download). Llama-7B: arXiv 2302.13971.
SHAPES = {
    "llama7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                "max_position_embeddings": 4096},
    # what `python -m outlierlab.gpu_check --smoke` runs on the CPU: the same code path, seconds
    "tiny": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 256},
}
# Dense bf16 peak TFLOP/s by device-name pattern (vendor datasheets), for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {r"H200|H100.*SXM": 989.0, r"H100": 756.0, r"A100": 312.0, r"L40S": 362.0, r"L4\b": 121.0,
               r"A10G": 125.0, r"RTX 4090": 165.0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model YAML (ignored with --shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--memory-sequences", default="10,100", help="comma list; empty to skip")
    parser.add_argument("--memory-seqlen", type=int, default=128)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--ppl-windows", type=int, default=0, help="time the PPL evaluation on this many windows")
    parser.add_argument("--ppl-seqlen", type=int, default=2048)
    parser.add_argument("--ppl-batch", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load(args):
    """(LoadedModel, description) for --model or --shape on --device in --dtype."""
    from hydra import compose, initialize_config_dir

    from outlierlab.models.load import DTYPES, LoadedModel, byte_tokenizer, load_model
    from outlierlab.models.sites import Sites
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    if args.shape:
        from transformers import AutoConfig, AutoModelForCausalLM
        shape = dict(SHAPES[args.shape])
        config = AutoConfig.for_model(shape.pop("model_type"), **shape)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval().requires_grad_(False)
        loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), sites=Sites(model), bos="none")
        return loaded, {"shape": args.shape, "config": SHAPES[args.shape], "weights": "random (seed 0)"}
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"model.device={device}",
                                           f"model.dtype={args.dtype}"])
    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    return loaded, {"model": args.model, "source": str(cfg.model.source)}


def vocab_size(loaded) -> int:
    return loaded.model.get_output_embeddings().weight.shape[0]


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def all_probes(loaded, k: int):
    """Every per-layer statistics probe, entered together (AttentionSinks is left out: it swaps attention for the
    eager implementation, a different forward; ActivationMeans needs MA coordinates)."""
    from outlierlab.probes.massive_activations import MACriterion
    from outlierlab.probes.moments import SiteMoments
    from outlierlab.probes.stats import DownProjStats, ResidualStats
    return [ResidualStats(loaded.sites, k=k, exceedance=MACriterion().exceedance(), moments=True),
            DownProjStats(loaded.sites), SiteMoments(loaded.sites, "layers.{i}.attn.out")]


class Case:
    """One way of running a forward; `start`/`stop` (untimed) put its hooks on and take them off around it, so
    the other cases run without them."""

    def __init__(self, forward):
        self.forward = forward

    def start(self):
        pass

    def stop(self):
        pass

    def __call__(self, model, ids):
        self.forward(model, ids)


class ProbeCase(Case):
    """Probes hooked only while this case runs; their state streams across all its forwards."""

    def __init__(self, probes):
        self.probes = probes

    def start(self):
        for probe in self.probes:
            probe.__enter__()

    def stop(self):
        for probe in reversed(self.probes):
            probe.__exit__(None, None, None)

    def __call__(self, model, ids):
        self.probes[0].observe(ids)
        model(ids)


def make_cases(loaded, names, k, unavailable: dict | None = None):
    """The cases by name; a way whose package cannot be imported goes into `unavailable` ({name: error})."""
    from outlierlab.probes.stats import DownProjStats, ResidualStats
    sites, cases = loaded.sites, {}
    for name in names:
        if name == "plain":
            cases[name] = Case(lambda model, ids: model(ids))
        elif name == "ours_residual":
            cases[name] = ProbeCase([ResidualStats(sites, k=k)])
        elif name == "ours":
            cases[name] = ProbeCase([ResidualStats(sites, k=k), DownProjStats(sites)])
        elif name == "ours_all":
            cases[name] = ProbeCase(all_probes(loaded, k))
        else:
            try:
                way = bench_ways.make(name, loaded, k)
            except ImportError as error:
                if unavailable is None:
                    raise
                unavailable[name] = f"{type(error).__name__}: {error}"
                continue
            cases[name] = Case(lambda model, ids, way=way: way.forward(ids))
    return cases


def time_cases(loaded, cases, ids, repeats, device) -> dict[str, list[float]]:
    times = {name: [] for name in cases}
    with torch.no_grad():
        names = list(cases)
        for round_number in tqdm(range(repeats + 1), desc="interleaved rounds (the first is a warm-up)"):
            shift = round_number % len(names)  # rotate the order: a load that drifts within a round hits all alike
            for name in names[shift:] + names[:shift]:
                case = cases[name]
                case.start()
                sync(device)
                start = time.perf_counter()
                case(loaded.model, ids)
                sync(device)
                elapsed = time.perf_counter() - start
                case.stop()
                if round_number > 0:
                    times[name].append(elapsed)
    return times


def summarize(times: dict[str, list[float]], tokens: int, flops: float, peak_tflops: float | None) -> dict:
    plain = times["plain"]
    rows = {}
    for name, values in times.items():
        paired = sorted(value / base for value, base in zip(values, plain))
        median = statistics.median(values)
        rows[name] = {"median_ms": median * 1e3, "min_ms": min(values) * 1e3, "max_ms": max(values) * 1e3,
                      "ratio_to_plain": statistics.median(paired),
                      "ratio_p25": paired[len(paired) // 4], "ratio_p75": paired[(3 * len(paired)) // 4],
                      "tokens_per_s": tokens / median,
                      "mfu": (flops / median / (peak_tflops * 1e12)) if peak_tflops else None,
                      "times_ms": [value * 1e3 for value in values]}
    return rows


def forward_flops(loaded, tokens_per_sequence: int, sequences: int) -> float:
    """2 x parameters (input embedding excluded, LM head included) per token, plus attention's q.k and p.v:
    4 x layers x hidden x T per token (non-causal count, the usual MFU convention)."""
    config = loaded.model.config
    embedding = loaded.model.get_input_embeddings().weight
    parameters = sum(p.numel() for p in loaded.model.parameters())
    head = loaded.model.get_output_embeddings().weight
    matmul = parameters - embedding.numel() + (head.numel() if head is embedding else 0)
    per_token = 2 * matmul + 4 * config.num_hidden_layers * config.hidden_size * tokens_per_sequence
    return float(per_token * tokens_per_sequence * sequences)


def ppl_throughput(loaded, args, peak: float | None) -> dict:
    """The library's perplexity evaluation (evals/ppl.py `perplexity`) over random windows: tokens/s and MFU of the
    evaluation loop as the studies run it (one warm-up batch first)."""
    from outlierlab.evals.ppl import Windows, perplexity
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size(loaded), (args.ppl_windows, args.ppl_seqlen), generator=generator)
    with torch.no_grad():
        perplexity(loaded.model, Windows(ids[:args.ppl_batch], {}), batch_size=args.ppl_batch, desc="ppl warm-up")
        sync(str(loaded.device))
        result = perplexity(loaded.model, Windows(ids, {}), batch_size=args.ppl_batch, desc="ppl timed")
        sync(str(loaded.device))
    flops = forward_flops(loaded, args.ppl_seqlen, args.ppl_windows)
    return {"windows": args.ppl_windows, "seqlen": args.ppl_seqlen, "batch": args.ppl_batch,
            "seconds": result["eval_seconds"], "tokens_per_s": result["tokens_per_s"],
            "mfu": flops / result["eval_seconds"] / (peak * 1e12) if peak else None}


def peak_tflops(device: str, given: float | None) -> float | None:
    if given is not None or not device.startswith("cuda"):
        return given
    name = torch.cuda.get_device_name()
    return next((value for pattern, value in PEAK_TFLOPS.items() if re.search(pattern, name)), None)


def machine(device: str) -> dict:
    info = {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__}
    try:
        model_names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")]
        info["cpu"] = model_names[0] if model_names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    from importlib import metadata
    for package in ("transformers", "nnsight"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def memory_child(args) -> dict:
    """In a fresh process: load, run `args.memory_child` sequences through every probe, report peak memory."""
    loaded, _ = load(args)
    device = str(loaded.device)
    probes = all_probes(loaded, args.k)
    generator = torch.Generator().manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for probe in probes:
            probe.__enter__()
        for _ in tqdm(range(args.memory_child), desc=f"memory: {args.memory_child} sequences"):
            ids = torch.randint(0, vocab_size(loaded), (1, args.memory_seqlen), generator=generator).to(device)
            probes[0].observe(ids)
            loaded.model(ids)
        for probe in probes:
            probe.__exit__(None, None, None)
    for probe in probes:
        probe.summary()
    sync(device)
    result = {"sequences": args.memory_child, "seqlen": args.memory_seqlen,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
              "probe_state": [bench_ways.state_size(probe) for probe in probes]}
    if device.startswith("cuda"):
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_memory(args, counts: list[int]) -> list[dict]:
    results = []
    for count in tqdm(counts, desc="memory runs"):
        command = [sys.executable, __file__, "--memory-child", str(count), "--device", args.device,
                   "--dtype", args.dtype, "--memory-seqlen", str(args.memory_seqlen), "--k", str(args.k),
                   *(["--shape", args.shape] if args.shape else ["--model", args.model])]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def markdown(record: dict) -> str:
    rows = record["cases"]
    what = record["model"].get("shape") or record["model"].get("model")
    load_before, load_after = record["load_average"]["before"], record["load_average"]["after"]
    lines = [f"# Probe benchmark: {what} on {record['device']} ({record['dtype']})", "",
             (f"{record['batch']} x {record['seqlen']} tokens, {record['repeats']} interleaved repeats, "
              f"{record['machine']['torch_threads']} torch threads on {record['machine']['cpu_count']} CPUs "
              f"({record['machine'].get('gpu') or record['machine']['cpu']}); load average "
              f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; {record['created']}; commit "
              f"{(record['git']['commit'] or 'unknown')[:10]}{' (dirty tree)' if record['git'].get('dirty') else ''}; "
              f"environment {'equals' if (record['environment'].get('lock') or {}).get('matches') else 'differs from'} "
              f"the lock."), "",
             "| case | median ms | min-max ms | x plain (median of paired ratios) | p25-p75 | tokens/s | MFU |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        lines.append(f"| {name} | {row['median_ms']:.1f} | {row['min_ms']:.1f}-{row['max_ms']:.1f} | "
                     f"{row['ratio_to_plain']:.3f} | {row['ratio_p25']:.3f}-{row['ratio_p75']:.3f} | "
                     f"{row['tokens_per_s']:.0f} | {mfu} |")
    if record.get("unavailable"):
        left_out = "; ".join(f"{name} ({why})" for name, why in record["unavailable"].items())
        lines += ["", f"Left out (package missing): {left_out}"]
    if record.get("ppl_eval"):
        ppl = record["ppl_eval"]
        mfu = f"{ppl['mfu']:.1%}" if ppl["mfu"] is not None else "-"
        lines += ["", f"PPL evaluation (evals/ppl.py, {ppl['windows']} x {ppl['seqlen']} tokens, "
                      f"batch {ppl['batch']}): "
                      f"{ppl['tokens_per_s']:.0f} tokens/s, MFU {mfu}, {ppl['seconds']:.2f} s."]
    if record.get("memory"):
        lines += ["", "Peak memory of ours_all (every probe), fresh process per row:", "",
                  "| sequences | seqlen | peak RSS MiB | CUDA max allocated MiB | probe state bytes |",
                  "|---|---|---|---|---|"]
        for row in record["memory"]:
            state = sum(part["tensor_bytes"] for part in row["probe_state"])
            cuda = row.get("cuda_max_allocated_mib")
            lines.append(f"| {row['sequences']} | {row['seqlen']} | {row['peak_rss_mib']:.0f} | "
                         f"{'-' if cuda is None else f'{cuda:.0f}'} | {state} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args)))
        return None
    names = [name for name in args.cases.split(",") if name]
    unknown = sorted(set(names) - set(CASES))
    if unknown or "plain" not in names:
        raise SystemExit(f"--cases: unknown {unknown} (known: {', '.join(CASES)}); plain is required")
    load_before = os.getloadavg()
    loaded, model_info = load(args)
    device = str(loaded.device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size(loaded), (args.batch, args.seqlen), generator=generator).to(device)
    unavailable = {}
    cases = make_cases(loaded, names, args.k, unavailable)
    times = time_cases(loaded, cases, ids, args.repeats, device)
    peak = peak_tflops(device, args.peak_tflops)
    ppl_eval = ppl_throughput(loaded, args, peak) if args.ppl_windows else None
    rows = summarize(times, args.batch * args.seqlen, forward_flops(loaded, args.seqlen, args.batch), peak)
    counts = [int(count) for count in args.memory_sequences.split(",") if count]
    memory = run_memory(args, counts) if counts else []
    device_label = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "_", machine(device)["gpu"].lower()).strip("_")
    record = {"device": device_label, "dtype": args.dtype, "model": model_info, "batch": args.batch,
              "seqlen": args.seqlen, "repeats": args.repeats, "k": args.k,
              "parameters": sum(p.numel() for p in loaded.model.parameters()),
              "forward_flops": forward_flops(loaded, args.seqlen, args.batch), "peak_tflops": peak,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git": git_state(ROOT), "environment": {**library_versions(), **lock_status()},
              "machine": machine(device),
              "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
              "cases": rows, "unavailable": unavailable, "ppl_eval": ppl_eval, "memory": memory}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{device_label}.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(record)
    (out / f"{device_label}.md").write_text(table)
    print(table)
    print(f"written: {out / (device_label + '.json')}, {out / (device_label + '.md')}")
    return record


if __name__ == "__main__":
    main()
