"""One prepared command for a lent GPU (one H100/H200, <= 10 minutes): the from-scratch contrast and the CUDA costs.

    python -m outlierlab.gpu_check --prepare    # HERE (../shared/data, PyPI): .gpu_check/ = token shard + wheels
    bash scripts/gpu_check.sh                   # THERE (no network): installs the carried wheels, runs this module
    python -m outlierlab.gpu_check --prepare --smoke && python -m outlierlab.gpu_check --smoke   # the same path on
                                                # the CPU, tiny sizes, a few minutes (tests/test_gpu_check.py)

What a run does, within --budget-s seconds (default 500, of the device tool's 600 s per command):
1. the benchmark (scripts/bench.py, its own process): random weights of Llama-7B's shape in bf16; a plain forward vs
   our probes vs nnsight vs host-copy hooks vs hidden_states, ratios in one run; tokens/s and MFU of the library's
   perplexity evaluation; peak memory of every probe in a fresh process.
2. the contrast: +exp=pretrain at train/size=gpu_check (bf16 autocast, torch.compile: the preset's compile=auto)
   for vanilla and kv_bias, then the newer variants in PRIORITY order while the budget lasts (same token shard, same
   steps, same seed). A variant is skipped when the slowest one so far (x1.25) would overrun; the first two
   (vanilla and kv_bias, the contrast) always run. A variant that fails is recorded with its error (and, on CUDA, retried once without torch.compile).
3. +exp=variants_table over the variants trained.
4. everything under results/gpu_check/<device>/ (pretrain/, variants_table/, bench/, summary.json, summary.md);
   --archive PATH packs that folder into one .tar.gz (what the device tool brings back from $OUT). Summary and
   archive are rewritten after every stage, so a run stopped at the device's limit keeps what it finished.

Why so: the device machine receives only the working tree (tracked + untracked-not-ignored files + at most 8 carried
ignored paths, 64 MiB in all) and reaches no network. Its image has python3 (3.12) with torch (CUDA), transformers,
tokenizers, safetensors, tqdm, numpy and matplotlib, but not hydra-core, omegaconf, antlr4 or nnsight and nnsight's
pydantic, zstandard, greenlet, websocket-client (/work/.library/device/KINDS.md). So --prepare (here) writes to the
git-ignored .gpu_check/, never into the repository: (a) a token shard cut from ../shared/data with the gpu_check
preset's data settings (tokenizer + lzma-compressed int16 ids, train/data.py write_shard); (b) those packages at the
lock's versions as CPython 3.12 manylinux wheels (antlr4 is an sdist only: built here into a pure-Python wheel).
torch and transformers are the image's own, a different release from the lock; every record names the versions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKDIR = ROOT / ".gpu_check"
# vanilla and kv_bias are the contrast (paper MA); then the newer variants, fastest first (softpick and sigmoid
# attention are computed explicitly, not by SDPA).
PRIORITY = ("vanilla", "kv_bias", "gated_elementwise", "ssnorm", "softpick", "sigmoid")
ALWAYS = 2
PREPARED = "prepared.json"
# What the device image lacks (KINDS.md), carried as wheels at the lock's versions.
CARRIED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "nnsight", "pydantic", "pydantic-core",
           "annotated-types", "typing-inspection", "zstandard", "greenlet", "websocket-client")
SOURCE_ONLY = ("antlr4-python3-runtime",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# The tiny preset shrunk to seconds per variant on 2 CPU cores (as tests/test_train.py shrinks it).
SMOKE_SIZE = ("train.size.steps=4", "train.size.warmup_steps=1", "train.size.eval_every=2",
              "train.size.checkpoint_every=4", "train.size.seqlen=32", "train.size.batch_size=4",
              "train.size.val_windows=4", "train.size.eval_batch_size=4", "train.size.compile=off",
              "train.size.architecture.hidden_size=32", "train.size.architecture.intermediate_size=64",
              "train.size.architecture.num_hidden_layers=2", "train.size.architecture.num_attention_heads=2",
              "train.size.architecture.num_key_value_heads=2")
SMOKE_DATA = ("train.size.data.max_chars=100000", "train.size.data.vocab_size=400", "train.size.data.val_documents=5")
BENCH_CUDA = ("--device", "cuda", "--dtype", "bfloat16", "--shape", "llama7b", "--seqlen", "512", "--repeats", "7",
              "--memory-sequences", "10", "--ppl-windows", "32", "--ppl-seqlen", "2048", "--ppl-batch", "8")
BENCH_SMOKE = ("--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--seqlen", "64", "--repeats", "2",
               "--memory-sequences", "2", "--memory-seqlen", "32", "--ppl-windows", "4", "--ppl-seqlen", "64",
               "--ppl-batch", "2")


@dataclass(frozen=True)
class Mode:
    """Everything that differs between the device run and the CPU smoke run."""
    smoke: bool
    workdir: Path
    results: Path  # results/gpu_check/<device label>
    scratch: Path  # checkpoints and caches (git-ignored outputs/gpu_check/<device label>)
    size: str
    size_overrides: tuple[str, ...]
    bench: tuple[str, ...]
    variants: tuple[str, ...] = PRIORITY
    bench_timeout_s: int = 240
    table_reserve_s: int = 60

    @property
    def shard(self) -> Path:
        return self.workdir / ("shard_smoke" if self.smoke else "shard")

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"


def device_label(smoke: bool) -> str:
    """cpu_smoke, or the GPU's name as a file name (nvidia_h200); cpu where there is none (--prepare)."""
    if smoke:
        return "cpu_smoke"
    import torch
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


