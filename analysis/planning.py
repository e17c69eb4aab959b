"""Plan a sweep before paying for it: how precisely a set of runs pins phi, alpha and beta, and which runs pin it best.

The prediction is the fit's asymptotic covariance at a prior law's coefficients (the published law, or a fit):
    Cov(theta_hat) = noise^2 * k * (J'J)^-1,    J = d log L_hat / d theta at every run,
with log-normal loss noise of sd `noise` and k = E[psi^2] / (E[psi']^2 noise^2) the price of the fitter's Huber loss
(delta 1e-3) over least squares; k = 1 gives the Cramer-Rao bound, which no fitter beats on that design. The law
enters only through J, so the design, not the measured losses, sets the precision: a sweep can be priced, and its
next run chosen, before anything trains. `simulate` checks the prediction against the real fitter on noisy draws.
"""

from __future__ import annotations

import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy.stats import norm

from . import engine
from .fit import law_to_theta
from .intervals import DEFAULT_LEVEL
from .law import ScalingLaw
from .objective import DEFAULT_DELTA, I_ALPHA, I_BETA, I_PHI, N_PARAMS, huber_moments, log_predict, log_predict_jacobian

REPORTED = {"phi": I_PHI, "alpha": I_ALPHA, "beta": I_BETA}
_RIDGE = 1e-8  # relative: lets the greedy search start from an empty design, where J'J is singular


@dataclass(frozen=True)
class DesignPoints:
    """Runs as the law sees them (no losses): parameters, recurrences, tokens, and what each costs in FLOPs."""

    n_once: np.ndarray
    n_rec: np.ndarray
    r: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    labels: tuple[str, ...] = ()

    @classmethod
    def from_arrays(cls, n_once, n_rec, r, tokens, flops, labels: Iterable[str] = ()) -> "DesignPoints":
        arrays = [np.asarray(x, dtype=np.float64).reshape(-1) for x in (n_once, n_rec, r, tokens, flops)]
        if len({len(x) for x in arrays}) != 1:
            raise ValueError(f"design points: n_once, n_rec, r, tokens, flops need equal lengths, got "
                             f"{[len(x) for x in arrays]}")
        labels = tuple(labels)
        if labels and len(labels) != len(arrays[0]):
            raise ValueError(f"design points: {len(labels)} labels for {len(arrays[0])} points; give one per point")
        return cls(*arrays, labels=labels)

    @classmethod
    def from_runs(cls, runs: Iterable[Any], labels: Iterable[str] = ()) -> "DesignPoints":
        """From training RunConfigs: models.accounting's exact N_once, N_rec and F; D the tokens training runs
        (C / F rounded to whole batches, as the results store records them)."""
        from models.accounting import param_counts, training_compute

        rows = []
        for run in runs:
            counts = param_counts(run.model)
            rows.append((counts.n_once, counts.n_rec, run.model.r, run.train_tokens,
                         training_compute(run.model, run.train_tokens)))
        return cls.from_arrays(*np.array(rows, dtype=np.float64).reshape(-1, 5).T, labels=labels)

    def __len__(self) -> int:
        return len(self.flops)

    def subset(self, index) -> "DesignPoints":
        idx = np.arange(len(self))[index]
        return DesignPoints(self.n_once[idx], self.n_rec[idx], self.r[idx], self.tokens[idx], self.flops[idx],
                            tuple(self.labels[i] for i in idx) if self.labels else ())

    def concat(self, other: "DesignPoints") -> "DesignPoints":
        fields = ("n_once", "n_rec", "r", "tokens", "flops")
        return DesignPoints.from_arrays(*(np.concatenate([getattr(self, k), getattr(other, k)]) for k in fields))

    def frame(self, loss: np.ndarray) -> pd.DataFrame:
        """A run table analysis.fit_law reads, with these losses."""
        return pd.DataFrame({"n_once": self.n_once, "n_rec": self.n_rec, "r": self.r, "tokens": self.tokens,
                             "compute": self.flops, "val_loss": loss})


def variance_factor(noise: float, delta: float = DEFAULT_DELTA) -> float:
    """k: the Huber fit's variance over least squares' for N(0, noise^2) log residuals (1 when delta >> noise)."""
    e_dpsi, e_psi2 = huber_moments(noise, delta)
    return e_psi2 / (e_dpsi ** 2 * noise ** 2)


def _theta(law: ScalingLaw) -> np.ndarray:
    if law.phi is None:
        raise ValueError("law: a dense law has no phi to plan for; use a looped law (phi given), e.g. the reference")
    return law_to_theta(law)


