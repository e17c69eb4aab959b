"""Calibrate `analysis compare` (delta phi from one joint fit) on planted sweeps of the study's probe design.

Each seed plants the reference grid's baseline (6 budgets x 4-5 sizes x r in {1, 2, 4, 8} = 116 runs, published
law) and a variant "probe" on the three smaller budgets at r in {2, 4, 8} (42 runs, truncated backprop k = 2 in its
rows) whose law is the same but for phi_variant = phi_baseline + delta phi, both at 1% log-normal noise, and runs
analysis.compare on them. Printed per planted delta phi:
- delta phi = 0: the share of seeds whose 95% interval covers 0 (goal >= 90%), bootstrap and profile;
- delta phi = -0.08 and +0.19: the power, the share of seeds whose interval excludes 0 (and the verdict's share);
- the mean interval width next to the Fisher-information prediction: 2 x 1.96 x sd(delta phi), with
  sd(delta phi) = sqrt(var phi_v + var phi_b - 2 cov) from the joint model's inverse information
  (analysis.planning.predict_difference, the Huber fit's variance factor included, as `python -m tuning.plan`).

    python bench/bench_compare.py [--seeds-null 60] [--seeds-power 20] [--bootstrap 100] [--jobs N]

The default run (100 comparisons, about 270 CPU seconds) took 4.8 minutes on 2 cores under load (2026-12-06).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from analysis import ScalingLaw, compare, engine
from analysis.planning import DesignPoints, predict_difference, predict_precision
from analysis.synthetic import REFERENCE_BUDGETS, REFERENCE_SIZES, synthetic_sweep

REF = ScalingLaw.reference()
PROBE_BUDGETS = REFERENCE_BUDGETS[:3]
PROBE_SIZES = REFERENCE_SIZES[:3]
PROBE_R = (2, 4, 8)
PROBE_BPTT_K = 2


def planted(phi: float) -> ScalingLaw:
    return ScalingLaw(E=REF.E, A=REF.A, alpha=REF.alpha, B=REF.B, beta=REF.beta, phi=phi)


def probe_sweep(delta_phi: float, seed: int, noise: float = 0.01, phi: float = REF.phi) -> pd.DataFrame:
    """The baseline's reference grid and the variant's probe grid, planted with phi and phi + delta_phi."""
    base = synthetic_sweep(planted(phi), noise=noise, seed=2 * seed)
    probe = synthetic_sweep(planted(phi + delta_phi), budgets=PROBE_BUDGETS, sizes=PROBE_SIZES, r_values=PROBE_R,
                            noise=noise, seed=2 * seed + 1, variant="probe", bptt_k=PROBE_BPTT_K)
    return pd.concat([base, probe], ignore_index=True)


def _points(frame: pd.DataFrame) -> DesignPoints:
    return DesignPoints.from_arrays(frame["n_once"], frame["n_rec"], frame["r"], frame["tokens"], frame["compute"])


def _one(args: tuple[float, int, int, float]) -> tuple[float, int, list[float]]:
    delta_phi, seed, n_boot, noise = args
    c = compare(probe_sweep(delta_phi, seed, noise), "probe", bootstrap=n_boot, seed=seed, n_jobs=1, loops=False)
    b = c.bootstrap_ci.get("delta_phi", (np.nan, np.nan))
    p = c.profile_ci["delta_phi"]
    return delta_phi, seed, [c.estimate["delta_phi"], *b, *p, float(c.distinguishable)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds-null", type=int, default=60, help="seeds at delta phi = 0 (coverage)")
    p.add_argument("--seeds-power", type=int, default=20, help="seeds at each non-zero delta phi (power)")
    p.add_argument("--deltas", type=float, nargs="+", default=[-0.08, 0.19], help="non-zero planted delta phis")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples per comparison")
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None, help="processes over seeds (default: all CPUs)")
    a = p.parse_args()

    tasks = [(0.0, a.first_seed + i, a.bootstrap, a.noise) for i in range(a.seeds_null)]
    tasks += [(d, a.first_seed + i, a.bootstrap, a.noise) for d in a.deltas for i in range(a.seeds_power)]
    jobs = min(engine.default_jobs() if a.jobs is None else max(1, a.jobs), len(tasks))
    t0 = time.perf_counter()
    if jobs > 1 and engine._can_fork():
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_one, tasks, chunksize=1))
    else:
        results = list(map(_one, tasks))
    wall = time.perf_counter() - t0

    example = probe_sweep(0.0, 0, noise=0.0)
    base, probe = example[example["variant"] == "baseline"], example[example["variant"] == "probe"]
    print(f"probe design: baseline {len(base)} runs (6 budgets, r 1/2/4/8), variant {len(probe)} runs (budgets "
          f"{', '.join(f'{b:.3g}' for b in PROBE_BUDGETS)}, r {'/'.join(map(str, PROBE_R))}, bptt_k {PROBE_BPTT_K}); "
          f"noise {a.noise:.2%}; phi_baseline {REF.phi}; {a.bootstrap} bootstrap resamples per comparison")
    print(f"{len(tasks)} comparisons in {wall:.0f} s wall on {jobs} process(es), cpus={len(os.sched_getaffinity(0))}, "
          f"load average {os.getloadavg()[0]:.1f}")
    alone = predict_precision(planted(REF.phi), _points(base), a.noise)
    print(f"Fisher (`python -m tuning.plan`): sd(phi) of the baseline grid alone {alone.sd['phi']:.4f}")
    header = (f"{'planted dphi':>12}  {'seeds':>5}  {'mean dphi':>9}  {'sd dphi':>7}  {'Fisher sd':>9}  "
              f"{'covers truth b/p':>16}  {'covers 0 b/p':>12}  {'excl. 0 b/p':>11}  {'verdict':>7}  "
              f"{'width b/p':>13}  {'Fisher width':>12}")
    print(header)
    print("-" * len(header))
    for d in [0.0, *a.deltas]:
        rows = np.array([r for dd, _, r in results if dd == d])
        if not len(rows):
            continue
        est, blo, bhi, plo, phi_, verdict = rows.T
        pred = predict_difference(planted(REF.phi), _points(base), _points(probe), phi_variant=REF.phi + d,
                                  noise=a.noise)
        covers = lambda lo, hi, x: np.mean((lo <= x) & (x <= hi))  # noqa: E731
        print(f"{d:>+12.2f}  {len(rows):>5}  {np.mean(est):>+9.4f}  {np.std(est, ddof=1):>7.4f}  "
              f"{pred['delta_phi_sd']:>9.4f}  {covers(blo, bhi, d):>7.0%} {covers(plo, phi_, d):>8.0%}  "
              f"{covers(blo, bhi, 0.0):>5.0%} {covers(plo, phi_, 0.0):>6.0%}  "
              f"{1 - covers(blo, bhi, 0.0):>4.0%} {1 - covers(plo, phi_, 0.0):>6.0%}  {np.mean(verdict):>7.0%}  "
              f"{np.mean(bhi - blo):>6.4f} {np.mean(phi_ - plo):>6.4f}  {2 * pred['delta_phi_halfwidth']:>12.4f}")
    print("b/p: bootstrap (percentile, runs resampled within each variant) / profile likelihood. verdict: share of "
          "seeds where the data can tell them apart (both intervals exclude 0). Goal at dphi = 0: covers 0 >= 90%.")
    print(f"Fisher sd of the variant's phi {pred['phi_variant_sd']:.4f}, of the baseline's phi "
          f"{pred['phi_baseline_sd']:.4f} in the joint fit (at the last planted dphi)")


if __name__ == "__main__":
    main()