def make_mode(args) -> Mode:
    label = device_label(args.smoke)
    default_results = ROOT / ("outputs/gpu_check_smoke" if args.smoke else "results/gpu_check")
    results = Path(args.results or default_results) / label
    return Mode(smoke=args.smoke, workdir=Path(args.workdir), results=results, scratch=Path(args.scratch) / label,
                size="tiny" if args.smoke else "gpu_check",
                size_overrides=SMOKE_SIZE + SMOKE_DATA if args.smoke else (),
                bench=BENCH_SMOKE if args.smoke else BENCH_CUDA,
                variants=tuple(args.variants.split(",")) if args.variants else PRIORITY)


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def base_overrides(mode: Mode) -> list[str]:
    return [f"train/size={mode.size}", *mode.size_overrides, f"train.size.data.shard={mode.shard}",
            f"paths.results_dir={mode.results}", f"paths.checkpoints_dir={mode.scratch / 'checkpoints'}",
            f"paths.cache_dir={mode.scratch / 'cache'}", f"model.device={mode.device}", "logger=none",
            "~eval.ppl"]  # pretraining and the variants table evaluate no corpus: none needs to be there


# ---------------------------------------------------------------------------------------------------- --prepare


def prepare_shard(mode: Mode, data_dir: str | None) -> dict:
    """The token shard of the run's preset, cut from the corpus in paths.data_dir (cached tokenisation reused)."""
    from outlierlab.train.data import prepare, write_shard
    overrides = [f"train/size={mode.size}", *mode.size_overrides, "+exp=pretrain"]
    if data_dir:
        overrides.append(f"paths.data_dir={data_dir}")
    cfg = compose(overrides)
    streams = prepare(cfg.train.size.data, cfg.paths.data_dir, cfg.paths.cache_dir)
    return write_shard(streams, mode.shard)


def lock_versions(names) -> dict[str, str]:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", (ROOT / "requirements" / "lock.txt").read_text(), re.M))
    lowered = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins.items()}
    missing = [name for name in names if name not in lowered]
    if missing:
        raise SystemExit(f"error: requirements/lock.txt pins no version of {', '.join(missing)}")
    return {name: lowered[name] for name in names}