def _check_noise(noise: float) -> None:
    if not (isinstance(noise, (int, float)) and 0 < noise < 1):
        raise ValueError(f"noise: must be the log-loss sd in (0, 1), got {noise!r}; e.g. 0.01 for 1% noise")


def information(theta: np.ndarray, points: DesignPoints) -> np.ndarray:
    """J'J: the design's Fisher information per unit residual variance."""
    jac = log_predict_jacobian(theta, points)
    return jac.T @ jac


def covariance(info: np.ndarray) -> np.ndarray:
    """(J'J)^-1, the covariance per unit residual variance; inf where the design does not identify the law."""
    try:
        cov = np.linalg.inv(info)
    except np.linalg.LinAlgError:
        return np.full(info.shape, np.inf)
    if np.any(np.diag(cov) <= 0) or np.linalg.cond(info) > 1e15:
        return np.full(info.shape, np.inf)
    return cov


@dataclass(frozen=True)
class Precision:
    """Predicted sd and interval half-width of phi, alpha, beta for a design (see the module docstring)."""

    sd: dict[str, float]
    halfwidth: dict[str, float]
    cramer_rao_sd: dict[str, float]
    total_flops: float
    n_runs: int
    noise: float
    level: float

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in REPORTED:
            out[f"{name}_sd"] = self.sd[name]
            out[f"{name}_halfwidth"] = self.halfwidth[name]
            out[f"{name}_sd_cramer_rao"] = self.cramer_rao_sd[name]
        return {**out, "total_flops": self.total_flops, "n_runs": self.n_runs, "noise": self.noise,
                "level": self.level}


def unidentified(points: DesignPoints) -> list[str]:
    """Why a design cannot pin the law (its information is singular), one reason per cause; [] when it can."""
    reasons = []
    r_values = np.unique(points.r)
    if len(r_values) < 2:
        reasons.append(f"phi: every run has r={r_values[0]:g}, so r^phi is one constant absorbed into A; "
                       "add runs at a second r")
    budgets = np.unique(np.round(np.log10(points.flops), 1))  # C = F * D, equal within whole-batch rounding
    if len(budgets) < 2:
        reasons.append("alpha, beta: one budget ties the tokens to the size (D = C / F), so the size and data terms "
                       "cannot be told apart; add budgets (the study spans 46x)")
    if len(points) < N_PARAMS:
        reasons.append(f"too few runs: {len(points)} for {N_PARAMS} coefficients")
    return reasons


def predict_precision(law: ScalingLaw, points: DesignPoints, noise: float = 0.01, *, delta: float = DEFAULT_DELTA,
                      level: float = DEFAULT_LEVEL) -> Precision:
    _check_noise(noise)
    cov = covariance(information(_theta(law), points)) * noise ** 2
    k = variance_factor(noise, delta)
    z = float(norm.ppf(0.5 + level / 2))
    crb = {name: float(np.sqrt(cov[i, i])) for name, i in REPORTED.items()}
    sd = {name: float(v * np.sqrt(k)) for name, v in crb.items()}
    return Precision(sd=sd, halfwidth={name: z * v for name, v in sd.items()}, cramer_rao_sd=crb,
                     total_flops=float(points.flops.sum()), n_runs=len(points), noise=noise, level=level)


