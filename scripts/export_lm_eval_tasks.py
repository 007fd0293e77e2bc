"""Write lm-eval task YAMLs (`local_<task>`) that include the official task and point it at the local data, so that
lm-eval's own command line can be run on exactly what outlierlab's bridge evaluates:

    python scripts/export_lm_eval_tasks.py --out /tmp/outlierlab_tasks
    lm_eval --model hf --model_args pretrained=<model dir>,dtype=float32 --include_path /tmp/outlierlab_tasks \\
        --tasks local_arc_easy,local_arc_challenge,local_winogrande,local_piqa --num_fewshot 0 --limit 25 --batch_size 8
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml
from lm_eval.tasks import TaskManager

from outlierlab.evals.zeroshot import LOCAL_TASKS, local_overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data-dir", default=os.environ.get("OUTLIERLAB_DATA_DIR", "../shared/data"))
    parser.add_argument("--cache-dir", default=os.environ.get("OUTLIERLAB_CACHE_DIR", "~/.cache/outlierlab"))
    args = parser.parse_args()
    manager = TaskManager()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in LOCAL_TASKS:
        overrides, status = local_overrides(name, args.data_dir, args.cache_dir)
        spec = {"include": str(manager._entry(name).yaml_path), **overrides, "task": f"local_{name}", "tag": []}
        (args.out / f"local_{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        print(f"local_{name}: {status} data, from {overrides['dataset_kwargs']['data_files']}")


if __name__ == "__main__":
    main()