def prepare_wheels(workdir: Path) -> list[str]:
    """CARRIED at the lock's versions as CPython 3.12 x86-64 wheels in <workdir>/wheels (PyPI, through pip)."""
    target = workdir / "wheels"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    for name, version in lock_versions(CARRIED).items():
        if name in SOURCE_ONLY:
            command = [*pip, "wheel", "--no-deps", "-w", str(target), f"{name}=={version}"]
        else:
            platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
            command = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                       "--implementation", "cp", *platforms, "-d", str(target), f"{name}=={version}"]
        subprocess.run(command, check=True)
    return sorted(path.name for path in target.glob("*.whl"))


def folder_mib(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 2 ** 20


def run_prepare(mode: Mode, data_dir: str | None) -> None:
    """The shard (and, for the device, the wheels), and prepared.json: what was prepared from which commit (the
    device's copy of the tree has no git history to ask)."""
    import datetime
    from outlierlab.results import git_state
    shard = prepare_shard(mode, data_dir)
    print(f"token shard: {mode.shard} ({shard['tokens']['train']:,} train / {shard['tokens']['val']:,} val tokens, "
          f"{shard['shard_bytes'] / 2 ** 20:.1f} MiB)")
    wheels = [] if mode.smoke else prepare_wheels(mode.workdir)
    if wheels:
        print(f"wheels: {mode.workdir / 'wheels'} ({len(wheels)}: {', '.join(wheels)})")
    prepared = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "git": git_state(ROOT), "shard": shard, "wheels": wheels}
    (mode.workdir / PREPARED).write_text(json.dumps(prepared, indent=1) + "\n")
    print(f"{mode.workdir}: {folder_mib(mode.workdir):.1f} MiB to carry (the working tree and carried paths travel "
          f"together, 64 MiB at most)")


# ---------------------------------------------------------------------------------------------------------- run


