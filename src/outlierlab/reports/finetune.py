"""Outlier-guided fine-tuning (issue 17): one table and one figure per (model, task) from results/finetune alone.

    results/finetune/<model>/<task>_<method>_s<seed>.json -> tables/finetune_<model>_<task>   (one row per method)
                                                          -> figures/finetune_<model>_<task> (metric, W8A8, survival,
                                                                                              loss)

A row aggregates a method's seeds: every compared number is the mean over seeds ± their standard deviation (`<key>_sd`,
only when n >= 2), n = the seed count. `ppl_ratio` is the method's WikiText-2 PPL over the reference method's (`full`)
at the same seed, the ratio's mean over seeds; its interval, the span of the per-seed paired bootstrap intervals over
the same windows (evals/ppl.ratio_interval). `separated` is the rule prose ranks by.
"""
from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from outlierlab.evals.ppl import ratio_interval
from outlierlab.figures import plt, save_figure
from outlierlab.reports import register, table_of
from outlierlab.results import read_result
from outlierlab.tables import Column, Table, interval_key, std_key, write_table

ORDER = ("full", "lora", "norm_only", "lisa", "owl_lisa", "outlier_guided", "outlier_protected", "owlore")
REFERENCE = "full"  # the method every PPL ratio is taken to
# compared per-seed numbers: key -> label (mean ± std over seeds)
COMPARED = {"acc": "acc", "ppl": "PPL", "w8a8": "W8A8", "ma_after": "MA after", "loss_final": "final train loss"}
BEFORE = {"acc_before": "acc before", "ppl_before": "PPL before", "w8a8_before": "W8A8 before"}  # same for all seeds
KEPT = {"sw_kept": "SW kept", "ma_kept": "MA kept", "gamma_outliers_kept": "gamma outliers kept",
        "channel_outliers_kept": "channel outliers kept"}


def seed_of(record: dict) -> int | None:
    """The record's training seed: recorded by the study, else (older records) the run's configured seed."""
    seed = record["finetune"].get("seed")
    if seed is None:
        config = record.get("config") or {}
        seed = (config.get("exp") or {}).get("seed", config.get("seed"))
    return None if seed is None else int(seed)


def _groups(results_dir: Path) -> dict[str, dict[str, list[dict]]]:
    """"<model>_<task>" -> method (in ORDER, then by name) -> its records, one per seed (by seed). A record without a
    seed is skipped, and of two records of one (method, seed) the one whose tag names the seed is kept: both said."""
    groups = defaultdict(lambda: defaultdict(dict))
    for path in sorted(Path(results_dir).glob("finetune/*/*.json")):
        record = read_result(path)
        seed, method = seed_of(record), record["finetune"]["method"]["name"]
        if seed is None:
            print(f"finetune report: skipping {path}: it records no seed", file=sys.stderr)
            continue
        seeds = groups[f"{path.parent.name}_{record['finetune']['task']['name']}"][method]
        if seed in seeds:
            keep = record if str(record.get("run_tag", "")).endswith(f"_s{seed}") else seeds[seed]
            print(f"finetune report: two records of {method} seed {seed}; keeping {keep.get('run_tag')}",
                  file=sys.stderr)
            record = keep
        seeds[seed] = record
    def rank(name):
        return (ORDER.index(name) if name in ORDER else len(ORDER), name)
    return {key: {name: [seeds[s] for s in sorted(seeds)] for name, seeds in sorted(methods.items(),
                                                                                       key=lambda i: rank(i[0]))}
            for key, methods in sorted(groups.items())}


