"""Peak memory and wall time of whole studies, model in memory vs offloaded (README "Models bigger than memory").

    python scripts/bench_offload.py --models smollm2 --exps atlas prune_sw
    python scripts/bench_offload.py --models llama1b --write-llama1b ~/.cache/outlierlab/bench/llama1b   # 4.4 GB

Each case is one `python run.py +exp=<exp> model=path model.source=<dir> ...` in a fresh process under
/usr/bin/time -v (peak RSS of the process, wall time). Modes:
    memory        the whole model in memory, one forward per window
    offload       device_map=auto, max_memory={cpu: model/4}, the rest read from disk; observe-only passes
                  window-major (model.pass_order=window): every offloaded block is read once per window
    layer_major   the same budget, observe-only passes layer-major (each block read once per pass; the default)
and a `baseline` case per study: the same command on model=tiny_llama (weights of a few hundred kB), i.e. Python,
torch, the libraries and the study's corpora: the part of the peak that is not the model.
The study's table (what it found, its PPLs) and the weights' hash must be the same in every mode; the record says
whether they are. Writes results/bench/offload.json and .md. Timings on a shared machine are noisy: say so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path("~/.cache/outlierlab").expanduser()
MODELS = {  # name -> weights directory (safetensors + tokenizer)
    "smollm2": CACHE / "gguf" / "SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f-transformers5.23.0",
    "gemma3": CACHE / "gguf" / "gemma-3-270m-q4_k_m-a5fd3b62230aa5ec-transformers5.23.0",
    "llama1b": CACHE / "bench" / "llama1b",
}
MODES = {"memory": [], "layer_major": ["model.pass_order=layer"], "offload": ["model.pass_order=window"]}
# Small data so the 1B runs fit a shared 2-core machine: few windows, short sequences.
EXP_ARGS = {"atlas": ["exp.data.corpus.windows=4", "exp.data.corpus.seqlen=128", "eval.ppl.wikitext2.windows=2",
                      "eval.ppl.wikitext2.seqlen=128", "eval.ppl.c4.windows=2", "eval.ppl.c4.seqlen=128"],
            "prune_sw": ["eval.ppl.wikitext2.windows=4", "eval.ppl.wikitext2.seqlen=128", "eval.ppl.c4.windows=2",
                         "eval.ppl.c4.seqlen=128", "exp.super_weights=detect"]}


def write_llama1b(directory: Path) -> None:
    """A random-initialised model of TinyLlama-1.1B's shape (22 layers, d 2048, ffn 5632; 4.4 GB in float32) with
    SmolLM2's tokenizer, as safetensors: a stand-in for a model bigger than memory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(MODELS["smollm2"]).save_pretrained(directory)


def weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run_case(model: str, exp: str, mode: str, budget: int, results: Path) -> dict:
    weights = ["model=tiny_llama"] if mode == "baseline" else ["model=path", f"model.source={MODELS[model]}"]
    overrides = [f"+exp={exp}", *weights, "logger=none", f"paths.results_dir={results}", f"run_tag={mode}",
                 *EXP_ARGS[exp], *MODES.get(mode, [])]
    if mode not in ("memory", "baseline"):
        overrides += ["model.device_map=auto", f"model.max_memory={{cpu: {budget}}}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, str(ROOT / "run.py"), *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    if done.returncode != 0:
        return {"model": model, "exp": exp, "mode": mode, "error": done.stderr[-2000:]}
    path = re.search(r"result: (\S+)", done.stdout).group(1)
    record = json.loads(Path(path).read_text())
    return {"model": model, "exp": exp, "mode": mode, "peak_rss_mib": round(peak_kb / 1024, 1),
            "wall_s": round(seconds, 1),
            "budget_mib": round(budget / 2**20, 1) if mode not in ("memory", "baseline") else None,
            "passes": record["model"].get("passes"), "device_map": record["model"].get("device_map"),
            "weights_sha256": record["weights_sha256"], "table": record.get("table"), "result": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2"], choices=list(MODELS))
    parser.add_argument("--exps", nargs="+", default=["atlas", "prune_sw"], choices=list(EXP_ARGS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--write-llama1b", type=Path, help="write the random 1B-shape model there first")
    parser.add_argument("--results", type=Path, default=Path("/tmp/outlierlab_bench_offload"))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "offload")
    args = parser.parse_args()
    if args.write_llama1b:
        MODELS["llama1b"] = args.write_llama1b
        if not (args.write_llama1b / "config.json").is_file():
            write_llama1b(args.write_llama1b)
    cases = [run_case("tiny_llama", exp, "baseline", 0, args.results) for exp in args.exps]
    for model in args.models:
        budget = weights_bytes(MODELS[model]) // 4
        for exp in args.exps:
            for mode in args.modes:
                cases.append(run_case(model, exp, mode, budget, args.results))
                ours = [c for c in cases if c["model"] == model and c["exp"] == exp]
                same = {json.dumps([c.get("table"), c.get("weights_sha256")], sort_keys=True) for c in ours}
                for case in ours:
                    case["same_numbers_in_every_mode"] = len(same) == 1
                print(json.dumps({k: v for k, v in cases[-1].items() if k not in ("table", "device_map")}), flush=True)
                write(cases, args)  # after every case: a run cut short keeps what it measured
    print(write(cases, args))


COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def write(cases: list[dict], args) -> str:
    record = {"cases": cases, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "commit": COMMIT, "argv": sys.argv[1:],  # the code the cases ran, read when the benchmark started
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other "
                         "agents: timings are inflated and noisy)",
              "model_bytes": {m: weights_bytes(MODELS[m]) for m in args.models}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = ["| model | exp | mode | budget MiB | peak RSS MiB | wall s | passes | same numbers |", "|" + "---|" * 8]
    for c in cases:
        lines.append(f"| {c['model']} | {c['exp']} | {c['mode']} | {c.get('budget_mib') or '-'} | "
                     f"{c.get('peak_rss_mib', 'error')} | {c.get('wall_s', '-')} | "
                     f"{', '.join(sorted(set((c.get('passes') or {}).values()))) or '-'} | "
                     f"{c.get('same_numbers_in_every_mode', '-')} |")
    table = "\n".join(lines) + f"\n\n{record['machine']}; {record['date']}; commit {record['commit']}\n"
    args.out.with_suffix(".md").write_text(table)
    return table

if __name__ == "__main__":
    main()
