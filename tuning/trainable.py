"""The Tune function trainable of one sweep cell: build and fit the cell's TorchTrainer, forward its reports.

Ray 2.60 runs Train V2, which refuses `Tuner(TorchTrainer)`; so each Tune trial is this small driver function
(a fraction of a CPU) that calls training.run.execute while a relay thread forwards the Train workers' reports
(step, val_loss, train_loss, diverged, ...) to Tune for progress and pruning. A cell already in the results store
returns its row without training (execute's own check), so a relaunched trial never trains twice.

Why not Ray's `TuneReportCallback`: it hands each report to the trial's main thread, which then puts it on the
same one-slot queue that this function's own `tune.report` fills. When a Train report is still waiting in the relay
queue as the function reports its final result, the main thread blocks putting into a queue only it empties: the
trial hangs forever (seen 2026-12-07 in the two-node job test once Train's controller polled every 0.1 s; py-spy:
the main thread in `_TrainSession._report_training_result` under `_get_result_from_queues`, the function thread in
the same `Queue.put`). Here every report reaches Tune from a thread other than the main one, which stays the
queue's only reader, and the relay is drained before the final report.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import ray.train
from ray import tune
from ray.util.queue import Queue

from training.config import RunConfig


def cell_payload(run: Any, *, r: int, label: str) -> dict[str, Any]:
    """What a trial's config carries: the RunConfig as a dict plus labels the progress line reads."""
    return {"run": run.to_dict(), "run_id": run.run_id, "r": r, "label": label}


class ReportRelay(ray.train.UserCallback):
    """Runs in the Train controller: puts each report's metrics (rank 0's) on a queue actor the trial reads.

    The Train loop's `done` key travels as `train_done`: Tune reads a truthy `done` in a result as "trial finished"
    and would stop the trainable before execute() writes the run's row."""

    END = None  # what `close` queues after the last report

    def __init__(self) -> None:
        self.queue = Queue(actor_options={"num_cpus": 0})  # unbounded: the controller never waits on Tune

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.queue.put({("train_done" if k == "done" else k): v for k, v in metrics[0].items()})

    def forward(self) -> None:
        """In the trial, off its main thread: hand every queued report to Tune until `close`'s marker. One blocking
        get per report: polling with a 0.1 s timeout kept the queue actor at 4.4% of a core and the trial at 1.6%
        for the whole run, each of the two concurrent trials of the laptop sweep (2026-12-07, this machine)."""
        while (metrics := self.queue.get()) is not self.END:
            tune.report(metrics)

    def close(self) -> None:
        """After fit() has returned, when every report is on the queue: ends `forward` once it has passed them on."""
        self.queue.put(self.END)


def run_cell(config: dict[str, Any]) -> None:
    # Lazy: training.run brings torch, DeepSpeed and Ray Train, which only the trial needs. The sweep driver imports
    # this module (tuning.tune_setup); importing training.run too would add 1.7 s to its start-up (`python -X
    # importtime`; wall 4.6-5.0 s instead of 2.2-2.9 s for `import tuning.sweep`, 2-core machine, 2026-12-06).
    from training.run import execute

    cell = config.get("cell", config)
    cfg = RunConfig.from_dict(cell["run"])
    if "lr" in config:  # the LR search stage: the searcher's suggestion
        cfg = cfg.replace(optim={"lr": float(config["lr"])})
    relay = ReportRelay()
    forwarder = threading.Thread(target=relay.forward, name="report-relay", daemon=True)
    forwarder.start()
    try:
        row = execute(cfg, callbacks=[relay])
    finally:
        relay.close()
    forwarder.join()  # every Train report is in the queue once fit() returns: Tune has them all before the last
    relay.queue.shutdown()
    val = row.get("val_loss")
    tune.report({
        "final": 1, "train_done": 1, "status": row["status"], "run_id": row["run_id"], "step": int(row["steps"]),
        "val_loss": float(val) if val is not None else math.nan,
        "diverged": int(row["status"] == "diverged"), "lr": float(row["lr"]),
    })