def _finite(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else float("nan")


def per_seed(record: dict) -> dict:
    """The compared numbers of one record (one seed)."""
    row = table_of(record).rows[0]
    values = {key: row.get(key) for key in COMPARED if key in row}
    values["loss_final"] = record["history"][-1]["loss"] if record.get("history") else None
    return values


def mean_std(values: list) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None when n < 2, n) of the finite values."""
    finite = [v for v in values if math.isfinite(_finite(v))]
    if not finite:
        return None, None, 0
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) >= 2 else None, len(finite)


def _window_nll(record: dict) -> list[float] | None:
    ppl = record["after"].get("ppl") or {}
    entry = next(iter(ppl.values()), None)
    return entry.get("window_nll") if entry else None


def paired(records: list[dict], baseline: list[dict]) -> list[dict]:
    """Per seed both have: the PPL ratio records/baseline and its paired bootstrap interval over the same windows."""
    by_seed = {seed_of(r): r for r in baseline}
    out = []
    for record in records:
        other = by_seed.get(seed_of(record))
        nll, base = _window_nll(record), _window_nll(other) if other else None
        if nll is None or base is None:
            continue
        ratio = math.exp(statistics.fmean(nll) - statistics.fmean(base))
        out.append({"seed": seed_of(record), "ratio": ratio, "ci": ratio_interval(nll, base)})
    return out


def separated(a: list[dict], b: list[dict], key: str = "ppl") -> bool:
    """Methods a and b (their records, one per seed) are separated on `key` when both have >= 2 seeds, their
    mean ± std ranges do not overlap and, for key "ppl", at every shared seed the paired bootstrap interval of the
    PPL ratio a/b excludes 1 (and there is at least one shared seed). Prose ranks only separated methods."""
    (mean_a, std_a, n_a), (mean_b, std_b, n_b) = (mean_std([per_seed(r).get(key) for r in rs]) for rs in (a, b))
    if n_a < 2 or n_b < 2:
        return False
    if not (mean_a + std_a < mean_b - std_b or mean_b + std_b < mean_a - std_a):
        return False
    if key != "ppl":
        return True
    intervals = [entry["ci"] for entry in paired(a, b)]
    return bool(intervals) and all(low > 1 or high < 1 for low, high in intervals)


def row(name: str, records: list[dict], reference: list[dict] | None) -> dict:
    """One method's row: mean ± std over its seeds of every compared number, n, and the PPL ratio to reference."""
    first = table_of(records[0]).rows[0]
    out = {"method": name, "n": len(records), "trainable": first["trainable"],
           "trainable_at_once": first["trainable_at_once"]}
    out.update({key: first[key] for key in BEFORE if key in first})
    seeds = [per_seed(record) for record in records]
    for key in COMPARED:
        mean, std, _n = mean_std([values.get(key) for values in seeds])
        if mean is not None:
            out[key], out[std_key(key)] = mean, std
    if reference and name != REFERENCE:
        ratios = paired(records, reference)
        if ratios:
            out["ppl_ratio"] = statistics.fmean(entry["ratio"] for entry in ratios)
            lows, highs = [e["ci"][0] for e in ratios], [e["ci"][1] for e in ratios]
            if all(math.isfinite(v) for v in lows + highs):
                out[interval_key("ppl_ratio")] = [min(lows), max(highs)]
    for key in KEPT:  # a count per seed: shown once when every seed agrees
        values = list(dict.fromkeys(str(table_of(r).rows[0].get(key)) for r in records))
        out[key] = "; ".join(values)
    out["wall_s"] = statistics.fmean(r["wall_time_s"] for r in records)
    return out


def table(methods: dict[str, list[dict]]) -> Table:
    reference = methods.get(REFERENCE)
    rows = [row(name, records, reference) for name, records in methods.items()]
    present = {key for r in rows for key in r}
    specs = [("method", "method"), ("n", "n seeds"), ("trainable", "trainable"),
             ("trainable_at_once", "trainable at once"), *BEFORE.items(), *COMPARED.items(),
             ("ppl_ratio", f"PPL / {REFERENCE}"), *KEPT.items(), ("wall_s", "wall s")]
    return Table([Column(key, label) for key, label in specs if key in present], rows, index="method")


def quantization_protocol(quantization: dict) -> str:
    """What a record's `quantization` block quantized, in words: "INT8 weights per channel + INT8 activations per
    token (dynamic range)"."""
    parts = []
    for step in quantization.values():
        if "weights" in step:
            parts.append(f"INT{step['bits']} weights {step['weights'].replace('_', ' ')}")
        elif "activations" in step:
            parts.append(f"INT{step['bits']} activations {step['activations'].replace('_', ' ')}"
                         + (f" ({step['range']} range)" if step.get("range") else ""))
    return " + ".join(parts) or "none"


