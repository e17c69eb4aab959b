"""One fitting engine for every form: multi-start L-BFGS-B, run bootstrap, leave-one-budget-out.

The looped law, the dense law (phi held at 0) and a probe (only phi free) differ only in which entries
of theta are free; everything below is shared. A joint fit of variants (analysis.compare) is the same engine with
one dphi entry per extra variant group appended to theta (analysis.objective), and a bootstrap stratified by group.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
import multiprocessing
import threading

import numpy as np
from scipy.optimize import minimize

from threadpoolctl import threadpool_limits
from .objective import (DEFAULT_DELTA, I_PHI, N_PARAMS, PARAM_NAMES, FitData, Objective, log_predict,
                        objective_values, param_names)

# Epoch AI's start grid for the Chinchilla replication (a, b in 0..25 step 5; e in -1..1 step .5;
# alpha, beta in 0..2 step .5), plus a few phi values when phi is free.
EPOCH_GRID: dict[str, tuple[float, ...]] = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "phi": (0.2, 0.5, 0.8),
}
PHI_BOUNDS = (-1.0, 3.0)  # wide: a phi outside [0, 1] is a finding to report, not to clip away
# A variant's phi offset (joint fits): any difference of two phis inside PHI_BOUNDS.
DPHI_BOUNDS = (PHI_BOUNDS[0] - PHI_BOUNDS[1], PHI_BOUNDS[1] - PHI_BOUNDS[0])
DEFAULT_N_STARTS = 24
# The objective is tiny (~1e-3) and nearly piecewise linear (Huber delta 1e-3), so scipy's default
# tolerances (gtol 1e-5) stop L-BFGS-B at the start; these let it actually converge.
_LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-12, "maxls": 40}
# A short look at where a secondary bootstrap start is heading; refined only if it beats the primary.
_PROBE_OPTIONS = {**_LBFGS_OPTIONS, "maxiter": 25}
DISTINCT_OPTIMA = 0.05  # local optima closer than this in every LSE parameter count as one
# Objective values this close (relative) are a tie: numpy's exp/log and BLAS kernels differ between CPUs in
# the last bits, so a tie is broken by a fixed order (grid position, start order) instead of by those bits.
TIE_RTOL = 1e-9


def _tie_key(values: np.ndarray) -> np.ndarray:
    """Objective values rounded to TIE_RTOL relative precision, for ordering that ignores last-bit noise."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(np.isfinite(values) & (values != 0), 10.0 ** np.floor(np.log10(np.abs(values))), 1.0)
    return np.where(np.isfinite(values), np.round(values / scale / TIE_RTOL) * TIE_RTOL * scale, np.inf)


def _better(fun: float, best: float) -> bool:
    """Beats the incumbent by more than a tie, so which of two equal optima wins never depends on the CPU."""
    return fun < best - TIE_RTOL * abs(best)


# BLAS on one thread: its wake-ups cost ~50x per tiny L-BFGS-B solve, and one thread sums in one fixed order.
one_blas_thread = threadpool_limits.wrap(limits=1, user_api="blas")


@dataclass(frozen=True)
class FitSpec:
    """Which parameters are free and the values of the held ones: N_PARAMS entries, or more in a joint fit of
    variants (one dphi per extra variant group after phi; see analysis.objective)."""

    free: tuple[bool, ...]
    fixed: tuple[float, ...]
    delta: float = DEFAULT_DELTA

    def __post_init__(self):
        if len(self.free) != len(self.fixed) or len(self.free) < N_PARAMS:
            raise ValueError(f"FitSpec.free and .fixed need {N_PARAMS} entries ({PARAM_NAMES}), plus one dphi per "
                             f"extra variant group in a joint fit; got {len(self.free)} and {len(self.fixed)}")
        if not self.delta > 0:
            raise ValueError(f"FitSpec.delta must be > 0, got {self.delta}")

    @property
    def n_params(self) -> int:
        return len(self.free)

    @property
    def names(self) -> tuple[str, ...]:
        return param_names(self.n_params)

    @property
    def free_mask(self) -> np.ndarray:
        return np.array(self.free, dtype=bool)

    @property
    def n_free(self) -> int:
        return int(sum(self.free))

    def bounds(self) -> list[tuple[float | None, float | None]]:
        return [param_bounds(i) for i in range(self.n_params) if self.free[i]]

    def objective(self, data: FitData, weights: np.ndarray | None = None) -> Objective:
        return Objective(data, self.free_mask, np.array(self.fixed), self.delta, weights)


def param_bounds(i: int) -> tuple[float | None, float | None]:
    """L-BFGS-B bounds of theta's entry i: phi within PHI_BOUNDS, a dphi within DPHI_BOUNDS, the rest free."""
    return PHI_BOUNDS if i == I_PHI else DPHI_BOUNDS if i > I_PHI else (None, None)


