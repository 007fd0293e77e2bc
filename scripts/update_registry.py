"""Write the massive activations found by `+exp=ma_stats` back into the model's YAML (key `massive_activations:`).

    python scripts/update_registry.py results/ma_stats/smollm2_135m/bos_none.json \
        results/ma_stats/smollm2_135m/bos_prepend.json [--model-yaml conf/model/smollm2_135m.yaml] [--dry-run]

Only the `massive_activations:` block of the YAML is rewritten; every other line stays byte-for-byte. Entries
whose provenance starts with "detected (outlierlab" (earlier detections) are replaced; the others (the papers'
known MAs) are kept, and the new ones are written beside them. An entry groups the channels that are massive at
the same token role from the same first layer, in at least `registry.min_share` of the sequences of that run.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from outlierlab.results import read_result

ROOT = Path(__file__).resolve().parents[1]
KEY = "massive_activations"
DETECTED = "detected (outlierlab"
ROLE_NAMES = {"bos": "BOS", "first": "first token", "first_delimiter": "first delimiter",
              "delimiter": "delimiter", "other": "other tokens"}


def entries_from_result(record: dict, path: str, min_share: float | None = None) -> list[dict]:
    share = record["consistent_share"] if min_share is None else min_share
    groups: dict[tuple[str, int], list[dict]] = {}
    for location in record["locations"]:
        if location["kind"] == "consistent" and location["peak_share"] >= share:
            groups.setdefault((location["role"], location["first_layer"]), []).append(location)
    commit = (record.get("git") or {}).get("commit") or "unknown"
    protocol = record["evaluations"]["exp.data.corpus"]
    entries = []
    for (role, first_layer), locations in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        peaks = "; ".join(
            f"ch {loc['channel']}: {loc['value_at_first_layer']:.4g} after layers[{first_layer}], peak "
            f"{loc['peak_mean']:.4g} (std {loc['peak_std']:.3g}) after layers[{loc['peak_layer']}], "
            f"{loc['peak_ratio_to_median']:.3g}x median, in {loc['peak_share']:.0%} of sequences"
            + (f", tokens {', '.join(repr(t) for t, _ in loc['tokens'][:3])}" if role == "other" else "")
            for loc in locations)
        entries.append({
            "first_layer": first_layer,
            "tokens": [ROLE_NAMES[role]],
            "channels": sorted(loc["channel"] for loc in locations),
            "bos": record["bos"],
            "provenance": (f"{DETECTED} ma_stats, {path}, {protocol['windows']} x {protocol['seqlen']} tokens of "
                           f"{protocol['dataset']}, commit {commit[:10]}): {peaks}"),
        })
    return entries


def render(entries: list[dict]) -> str:
    if not entries:
        return f"{KEY}: []\n"
    lines = [f"{KEY}:"]
    for entry in entries:
        for index, (key, value) in enumerate(entry.items()):
            prefix = "  - " if index == 0 else "    "
            if isinstance(value, list):
                text = "[" + ", ".join(json.dumps(v) if isinstance(v, str) else str(v) for v in value) + "]"
            elif isinstance(value, str):
                text = json.dumps(value, ensure_ascii=False)
            else:
                text = json.dumps(value)
            lines.append(f"{prefix}{key}: {text}")
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """`text` with its top-level `massive_activations:` block (the key line and every indented or comment line
    after it) replaced by `block`; appended at the end when the key is absent."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(rf"^{KEY}\s*:", line)), None)
    if start is None:
        return text + ("" if text.endswith("\n") else "\n") + block
    end = start + 1
    while end < len(lines) and (lines[end].startswith((" ", "\t", "-")) or not lines[end].strip()):
        end += 1
    return "".join(lines[:start]) + block + "".join(lines[end:])


def update(model_yaml: Path, results: list[Path], min_share: float | None = None) -> tuple[str, list[dict]]:
    text = model_yaml.read_text()
    current = yaml.safe_load(text) or {}
    kept = [e for e in current.get(KEY) or [] if not str(e.get("provenance", "")).startswith(DETECTED)]
    new = []
    for path in results:
        record = read_result(path)
        if record["model"]["name"] != current.get("name"):
            raise ValueError(f"{path} is a result for model '{record['model']['name']}', "
                             f"not for {model_yaml} ('{current.get('name')}')")
        shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
        new += entries_from_result(record, str(shown), min_share)
    updated = replace_block(text, render(kept + new))
    check = yaml.safe_load(updated)
    assert {k: v for k, v in check.items() if k != KEY} == {k: v for k, v in current.items() if k != KEY}
    assert check[KEY] == kept + new or (not check[KEY] and not kept + new)
    return updated, kept + new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="result JSONs of +exp=ma_stats for one model")
    parser.add_argument("--model-yaml", type=Path, help="default: conf/model/<model name>.yaml")
    parser.add_argument("--min-share", type=float, help="only locations whose peak is in at least this share of sequences")
    parser.add_argument("--dry-run", action="store_true", help="print the new block, write nothing")
    args = parser.parse_args()
    for path in args.results:
        if not path.is_file():
            sys.exit(f"error: {path} does not exist")
    model = read_result(args.results[0])["model"]["name"]
    target = args.model_yaml or ROOT / "conf" / "model" / f"{model}.yaml"
    if not target.is_file():
        sys.exit(f"error: {target} does not exist")
    try:
        updated, entries = update(target, args.results, args.min_share)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if args.dry_run:
        print(render(entries), end="")
        return
    target.write_text(updated)
    print(f"{target}: {len(entries)} massive_activations entries")


if __name__ == "__main__":
    main()