def tables(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for stem, methods in _groups(results_dir).items():
        built = table(methods)
        records = [r for rs in methods.values() for r in rs]
        first = records[0]
        settings, task = first["finetune"]["settings"], first["finetune"]["task"]
        caption = (f"Fine-tuning {first['model']['name']} ({first['model'].get('kind')} weights), task {task['name']}: "
                   f"{settings['steps']} steps x {settings['batch_size']} x <= {task['seqlen']} tokens, AdamW "
                   f"(warm-up {settings['warmup_steps']} + cosine), the same batches for every method at one seed; "
                   f"PPL = WikiText-2 ({first['eval']}), W8A8 = {quantization_protocol(first.get('quantization') or {})}. "
                   "Each value after fine-tuning is the mean ± standard deviation over the method's n seeds (no ± "
                   f"when n = 1). PPL / {REFERENCE}: the ratio to {REFERENCE}'s PPL at the same seed, mean over seeds "
                   "[lowest, highest bound of the per-seed paired bootstrap intervals over the same windows]. "
                   "Learning rate per method: "
                   + ", ".join(f"{name} {rs[0]['finetune']['method']['lr']}" for name, rs in methods.items())
                   + ". trainable = elements trained over the run (LISA: union of sampled blocks), at once = in one "
                     "step; SW kept = super weights still detected afterwards; MA kept = the massive activation "
                     "still massive in the same channel; outliers kept = before's outliers still found after (per "
                     "seed, '; ' between seeds that differ); wall s = mean per run.")
        written += write_table(built.with_caption(caption), Path(out_dir) / f"finetune_{stem}")
    return written


def _metric(record: dict) -> tuple[str, str, str]:
    row = table_of(record).rows[0]
    if "acc" in row:
        return "held-out BoolQ acc (%)", "acc_before", "acc"
    return "WikiText-2 PPL", "ppl_before", "ppl"


def _survival(record: dict) -> tuple[float, float]:
    kept = record["survival"]
    weights = list(kept["super_weights"].values())
    sw = sum(w["value_after"] / w["value_before"] for w in weights) / len(weights) if weights else float("nan")
    ma = abs(kept["ma_after"]) / abs(kept["ma_before"]) if kept["ma_before"] else float("nan")
    return sw, ma


def _bars(axis, x, rows, key, **style):
    axis.bar(x, [_finite(r.get(key)) for r in rows], yerr=[_finite(r.get(std_key(key)) or 0.0) for r in rows],
             capsize=3, **style)


def figures(results_dir: Path, out_dir: Path) -> list[Path]:
    written = []
    for stem, methods in _groups(results_dir).items():
        names, rows = list(methods), table(methods).rows
        first = next(iter(methods.values()))[0]
        label, before_key, key = _metric(first)
        figure, axes = plt.subplots(1, 4, figsize=(17, 4))
        x = list(range(len(names)))
        # 1. task metric vs trainable parameters (mean ± std over seeds)
        axis = axes[0]
        for r in rows:
            axis.errorbar(r["trainable"], _finite(r.get(key)), yerr=_finite(r.get(std_key(key)) or 0.0), fmt="o",
                          ms=5, capsize=3)
            axis.annotate(f"{r['method']} (n={r['n']})", (r["trainable"], _finite(r.get(key))), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
        if rows[0].get(before_key) is not None:
            axis.axhline(rows[0][before_key], color="grey", linestyle=":", label="before fine-tuning")
            axis.legend(fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel("trainable elements (log)")
        axis.set_ylabel(label)
        axis.set_title("task metric after fine-tuning (mean ± std over seeds)", fontsize=9)
        axis.grid(alpha=0.3, which="both")
        # 2. W8A8 PPL after, vs before
        axis = axes[1]
        _bars(axis, x, rows, "w8a8", color="tab:orange")
        axis.axhline(_finite(rows[0].get("w8a8_before")), color="grey", linestyle=":", label="before fine-tuning")
        axis.set_yscale("log")
        axis.set_xticks(x, names, rotation=40, ha="right", fontsize=7)
        axis.set_ylabel("W8A8 PPL (WikiText-2, log)")
        axis.set_title("simulated W8A8 after fine-tuning (mean ± std)", fontsize=9)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3, which="both", axis="y")
        # 3. survival: super weight value and MA magnitude, relative to before (mean over seeds)
        axis = axes[2]
        ratios = [[_survival(r) for r in methods[name]] for name in names]
        sw_ratio = [statistics.fmean(s for s, _m in seeds) for seeds in ratios]
        ma_ratio = [statistics.fmean(m for _s, m in seeds) for seeds in ratios]
        width = 0.38
        axis.bar([i - width / 2 for i in x], sw_ratio, width, label="super weight value (mean ratio)")
        axis.bar([i + width / 2 for i in x], ma_ratio, width, label="|massive activation| (ratio)")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(x, names, rotation=40, ha="right", fontsize=7)
        axis.set_ylabel("after / before (mean over seeds)")
        axis.set_title("do the outliers survive?", fontsize=9)
        axis.legend(fontsize=7)
        values = [v for v in sw_ratio + ma_ratio if math.isfinite(v)]
        if values:
            spread = max(abs(v - 1) for v in values)
            axis.set_ylim(1 - 1.5 * spread - 1e-4, 1 + 1.5 * spread + 1e-4)
        # 4. training loss: one line per method, the mean over seeds at each step
        axis = axes[3]
        for name in names:
            curves = [[h["loss"] for h in r["history"]] for r in methods[name]]
            steps = [h["step"] for h in methods[name][0]["history"]][:min(map(len, curves))]
            axis.plot(steps, [statistics.fmean(c[i] for c in curves) for i in range(len(steps))], label=name,
                      linewidth=1)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss (mean over seeds)")
        axis.set_title("training loss (same batches for every method at a seed)", fontsize=9)
        axis.legend(fontsize=6)
        axis.grid(alpha=0.3)
        settings = first["finetune"]["settings"]
        seeds = sorted({seed_of(r) for rs in methods.values() for r in rs})
        figure.suptitle(f"Fine-tuning {first['model']['name']}, task {first['finetune']['task']['name']}: "
                        f"{settings['steps']} steps x {settings['batch_size']} x <= "
                        f"{first['finetune']['task']['seqlen']} tokens, seeds {seeds}", fontsize=10)
        figure.tight_layout()
        written += save_figure(figure, Path(out_dir) / f"finetune_{stem}")
    return written


register("finetune", tables=tables, figures=figures)
