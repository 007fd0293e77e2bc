"""Experiment tracking (W&B). Results are already on disk when this runs: a tracker failure only warns."""
from __future__ import annotations

import logging
import numbers
from pathlib import Path

from outlierlab.tables import Table

log = logging.getLogger(__name__)


def _scalars(record: dict) -> dict:
    """<row id>/<column key> -> number, from the record's table rows (row id: the table's index, else the row's
    position)."""
    if not record.get("table"):
        return {}
    table = Table.from_dict(record["table"])
    scalars = {}
    for number, row in enumerate(table.rows):
        label = table.row_id(row) or number
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
        if record.get("table"):
            table = Table.from_dict(record["table"])
            run.log({"table": wandb.Table(columns=[c.header for c in table.columns],
                                          data=[[table.value(row, c) for c in table.columns] for row in table.rows])})
        run.summary.update({"wall_time_s": record["wall_time_s"], "model_source": record["model"]["source"]})
        run_dir = Path(run.dir).parent
        where = run.url if logger.mode == "online" else f"{run_dir} (upload later: wandb sync {run_dir})"
        run.finish()
        print(f"W&B: {logger.mode} run {where}")
    except Exception as error:  # never lose a finished run to the tracker
        log.warning("W&B logging failed (%s: %s); results are in results/", type(error).__name__, error)
