"""Time fit_law on the reference-shaped sweep: 116 runs x 1000 bootstrap resamples (goal: <= 20 s on 2 cores).

    python bench/bench_fit.py [--bootstrap 1000] [--jobs N] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from analysis import ScalingLaw, fit_law
from analysis.synthetic import synthetic_sweep


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers: on a shared machine wall time mostly measures the neighbours."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=None, help="bootstrap processes (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phi", type=float, default=0.459)
    a = p.parse_args()

    ref = ScalingLaw.reference()
    planted = ScalingLaw(E=ref.E, A=ref.A, alpha=ref.alpha, B=ref.B, beta=ref.beta, phi=a.phi)
    runs = synthetic_sweep(planted, noise=0.01, seed=a.seed)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    law = fit_law(runs, bootstrap=a.bootstrap, seed=a.seed, n_jobs=a.jobs, extrapolation=False)
    t_fit, c_fit = time.perf_counter() - t0, _cpu_seconds() - c0
    t0, c0 = time.perf_counter(), _cpu_seconds()
    fit_law(runs, bootstrap=0, seed=a.seed, extrapolation=True)
    t_loo, c_loo = time.perf_counter() - t0, _cpu_seconds() - c0
    load = os.getloadavg()[0]
    print(f"runs={len(runs)} bootstrap={a.bootstrap} cpus={len(os.sched_getaffinity(0))} jobs={a.jobs or 'auto'} "
          f"load average={load:.1f}")
    print(f"fit + bootstrap: wall {t_fit:.2f} s, CPU {c_fit:.2f} s  (goal: <= 20 s wall on 2 idle cores)   "
          f"failed resamples: {law.meta['n_bootstrap_failed']}")
    print(f"point fit + leave-one-budget-out: wall {t_loo:.2f} s, CPU {c_loo:.2f} s")
    print(f"phi = {law.phi:.4f}  95% CI {law.ci['phi'][0]:.4f} .. {law.ci['phi'][1]:.4f}  (planted {a.phi})")


if __name__ == "__main__":
    main()
