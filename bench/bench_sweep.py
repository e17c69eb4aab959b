"""Benchmark: the laptop sweep (tuning/configs/laptop.yaml) end to end on a fresh store; prints its wall time.

    python bench/bench_sweep.py [--config SPEC] [--storage DIR] [--num-cpus N]

Goal: <= 10 minutes on 2 CPU cores, LR search, 24-cell grid and fit included. The store is a new temp folder
unless --storage is given (an existing store resumes, which is not what this measures).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tuning.spec import SweepSpec  # noqa: E402
from tuning.sweep import DEFAULT_CONFIG, run_sweep  # noqa: E402

GOAL_S = 600.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--storage", default=None, help="store folder (default: a fresh temp folder, removed after)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    os.environ.pop("RAY_ADDRESS", None)  # measure on a private local Ray
    store = args.storage or tempfile.mkdtemp(prefix="bench-sweep-")
    spec = SweepSpec.from_yaml(args.config).replace(storage=store)
    t0 = time.perf_counter()
    try:
        result = run_sweep(spec, num_cpus=args.num_cpus)
    finally:
        wall = time.perf_counter() - t0
        if args.storage is None:
            shutil.rmtree(store, ignore_errors=True)
    law = result["law"]
    print(f"\nbench_sweep: {spec.name}: {len(result['cells'])} cells {result['counts']}, best LR {result['best_lr']}, "
          f"phi {'-' if law is None or law.phi is None else f'{law.phi:.3f}'}")
    print(f"bench_sweep: wall time {wall:.1f} s on {args.num_cpus} CPU(s) (goal <= {GOAL_S:.0f} s: "
          f"{'met' if wall <= GOAL_S else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
