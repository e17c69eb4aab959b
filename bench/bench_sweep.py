"""Benchmark: the laptop sweep (tuning/configs/laptop.yaml) end to end on a fresh store; prints its wall time and
where the trials' seconds went.

    python bench/bench_sweep.py [--config SPEC] [--storage DIR] [--num-cpus N]

Goals (2 CPU cores, LR search, grid and fit included): <= 20 minutes of wall time, and optimizer steps >= 75% of
the trials' wall time. The breakdown reads the rows' own clocks (training.results_store: train, setup, eval and
checkpoint seconds inside the worker, wall_seconds around the Ray Train run); what is left of a trial's wall is
Ray Train's worker-group start and stop, the worker's imports and the reports. The store is a new temp folder
unless --storage is given (an existing store resumes, which is not what this measures).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tuning.interrupt import SweepInterrupted  # noqa: E402
from tuning.spec import SweepSpec  # noqa: E402
from tuning.sweep import DEFAULT_CONFIG, absolute_storage, run_sweep  # noqa: E402

GOAL_S = 1200.0
GOAL_TRAIN_SHARE = 0.75
PARTS = ("train_seconds", "setup_seconds", "eval_seconds", "checkpoint_seconds")


def trial_rows(spec: SweepSpec) -> list[dict]:
    """Every trained run of the sweep (LR search and grid) once; cooldown branches ride inside their parent's
    trial, so their rows are left out."""
    from training import results_store
    from tuning.grid import search_storage

    rows = {}
    for store in (search_storage(spec), spec.storage):
        for row in results_store.read_runs(store).to_pylist():
            if row["parent_run_id"] is None and row["status"] != "failed":
                rows[(row["run_id"], row["finished_at"])] = row  # a search run reused by the grid counts once
    return list(rows.values())


def breakdown(rows: list[dict], wall: float, slots: int) -> list[str]:
    """Lines of the seconds split: within the trials' wall, and of the sweep's slot time (slots x wall)."""
    trial_wall = sum(r["wall_seconds"] for r in rows)
    parts = {key: sum(r[key] for r in rows if r[key] == r[key]) for key in PARTS}
    ray_train = trial_wall - sum(parts.values())
    slot_time = slots * wall
    names = {"train_seconds": "optimizer steps", "setup_seconds": "model/engine/loader build",
             "eval_seconds": "evaluation", "checkpoint_seconds": "checkpoints + branch snapshots"}
    lines = [f"{len(rows)} trials, {trial_wall:.0f} s of trial wall time; {slots} slots x {wall:.0f} s = "
             f"{slot_time:.0f} slot-seconds"]
    for key, name in names.items():
        lines.append(f"  {name:<34} {parts[key]:8.1f} s  {parts[key] / trial_wall:6.1%} of trial wall  "
                     f"{parts[key] / slot_time:6.1%} of slot time")
    lines.append(f"  {'Ray Train start/stop, imports':<34} {ray_train:8.1f} s  {ray_train / trial_wall:6.1%} of trial "
                 f"wall  {ray_train / slot_time:6.1%} of slot time")
    idle = slot_time - trial_wall
    lines.append(f"  {'outside trials (Tune, driver, fit)':<34} {idle:8.1f} s  {'':>20}  {idle / slot_time:6.1%} of "
                 "slot time")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--storage", default=None, help="store folder (default: a fresh temp folder, removed after)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)  # measure on a private local Ray
    store = args.storage or tempfile.mkdtemp(prefix="bench-sweep-")
    spec = absolute_storage(SweepSpec.from_yaml(args.config).replace(storage=store))
    t0 = time.perf_counter()
    try:
        try:
            result = run_sweep(spec, num_cpus=args.num_cpus)
        except SweepInterrupted as exc:  # the sweep printed how far it got; a partial sweep measures nothing
            return exc.exit_code
        wall = time.perf_counter() - t0
        law = result["law"]
        print(f"\nbench_sweep: {spec.name}: {len(result['cells'])} cells {result['counts']}, best LR "
              f"{result['best_lr']}, phi {'-' if law is None or law.phi is None else f'{law.phi:.3f}'}")
        print(f"bench_sweep: wall time {wall:.1f} s on {args.num_cpus} CPU(s) (goal <= {GOAL_S:.0f} s: "
              f"{'met' if wall <= GOAL_S else 'NOT met'})")
        rows = trial_rows(spec)
        slots = spec.concurrency or math.floor(args.num_cpus / spec.resources.per_trial["CPU"] + 1e-9)
        for line in breakdown(rows, wall, slots):
            print(f"bench_sweep: {line}")
        share = sum(r["train_seconds"] for r in rows) / sum(r["wall_seconds"] for r in rows)
        print(f"bench_sweep: optimizer steps {share:.1%} of trial wall time (goal >= {GOAL_TRAIN_SHARE:.0%}: "
              f"{'met' if share >= GOAL_TRAIN_SHARE else 'NOT met'})")
    finally:
        if args.storage is None:
            shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
