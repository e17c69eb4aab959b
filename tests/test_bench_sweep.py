"""bench/bench_sweep.py's breakdown: where a sweep's trial seconds went, from the rows' own clocks."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_sweep.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sweep", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(wall, train, setup, evaluation, checkpoint):
    return {"wall_seconds": wall, "train_seconds": train, "setup_seconds": setup, "eval_seconds": evaluation,
            "checkpoint_seconds": checkpoint}


def test_breakdown_splits_trial_wall_and_slot_time():
    bench = _bench()
    rows = [row(100.0, 70.0, 5.0, 4.0, 1.0), row(50.0, 20.0, 5.0, 2.0, float("nan"))]  # nan: never measured
    lines = bench.breakdown(rows, wall=100.0, slots=2)
    assert lines[0].startswith("2 trials, 150 s of trial wall time; 2 slots x 100 s = 200 slot-seconds")
    text = "\n".join(lines)
    steps = next(line for line in lines if "optimizer steps" in line)
    assert "90.0 s" in steps and "60.0% of trial wall" in steps and "45.0% of slot time" in steps
    ray = next(line for line in lines if "Ray Train" in line)
    assert "43.0 s" in ray  # 150 - (90 + 10 + 6 + 1)
    outside = next(line for line in lines if "outside trials" in line)
    assert "50.0 s" in outside and "25.0% of slot time" in outside
    assert "evaluation" in text and "checkpoints" in text