def predict_difference(law: ScalingLaw, baseline: DesignPoints, variant: DesignPoints, phi_variant: float | None = None,
                       noise: float = 0.01, *, delta: float = DEFAULT_DELTA,
                       level: float = DEFAULT_LEVEL) -> dict[str, float]:
    """Predicted sd of phi_baseline, phi_variant and delta phi = phi_variant - phi_baseline for a joint fit of two
    variants (analysis.compare: E, A, alpha, B, beta shared, one phi each): the inverse Fisher information of the
    joint model, theta = (a, alpha, b, beta, e, phi_baseline, phi_variant), gives
    sd(delta phi) = sqrt(var phi_v + var phi_b - 2 cov), times the Huber fit's variance factor as predict_precision.
    phi_variant: the variant's phi at which the information is taken (default: the law's)."""
    _check_noise(noise)
    theta_b = _theta(law)
    theta_v = theta_b.copy()
    if phi_variant is not None:
        theta_v[I_PHI] = phi_variant
    jb, jv = log_predict_jacobian(theta_b, baseline), log_predict_jacobian(theta_v, variant)
    shared = list(range(I_PHI))
    jac = np.vstack([np.column_stack([jb[:, shared], jb[:, I_PHI], np.zeros(len(jb))]),
                     np.column_stack([jv[:, shared], np.zeros(len(jv)), jv[:, I_PHI]])])
    cov = covariance(jac.T @ jac) * noise ** 2
    k = variance_factor(noise, delta)
    z = float(norm.ppf(0.5 + level / 2))
    var_b, var_v, cov_bv = cov[I_PHI, I_PHI], cov[I_PHI + 1, I_PHI + 1], cov[I_PHI, I_PHI + 1]
    crb = {"phi_baseline": float(np.sqrt(var_b)), "phi_variant": float(np.sqrt(var_v)),
           "delta_phi": float(np.sqrt(var_v + var_b - 2 * cov_bv))}
    out: dict[str, float] = {}
    for name, v in crb.items():
        out[f"{name}_sd"] = float(v * np.sqrt(k))
        out[f"{name}_halfwidth"] = float(z * v * np.sqrt(k))
        out[f"{name}_sd_cramer_rao"] = v
    return {**out, "noise": noise, "level": level, "n_baseline": len(baseline), "n_variant": len(variant)}


def fitted_precision(law: ScalingLaw, points: DesignPoints, loss: np.ndarray, *, delta: float = DEFAULT_DELTA,
                     level: float = DEFAULT_LEVEL) -> Precision:
    """The precision a fit has on its own runs: the prediction at the fitted law, with the noise its residuals show
    (degrees of freedom given back). Smooth in the design, unlike a measured interval, so a sweep can stop on it
    without stopping on a lucky draw; infinite where the runs leave the law unidentified (singular information)."""
    res = log_predict(_theta(law), points) - np.log(np.asarray(loss, dtype=np.float64))
    noise = float(np.sqrt(np.sum(res ** 2) / max(1, len(points) - N_PARAMS)))
    return predict_precision(law, points, min(max(noise, 1e-9), 0.999), delta=delta, level=level)


def phi_information(law: ScalingLaw, points: DesignPoints, noise: float = 0.01, *,
                    delta: float = DEFAULT_DELTA) -> np.ndarray:
    """Each run's share of what the design knows about phi: 1/var(phi) with it minus 1/var(phi) without it
    (nuisance parameters refitted, so a run that only helps pin E is worth what that does for phi)."""
    _check_noise(noise)
    theta = _theta(law)
    scale = noise ** 2 * variance_factor(noise, delta)
    cov = covariance(information(theta, points))
    var = cov[I_PHI, I_PHI]
    if not np.isfinite(var):
        return np.zeros(len(points))
    jac = log_predict_jacobian(theta, points)
    cg = jac @ cov
    leverage = np.sum(jac * cg, axis=1)
    with np.errstate(divide="ignore"):
        var_without = np.where(leverage < 1 - 1e-9, var + cg[:, I_PHI] ** 2 / (1 - leverage), np.inf)
    return (1.0 / var - 1.0 / var_without) / scale


def greedy_design(law: ScalingLaw, candidates: DesignPoints, *, base: DesignPoints | None = None,
                  max_flops: float | None = None, target_phi_var: float | None = None, max_runs: int | None = None,
                  exclude: Iterable[int] = ()) -> list[int]:
    """Candidate indices in the order a greedy search adds them: each time the one whose run shrinks var(phi)
    most per FLOP (Sherman-Morrison: (e_phi' C g)^2 / (1 + g' C g), C = (J'J)^-1 of the design so far).

    Stops when the next affordable run would not fit in `max_flops` (FLOPs of the picks; `base` is already paid),
    when var(phi) per unit residual variance reaches `target_phi_var`, after `max_runs` picks, or when no
    candidate is left. `base` runs (finished or running) are in the design from the start.
    """
    theta = _theta(law)
    jac = log_predict_jacobian(theta, candidates)
    info = np.zeros((len(theta), len(theta)))
    if base is not None and len(base):
        base_jac = log_predict_jacobian(theta, base)
        info += base_jac.T @ base_jac
    scale = np.diag(jac.T @ jac) + np.diag(info)
    ridge = np.diag(_RIDGE * np.where(scale > 0, scale, 1.0))
    available = np.ones(len(candidates), dtype=bool)
    available[list(exclude)] = False
    spent, picks = 0.0, []
    while available.any() and (max_runs is None or len(picks) < max_runs):
        if target_phi_var is not None and covariance(info)[I_PHI, I_PHI] <= target_phi_var:
            break
        cov = np.linalg.inv(info + ridge)
        cg = jac @ cov
        drop = cg[:, I_PHI] ** 2 / (1.0 + np.sum(jac * cg, axis=1))
        ok = available & (True if max_flops is None else spent + candidates.flops <= max_flops)
        if not ok.any():
            break
        best = int(np.argmax(np.where(ok, drop / candidates.flops, -np.inf)))
        picks.append(best)
        available[best] = False
        spent += candidates.flops[best]
        info += np.outer(jac[best], jac[best])
    return picks


