"""Ray Tune plumbing shared by the sweep's stages (tuning.sweep) and the adaptive sweep (tuning.adaptive)."""
from __future__ import annotations

import datetime as dt
import logging
import math
from typing import Any

import ray
from ray import tune

from training import results_store
from tuning.spec import SweepSpec
from tuning.trainable import run_cell

METRIC = "val_loss"


def concurrency(spec: SweepSpec, explicit: int | None = None) -> int:
    """Trials at once = what the cluster fits (each trial holds its trainable plus its Train workers), unless the
    spec fixes it (e.g. an autoscaling cluster that grows on demand)."""
    explicit = explicit or spec.concurrency
    if explicit:
        return explicit
    need = spec.resources.per_trial
    have = ray.cluster_resources()
    fits = min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
    if fits < 1:
        raise ValueError(f"resources: one trial needs {need} but the cluster has "
                         f"{ {k: have.get(k, 0.0) for k in need} }; lower resources.num_workers / cpus_per_worker, "
                         "or set concurrency: N if the cluster autoscales")
    return fits


def _tune_run_config(spec: SweepSpec, stage: str, callbacks: list, stop: Any) -> Any:
    # The sweep reads its results store, never Tune's ResultGrid, whose warnings about trials stopped before their
    # first report (an interrupt's: "Failed to fetch metrics ... FileNotFoundError") would only alarm.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return tune.RunConfig(name=f"{stage}-{stamp}", storage_path=f"{spec.storage.rstrip('/')}/tune",
                          callbacks=callbacks, verbose=0, stop=stop,
                          failure_config=tune.FailureConfig(max_failures=0))  # Train retries inside the trial


def _trainable(spec: SweepSpec, fn=None):
    """`fn` (default tuning.trainable.run_cell) trains one cell from the trial config {"cell": cell_payload(...)}."""
    return tune.with_resources(fn or run_cell, {"CPU": spec.resources.trial_cpus})


def _dirname(trial: Any) -> str:
    return f"{trial.trainable_name}_{trial.trial_id}"


def stored_status(store: str) -> dict[str, str]:
    """run_id -> status of every row in the store (failed runs are retried, so callers skip only the others)."""
    table = results_store.read_runs(store)
    return dict(zip(table.column("run_id").to_pylist(), table.column("status").to_pylist()))