def run_bench(mode: Mode, deadline: float) -> dict:
    """scripts/bench.py in its own process (its GPU memory is freed when it ends), within its timeout."""
    out = mode.results / "bench"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), *mode.bench, "--out", str(out)]
    timeout = max(30.0, min(mode.bench_timeout_s, deadline - time.time()))
    started = time.time()
    try:
        subprocess.run(command, check=True, timeout=timeout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        return {"error": f"{type(error).__name__}: {error}", "seconds": round(time.time() - started, 1)}
    written = next(out.glob("*.json"))
    record = json.loads(written.read_text())
    return {"seconds": round(time.time() - started, 1), "file": str(written.relative_to(mode.results)),
            "cases": {name: {key: row[key] for key in ("ratio_to_plain", "median_ms", "tokens_per_s", "mfu")}
                      for name, row in record["cases"].items()},
            "unavailable": record.get("unavailable"), "ppl_eval": record.get("ppl_eval"),
            "memory": record.get("memory")}


def pretrain_overrides(mode: Mode, variant: str) -> list[str]:
    return ["+exp=pretrain", *base_overrides(mode), f"train/variant={variant}"]


def preflight_all(mode: Mode) -> None:
    """Every variant's configuration checked before anything runs: a bad one stops the check in seconds."""
    from outlierlab.runner import preflight
    for variant in mode.variants:
        preflight(compose(pretrain_overrides(mode, variant)))


def train_one(mode: Mode, variant: str) -> dict:
    """+exp=pretrain for one variant through the runner; on CUDA a failure is retried once without torch.compile."""
    from outlierlab.runner import execute
    overrides = pretrain_overrides(mode, variant)
    started = time.time()
    try:
        record = execute(compose(overrides))
        note = None
    except Exception as error:  # noqa: BLE001 - a variant that fails is a finding, the check goes on
        traceback.print_exc()
        if mode.smoke:
            raise
        note = f"failed with torch.compile ({type(error).__name__}: {str(error)[:300]}); rerun without it"
        record = execute(compose([*overrides, "train.size.compile=off"]))
    training = record["training"]
    last = [entry for entry in record["history"] if "val_loss" in entry][-1]
    return {"seconds": round(time.time() - started, 1), "steps": training["steps"],
            "tokens_per_second": training["tokens_per_second"], "val_loss": last["val_loss"],
            "max_abs_h": last["peak"]["abs"], "note": note,
            "peak_by_step": {entry["step"]: entry["peak"]["abs"] for entry in record["history"] if "peak" in entry}}


def train_variants(mode: Mode, deadline: float, saved=lambda runs: None) -> dict:
    """The variants in priority order while the budget lasts ({variant: outcome or {"skipped"|"error": why}});
    `saved(runs)` after each, so a run stopped from outside keeps what was done."""
    runs, durations = {}, []
    for index, variant in enumerate(mode.variants):
        estimate = 1.25 * max(durations) if durations else 0.0
        left = deadline - time.time() - mode.table_reserve_s
        if index >= ALWAYS and estimate > left:
            runs[variant] = {"skipped": f"time budget: ~{estimate:.0f} s needed, {max(left, 0):.0f} s left"}
            continue
        try:
            runs[variant] = train_one(mode, variant)
            durations.append(runs[variant]["seconds"])
        except Exception as error:  # noqa: BLE001 - recorded; the other variants still run
            traceback.print_exc()
            if mode.smoke:
                raise
            runs[variant] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        saved(runs)
    return runs


def variants_table(mode: Mode, trained: list[str]) -> dict:
    from outlierlab.runner import execute
    overrides = ["+exp=variants_table", *base_overrides(mode), f"exp.train_variants=[{','.join(trained)}]"]
    record = execute(compose(overrides))
    keys = ("val_loss", "fp_ppl", "w8a8_ppl", "max_inf_norm", "avg_kurtosis", "max_abs_h", "layer",
            "top1_over_median", "peak", "massive")
    return {row["variant"]: {key: row.get(key) for key in keys} for row in record["table"]["rows"]}


def environment() -> dict:
    import torch
    from outlierlab.results import library_versions
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, **library_versions()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    return info


def summary_markdown(summary: dict) -> str:
    prepared_at = ((summary["prepared"] or {}).get("git") or {}).get("commit") or "unknown"
    lines = [f"# GPU check on {summary['device']} ({summary['created']})", "",
             f"{summary['wall_s']:.0f} s of a {summary['budget_s']} s budget; torch {summary['environment']['torch']}, "
             f"transformers {summary['environment'].get('transformers')}; commit {summary['git_commit']} (shard and "
             f"wheels prepared at {prepared_at[:10]}).", "",
             "## Pretraining contrast (train/size=" + summary["size"] + ")", "",
             "| variant | s | tokens/s | val loss | max abs(h) | top1/median | peak | massive | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, run in summary["training"].items():
        row = summary["table"].get(variant, {})
        why = run.get("skipped") or run.get("error") or run.get("note") or ""
        fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
        lines.append(f"| {variant} | {fmt(run.get('seconds'), '.0f')} | {fmt(run.get('tokens_per_second'), '.0f')} | "
                     f"{fmt(row.get('val_loss'), '.3f')} | {fmt(row.get('max_abs_h'), '.1f')} | "
                     f"{fmt(row.get('top1_over_median'), '.0f')} | {row.get('peak', '-')} | "
                     f"{row.get('massive', '-')} | {why} |")
    bench = summary["bench"]
    lines += ["", "## Benchmark (scripts/bench.py " + " ".join(summary["bench_args"]) + ")", ""]
    if "error" in bench:
        lines.append(f"failed: {bench['error']}")
    else:
        lines += ["| case | x plain | median ms | tokens/s |", "|---|---|---|---|"]
        lines += [f"| {name} | {row['ratio_to_plain']:.3f} | {row['median_ms']:.1f} | {row['tokens_per_s']:.0f} |"
                  for name, row in bench["cases"].items()]
        ppl = bench.get("ppl_eval")
        if ppl:
            mfu = "-" if ppl["mfu"] is None else f"{ppl['mfu']:.1%}"
            lines += ["", f"PPL evaluation: {ppl['tokens_per_s']:.0f} tokens/s, MFU {mfu} ({ppl['windows']} x "
                          f"{ppl['seqlen']} tokens, batch {ppl['batch']})."]
        if bench.get("unavailable"):
            lines += ["", "Left out: " + "; ".join(f"{k} ({v})" for k, v in bench["unavailable"].items())]
    return "\n".join(lines) + "\n"


def archive(folder: Path, path: Path) -> None:
    """folder as one .tar.gz whose members are relative to the repository root (results/gpu_check/<device>/...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")  # a run killed while packing leaves the previous archive
    with tarfile.open(staging, "w:gz") as tar:
        tar.add(folder, arcname=str(folder.resolve().relative_to(ROOT)) if folder.resolve().is_relative_to(ROOT)
                else folder.name)
    os.replace(staging, path)


def prepared(mode: Mode) -> dict | None:
    path = mode.workdir / PREPARED
    return json.loads(path.read_text()) if path.is_file() else None


def run_check(mode: Mode, budget_s: float, archive_to: Path | None = None) -> dict:
    """Bench, contrast, table; the summary (and the archive) rewritten after every stage."""
    import datetime
    from outlierlab.results import git_state
    started = time.time()
    deadline = started + budget_s
    preflight_all(mode)
    mode.results.mkdir(parents=True, exist_ok=True)
    summary = {"device": mode.results.name, "size": mode.size, "smoke": mode.smoke, "budget_s": budget_s,
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "git_commit": (git_state(ROOT).get("commit") or "unknown")[:10], "prepared": prepared(mode),
               "environment": environment(), "bench_args": list(mode.bench), "bench": {"error": "not run yet"},
               "training": {}, "table": {}, "wall_s": 0.0}

    def save(**stage) -> None:
        summary.update(stage, wall_s=round(time.time() - started, 1))
        (mode.results / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        (mode.results / "summary.md").write_text(summary_markdown(summary))
        if archive_to is not None:
            archive(mode.results, archive_to)

    save(bench=run_bench(mode, deadline - mode.table_reserve_s - 60))
    training = train_variants(mode, deadline, saved=lambda runs: save(training=runs))
    trained = [variant for variant, run in training.items() if "steps" in run]
    save(training=training, table=variants_table(mode, trained) if trained else {})
    print(summary_markdown(summary))
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true", help="write the token shard (and the wheels) to --workdir")
    parser.add_argument("--smoke", action="store_true", help="the whole path on the CPU, tiny sizes")
    parser.add_argument("--workdir", default=str(WORKDIR), help="shard and wheels (git-ignored; carried to the GPU)")
    parser.add_argument("--data-dir", default=None, help="--prepare: the corpus folder (default paths.data_dir)")
    parser.add_argument("--results", default=None, help="default results/gpu_check (smoke: outputs/gpu_check_smoke)")
    parser.add_argument("--scratch", default=str(ROOT / "outputs" / "gpu_check"), help="checkpoints and caches")
    parser.add_argument("--variants", default=None,
                        help=f"comma list in priority order, the first two always run (default {','.join(PRIORITY)})")
    parser.add_argument("--budget-s", type=float, default=500.0, help="seconds for the whole run (device limit 600)")
    parser.add_argument("--archive", default=None,
                        help="also pack the results folder into this .tar.gz (rewritten after every stage)")
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    mode = make_mode(args)
    if args.prepare:
        run_prepare(mode, args.data_dir)
        return None
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            print("error: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
            sys.exit(2)
    from outlierlab.train.data import SHARD_TOKENS
    if not (mode.shard / SHARD_TOKENS).is_file():
        print(f"error: no token shard in {mode.shard}: run `python -m outlierlab.gpu_check --prepare"
              f"{' --smoke' if mode.smoke else ''}` where ../shared/data is", file=sys.stderr)
        sys.exit(2)
    from outlierlab.errors import USER_ERRORS
    try:
        summary = run_check(mode, args.budget_s, Path(args.archive) if args.archive else None)
    except USER_ERRORS as error:  # a configuration or data error: one line, exit 2 (as run.py)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if args.archive:
        print(f"archive: {args.archive}")
    return summary


if __name__ == "__main__":
    main()
