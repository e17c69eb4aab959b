"""Profile-likelihood interval for phi: hold phi, refit everything else, invert a likelihood-ratio test.
(Any other entry of theta the same way: `profile_interval`; analysis.compare profiles a variant's dphi.)

The objective is a Huber loss on log residuals, not a log-likelihood, so its rise is scaled as for an M-estimator
(Schrader & Hettmansperger 1980): Lambda(phi) = 2 * (f(phi) - f_min) * E[psi'] / E[psi^2], chi^2 with one degree
of freedom at the true phi, with E[psi'], E[psi^2] those of normal residuals at the fit's residual scale. With
least squares (delta much larger than the noise) this is the familiar Delta RSS / sigma^2. It needs no resampling,
so it is cheap enough for every refit of an adaptive sweep, and it stays honest where phi's likelihood is skewed.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq
from scipy.stats import chi2

from . import engine
from .objective import I_PHI, FitData, huber_moments, log_predict, objective_values, param_names

_FIRST_STEP = 0.02  # phi steps outward from the optimum, doubling, until the test rejects
_XTOL = 1e-4


def residual_scale(data: FitData, theta: np.ndarray, n_free: int) -> float:
    """sd of the log residuals, with the degrees of freedom the fit used up given back."""
    res = log_predict(theta, data) - np.log(data.loss)
    return float(np.sqrt(np.sum(res ** 2) / max(1, len(data) - n_free)))


class _Profile:
    """f(v) = min over the other free parameters with theta[index] held at v, warm-started from the nearest v
    already profiled."""

    def __init__(self, data: FitData, spec: engine.FitSpec, opt: engine.Optimum, index: int = I_PHI):
        self.data = data
        self.index = index
        self.free = tuple(f and i != index for i, f in enumerate(spec.free))
        self.delta = spec.delta
        self.done: dict[float, tuple[float, np.ndarray]] = {float(opt.theta[index]): (opt.fun, opt.theta)}

    def __call__(self, phi: float) -> float:
        if float(phi) in self.done:  # brentq re-asks for its bracket ends: the same answer keeps their signs
            return self.done[float(phi)][0]
        nearest = min(self.done, key=lambda p: abs(p - phi))
        start = self.done[nearest][1].copy()
        start[self.index] = phi
        if any(self.free):
            spec = engine.FitSpec(free=self.free, fixed=tuple(start), delta=self.delta)
            theta, fun = engine._local_fit(spec.objective(self.data), spec, start)
        else:  # a probe: phi is the only free parameter, nothing left to refit
            theta, fun = start, float(objective_values(start, self.data, self.delta)[0])
        self.done[float(phi)] = (fun, theta)
        return fun


@engine.one_blas_thread
def profile_phi_interval(data: FitData, spec: engine.FitSpec, opt: engine.Optimum,
                         level: float = 0.95) -> tuple[float, float]:
    """(low, high) where the scaled objective rise crosses the chi^2_1 quantile; an end that never crosses
    before phi's search bound is reported as that bound."""
    if not spec.free[I_PHI]:
        raise ValueError("profile_phi_interval: phi is held in this fit (dense form); there is no phi to profile")
    return _interval(data, spec, opt, I_PHI, level)


@engine.one_blas_thread
def profile_interval(data: FitData, spec: engine.FitSpec, opt: engine.Optimum, index: int,
                     level: float = 0.95) -> tuple[float, float]:
    """The same interval for theta's entry `index` (e.g. a joint fit's dphi, analysis.compare): held, everything
    else free refitted, ends where the scaled rise crosses the chi^2_1 quantile or at the entry's search bound."""
    if not 0 <= index < spec.n_params or not spec.free[index]:
        names = param_names(spec.n_params)
        raise ValueError(f"profile_interval: entry {index} is not a free parameter of this fit (free: "
                         f"{[n for n, f in zip(names, spec.free) if f]})")
    return _interval(data, spec, opt, index, level)


def _interval(data: FitData, spec: engine.FitSpec, opt: engine.Optimum, index: int,
              level: float) -> tuple[float, float]:
    sigma = residual_scale(data, opt.theta, spec.n_free)
    e_dpsi, e_psi2 = huber_moments(max(sigma, 1e-12), spec.delta)
    scale = 2.0 * e_dpsi / e_psi2
    critical = float(chi2.ppf(level, 1))
    profile = _Profile(data, spec, opt, index)

    def excess(phi: float) -> float:
        return scale * max(0.0, profile(phi) - opt.fun) - critical

    phi_hat = float(opt.theta[index])
    lower, upper = engine.param_bounds(index)
    ends = []
    for direction, bound in ((-1.0, lower), (1.0, upper)):
        inside, step = phi_hat, _FIRST_STEP
        while True:
            outside = float(np.clip(phi_hat + direction * step, lower, upper))
            if excess(outside) > 0:
                ends.append(brentq(excess, min(inside, outside), max(inside, outside), xtol=_XTOL))
                break
            if outside == bound:
                ends.append(bound)
                break
            inside, step = outside, 2.0 * step
    return ends[0], ends[1]