def start_grid(spec: FitSpec, grid: dict[str, tuple[float, ...]] | None = None) -> np.ndarray:
    """Cartesian product over the free parameters' grid values; held ones take their fixed values. A free dphi
    (joint fit) starts at 0, every variant at the baseline's phi, unless `grid` names values for it."""
    grid = EPOCH_GRID if grid is None else {**EPOCH_GRID, **grid}
    axes = [grid.get(name, (0.0,)) if spec.free[i] else (spec.fixed[i],) for i, name in enumerate(spec.names)]
    return np.array(list(itertools.product(*axes)), dtype=np.float64)


@dataclass
class Optimum:
    theta: np.ndarray  # full theta (6 entries; a joint fit's dphis after them)
    fun: float
    # distinct local optima (best first), used as warm starts for bootstrap and held-out refits
    candidates: list[np.ndarray] = field(default_factory=list)


def _local_fit(obj: Objective, spec: FitSpec, theta0: np.ndarray, options: dict = _LBFGS_OPTIONS) -> tuple[np.ndarray, float]:
    x0 = np.asarray(theta0, dtype=np.float64)[spec.free_mask]
    bounds = spec.bounds()
    if any(lo is not None for lo, _ in bounds):
        x0 = x0.copy()
        for k, (lo, hi) in enumerate(bounds):
            if lo is not None:
                x0[k] = np.clip(x0[k], lo, hi)
    res = minimize(obj, x0, jac=True, method="L-BFGS-B", bounds=bounds, options=options)
    theta = obj.full(res.x)
    fun = float(res.fun) if np.isfinite(res.fun) else np.inf
    return theta, fun


@one_blas_thread
def multistart(data: FitData, spec: FitSpec, starts: np.ndarray, n_starts: int | None = DEFAULT_N_STARTS,
               weights: np.ndarray | None = None, screen: bool = True, always: np.ndarray | None = None) -> Optimum:
    """Run L-BFGS-B from the `n_starts` grid points with the lowest objective (all when None), and from the
    `always` points unscreened (a previous fit's optimum, for a refit as runs arrive).

    Screening the whole grid costs one vectorised evaluation; on Epoch's Chinchilla data the best
    10 screened starts already reach the optimum the exhaustive 4,500-start search finds.
    """
    starts = np.atleast_2d(np.asarray(starts, dtype=np.float64))
    if screen and n_starts is not None and len(starts) > n_starts:
        if weights is None:
            vals = objective_values(starts, data, spec.delta)
        else:
            vals = np.array([spec.objective(data, weights)(s[spec.free_mask])[0] for s in starts])
        # Ties (symmetric grid points give equal values up to rounding) go to the earlier grid point.
        starts = starts[np.lexsort((np.arange(len(vals)), _tie_key(vals)))[:n_starts]]
    if always is not None:
        starts = np.concatenate([np.atleast_2d(np.asarray(always, dtype=np.float64)), starts])
    obj = spec.objective(data, weights)
    found: list[tuple[float, int, float, np.ndarray]] = []
    for i, s in enumerate(starts):
        theta, fun = _local_fit(obj, spec, s)
        if np.isfinite(fun) and np.all(np.isfinite(theta)):
            found.append((float(_tie_key(fun)), i, fun, theta))
    if not found:
        raise RuntimeError("every L-BFGS-B start failed (non-finite objective); check the data for extreme values")
    found.sort(key=lambda t: t[:2])  # lowest objective; among ties, the earliest start
    distinct: list[np.ndarray] = []
    for *_, theta in found:
        if all(np.max(np.abs(theta - d)) > DISTINCT_OPTIMA for d in distinct):
            distinct.append(theta)
    return Optimum(theta=found[0][3], fun=found[0][2], candidates=distinct)


def warm_starts(opt: Optimum, extra: int = 2) -> np.ndarray:
    """The full-data optimum plus a couple of other local optima: enough for resampled data."""
    return np.array([opt.theta] + opt.candidates[1:1 + extra])


