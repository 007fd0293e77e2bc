"""Experiment tracking (W&B). Results are already on disk when this runs: a tracker failure only warns."""
from __future__ import annotations

import logging
import numbers
from pathlib import Path

log = logging.getLogger(__name__)


def _scalars(record: dict) -> dict:
    """variant/metric -> number, from the record's table rows."""
    table = record.get("table") or {}
    scalars = {}
    for row in table.get("rows", []):
        label = row.get(table.get("columns", ["variant"])[0])
        for key, value in row.items():
            if isinstance(value, numbers.Number) and not isinstance(value, bool):
                scalars[f"{label}/{key}"] = value
    return scalars


def log_run(cfg, record: dict) -> None:
    logger = cfg.logger
    if logger.name == "none":
        return
    try:
        import wandb
        Path(logger.dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=logger.project, entity=logger.entity, mode=logger.mode, dir=logger.dir,
                         name=f"{record['exp']}-{cfg.model.name}-{record['run_tag']}", tags=list(logger.tags),
                         config=record["config"], reinit="finish_previous",
                         # W&B's own chatter (~30 lines a run) goes to the run's logs/debug.log; we print one line.
                         settings=wandb.Settings(silent=True))
        run.summary.update(_scalars(record))
        table = record.get("table")
        if table:
            run.log({"table": wandb.Table(columns=table["columns"],
                                          data=[[row.get(c) for c in table["columns"]] for row in table["rows"]])})
        run.summary.update({"wall_time_s": record["wall_time_s"], "model_source": record["model"]["source"]})
        run_dir = Path(run.dir).parent
        where = run.url if logger.mode == "online" else f"{run_dir} (upload later: wandb sync {run_dir})"
        run.finish()
        print(f"W&B: {logger.mode} run {where}")
    except Exception as error:  # never lose a finished run to the tracker
        log.warning("W&B logging failed (%s: %s); results are in results/", type(error).__name__, error)