def suggest(law: ScalingLaw, grid: DesignPoints, candidates: DesignPoints, noise: float = 0.01, *,
            delta: float = DEFAULT_DELTA, level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """Two greedy designs from `candidates`: one with the grid's FLOPs (smaller interval), one with the grid's
    interval (fewer FLOPs). Each: chosen candidate indices and its predicted precision."""
    reference = predict_precision(law, grid, noise, delta=delta, level=level)
    target = covariance(information(_theta(law), grid))[I_PHI, I_PHI]
    out: dict[str, Any] = {"grid": reference}
    for key, kwargs in (("equal_flops", {"max_flops": reference.total_flops}),
                        ("equal_interval", {"target_phi_var": target})):
        picks = greedy_design(law, candidates, **kwargs)
        out[key] = {"picks": picks,
                    "precision": predict_precision(law, candidates.subset(picks), noise, delta=delta, level=level)}
    return out


# ---- simulation: the prediction against the real fitter -------------------------------------------------------------
def _simulate_chunk(law: ScalingLaw, points: DesignPoints, noise: float, seeds: list[int], level: float) -> np.ndarray:
    from .fit import fit_law

    mean = np.exp(log_predict(_theta(law), points))
    out = np.full((len(seeds), 3), np.nan)
    for j, seed in enumerate(seeds):
        loss = mean * np.exp(noise * np.random.default_rng(seed).standard_normal(len(points)))
        try:
            fitted = fit_law(points.frame(loss), bootstrap=0, extrapolation=False, level=level, form="looped")
        except (ValueError, RuntimeError):
            continue  # counted as a failed draw
        out[j] = (fitted.phi, *fitted.ci["phi_profile"])
    return out


def simulate(law: ScalingLaw, points: DesignPoints, n_draws: int, noise: float = 0.01, *, seed: int = 0,
             level: float = DEFAULT_LEVEL, n_jobs: int | None = None) -> dict[str, Any]:
    """Draw `n_draws` noisy sweeps from `law` on this design, fit each with analysis.fit_law (no bootstrap), and
    measure what the plan predicts: sd of phi, and how often the fit's profile interval and the planned interval
    (phi_hat +- predicted half-width) cover the true phi."""
    _check_noise(noise)
    if int(n_draws) != n_draws or n_draws < 2:
        raise ValueError(f"simulate: n_draws must be an integer >= 2, got {n_draws!r}")
    predicted = predict_precision(law, points, noise, level=level)
    seeds = [seed * 1_000_003 + i for i in range(int(n_draws))]
    jobs = min(engine.default_jobs() if n_jobs is None else max(1, int(n_jobs)), len(seeds))
    if jobs > 1 and engine._can_fork():
        chunks = [list(c) for c in np.array_split(seeds, jobs)]
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_simulate_chunk, itertools.repeat(law), itertools.repeat(points),
                                  itertools.repeat(noise), chunks, itertools.repeat(level)))
        draws = np.concatenate(parts)
    else:
        draws = _simulate_chunk(law, points, noise, seeds, level)
    ok = np.all(np.isfinite(draws), axis=1)
    phi, lo, hi = draws[ok].T
    truth, half = float(law.phi), predicted.halfwidth["phi"]
    return {
        "n_draws": int(n_draws), "n_failed": int((~ok).sum()), "noise": noise, "level": level,
        "predicted_phi_sd": predicted.sd["phi"], "phi_sd": float(np.std(phi, ddof=1)),
        "phi_rmse": float(np.sqrt(np.mean((phi - truth) ** 2))), "phi_bias": float(np.mean(phi) - truth),
        "coverage_profile": float(np.mean((lo <= truth) & (truth <= hi))),
        "coverage_planned": float(np.mean(np.abs(phi - truth) <= half)),
        "profile_halfwidth_mean": float(np.mean((hi - lo) / 2)), "predicted_phi_halfwidth": half,
        "phi": phi.tolist(),
    }