@one_blas_thread
def _bootstrap_chunk(data: FitData, spec: FitSpec, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    p = spec.n_params
    out = np.full((len(counts), p + 1), np.nan)
    for j, w in enumerate(counts):
        obj = spec.objective(data, w)
        best, best_fun = _local_fit(obj, spec, starts[0])
        for s in starts[1:]:
            # Secondary basins rarely win; a few iterations tell, and only a winner is refined.
            theta, fun = _local_fit(obj, spec, s, _PROBE_OPTIONS)
            if _better(fun, best_fun):
                theta, fun = _local_fit(obj, spec, theta)
                if _better(fun, best_fun) and np.all(np.isfinite(theta)):
                    best, best_fun = theta, fun
        if np.isfinite(best_fun) and np.all(np.isfinite(best)):
            out[j, :p] = best
            out[j, p] = best_fun
    return out


def resample_counts(n_runs: int, n_boot: int, seed: int | None, strata: np.ndarray | None = None) -> np.ndarray:
    """Multinomial counts: row b says how often each run appears in bootstrap resample b.

    strata: a label per run; each resample then draws, within every stratum, as many runs as it has (a joint fit of
    variants resamples each variant's runs among themselves, so every resample keeps both variants at full size).
    """
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.multinomial(n_runs, np.full(n_runs, 1.0 / n_runs), size=n_boot).astype(np.float64)
    strata = np.asarray(strata).reshape(-1)
    if len(strata) != n_runs:
        raise ValueError(f"resample_counts: {len(strata)} strata labels for {n_runs} runs")
    counts = np.zeros((n_boot, n_runs))
    for label in np.unique(strata):  # sorted labels: the draws depend on the seed alone
        idx = np.flatnonzero(strata == label)
        counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return counts


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _can_fork() -> bool:
    """Fork workers only from a single-threaded process.

    fork needs no re-import of the caller's __main__ (spawn does, and breaks scripts without a main
    guard), but forking while other threads hold locks (Ray, gRPC) can deadlock: those callers run
    the bootstrap serially.
    """
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


def bootstrap(data: FitData, spec: FitSpec, opt: Optimum, n_boot: int, seed: int | None = 0,
              n_jobs: int | None = None, extra_starts: int = 2, strata: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, P) parameter draws from refits on runs resampled with replacement (NaN rows = failed); P = 6, or
    spec.n_params in a joint fit. strata: resample within each label's runs (see resample_counts).

    Each refit starts from the full-data optimum (plus `extra_starts` other local optima), which is
    what keeps 1000 resamples of ~100 runs to seconds. Work is split over processes only when it is
    large enough to repay starting them.
    """
    if n_boot <= 0:
        return np.empty((0, spec.n_params))
    counts = resample_counts(len(data), n_boot, seed, strata)
    starts = warm_starts(opt, extra_starts)
    jobs = default_jobs() if n_jobs is None else max(1, int(n_jobs))
    jobs = min(jobs, n_boot)
    if jobs > 1 and n_boot * len(data) * len(starts) >= 20_000 and _can_fork():
        chunks = np.array_split(counts, jobs * 4)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_bootstrap_chunk, itertools.repeat(data), itertools.repeat(spec),
                                  itertools.repeat(starts), chunks))
        out = np.concatenate(parts)
    else:
        out = _bootstrap_chunk(data, spec, starts, counts)
    return out[:, :spec.n_params]


def predict_loss(theta: np.ndarray, data: FitData) -> np.ndarray:
    return np.exp(log_predict(theta, data))


def r_squared(theta: np.ndarray, data: FitData) -> float:
    pred = predict_loss(theta, data)
    ss_res = float(np.sum((data.loss - pred) ** 2))
    ss_tot = float(np.sum((data.loss - data.loss.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


@one_blas_thread
def leave_one_budget_out(data: FitData, spec: FitSpec, opt: Optimum, budgets: np.ndarray,
                         labels: dict | None = None, min_runs: int | None = None) -> dict:
    """Refit without each budget and predict its runs: how well the law extrapolates to unseen compute.

    Errors are relative loss errors (pred / actual - 1). A budget whose removal leaves too few runs, or
    only one r value while phi is free, is listed under "skipped" with the reason.
    """
    budgets = np.asarray(budgets)
    min_runs = spec.n_free + 1 if min_runs is None else min_runs
    starts = warm_starts(opt, 2)
    per_budget: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    all_err: list[np.ndarray] = []
    for value in sorted(set(budgets.tolist())):
        label = str(labels.get(value, value)) if labels else str(value)
        held = budgets == value
        train = data.subset(~held)
        if len(train) < min_runs:
            skipped[label] = f"only {len(train)} runs left to fit {spec.n_free} parameters"
            continue
        if spec.free[I_PHI] and len(np.unique(train.r)) < 2:
            skipped[label] = "the other budgets hold a single r value, so phi is not identifiable"
            continue
        sub = multistart(train, spec, starts, n_starts=None, screen=False)
        test = data.subset(held)
        err = predict_loss(sub.theta, test) / test.loss - 1.0
        all_err.append(err)
        per_budget[label] = {
            "n_runs": int(held.sum()),
            "mean_abs_rel_error": float(np.mean(np.abs(err))),
            "max_abs_rel_error": float(np.max(np.abs(err))),
            "mean_rel_error": float(np.mean(err)),
        }
    pooled = np.concatenate(all_err) if all_err else np.array([])
    return {
        "per_budget": per_budget,
        "skipped": skipped,
        "mean_abs_rel_error": float(np.mean(np.abs(pooled))) if len(pooled) else None,
        "max_abs_rel_error": float(np.max(np.abs(pooled))) if len(pooled) else None,
    }
