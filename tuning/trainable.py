"""The Tune function trainable of one sweep cell: build and fit the cell's TorchTrainer, forward its reports.

Ray 2.60 runs Train V2, which refuses `Tuner(TorchTrainer)`; so each Tune trial is this small driver function
(a fraction of a CPU) that calls training.run.execute, with TuneReportCallback relaying the Train workers'
metrics (step, val_loss, train_loss, diverged, done, ...) to Tune for progress and pruning. A cell already in
the results store returns its row without training (execute's own check), so a relaunched trial never trains twice.
"""
from __future__ import annotations

import math
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from training.config import RunConfig


def cell_payload(run: Any, *, r: int, label: str) -> dict[str, Any]:
    """What a trial's config carries: the RunConfig as a dict plus labels the progress line reads."""
    return {"run": run.to_dict(), "run_id": run.run_id, "r": r, "label": label}


class SweepReportCallback(TuneReportCallback):
    """TuneReportCallback, except that the Train loop's `done` key travels as `train_done`: Tune reads a truthy
    `done` in a result as "trial finished" and would stop the trainable before execute() writes the run's row."""

    def after_report(self, run_context, metrics, checkpoint):
        renamed = [{("train_done" if k == "done" else k): v for k, v in m.items()} for m in metrics]
        super().after_report(run_context, renamed, checkpoint)


def run_cell(config: dict[str, Any]) -> None:
    # Lazy: training.run brings torch, DeepSpeed and Ray Train, which only the trial needs. The sweep driver imports
    # this module (tuning.tune_setup); importing training.run too would add 1.7 s to its start-up (`python -X
    # importtime`; wall 4.6-5.0 s instead of 2.2-2.9 s for `import tuning.sweep`, 2-core machine, 2026-12-06).
    from training.run import execute

    cell = config.get("cell", config)
    cfg = RunConfig.from_dict(cell["run"])
    if "lr" in config:  # the LR search stage: the searcher's suggestion
        cfg = cfg.replace(optim={"lr": float(config["lr"])})
    row = execute(cfg, callbacks=[SweepReportCallback()])
    val = row.get("val_loss")
    tune.report({
        "final": 1, "train_done": 1, "status": row["status"], "run_id": row["run_id"], "step": int(row["steps"]),
        "val_loss": float(val) if val is not None else math.nan,
        "diverged": int(row["status"] == "diverged"), "lr": float(row["lr"]),
    })
