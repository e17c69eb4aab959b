"""The fitting objective: Huber loss on log-loss residuals of the log-sum-exp law, with its exact gradient.

Parameter vector (always this order, in LSE space):
    theta = (a, alpha, b, beta, e, phi)
    log L_hat = LSE(a - alpha * log N_eff, b - beta * log D, e),   N_eff = N_once + r^phi * N_rec
so A = exp(a), B = exp(b), E = exp(e). The dense form is the same objective with phi held at 0
(N_eff = N_once + N_rec, the unique parameters); a probe fit holds everything but phi.

A joint fit of several variants (analysis.compare) labels each run with a `group` (0 = the baseline, 1, 2, ... the
other variants) and appends one phi offset per extra group: theta = (a, alpha, b, beta, e, phi, dphi_1, ...), and a
run of group g > 0 has N_eff = N_once + r^(phi + dphi_g) * N_rec. E, A, alpha, B, beta are shared; dphi_g is the
difference phi_g - phi_baseline itself, so holding it (a profile) or resampling it (a bootstrap) needs nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import huber  # 0.5*x^2 inside [-delta, delta], delta*(|x| - delta/2) outside

PARAM_NAMES: tuple[str, ...] = ("a", "alpha", "b", "beta", "e", "phi")
N_PARAMS = len(PARAM_NAMES)
I_A, I_ALPHA, I_B, I_BETA, I_E, I_PHI = range(N_PARAMS)

DEFAULT_DELTA = 1e-3


def param_names(n_params: int = N_PARAMS) -> tuple[str, ...]:
    """Names of a theta of n_params entries: PARAM_NAMES, then dphi_1, dphi_2, ... (joint fits, see above)."""
    if n_params < N_PARAMS:
        raise ValueError(f"theta needs at least {N_PARAMS} entries ({PARAM_NAMES}), got {n_params}")
    return PARAM_NAMES + tuple(f"dphi_{g}" for g in range(1, n_params - N_PARAMS + 1))


@dataclass(frozen=True)
class FitData:
    """Arrays one fit needs, all float64 of equal length (one entry per run); `group` (int, optional) labels each
    run's variant in a joint fit: 0 the baseline, g > 0 the variant whose phi is phi + dphi_g."""

    n_once: np.ndarray
    n_rec: np.ndarray
    r: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    group: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, n_once, n_rec, r, tokens, loss, group=None) -> "FitData":
        arrays = [np.ascontiguousarray(np.asarray(x, dtype=np.float64)).reshape(-1) for x in (n_once, n_rec, r, tokens, loss)]
        if group is not None:
            group = np.ascontiguousarray(np.asarray(group)).reshape(-1)
            if group.size and (not np.issubdtype(group.dtype, np.integer) or group.min() < 0):
                raise ValueError("FitData.group must hold non-negative integers (0 = baseline, g > 0 = variant g)")
            group = group.astype(np.intp)
        n = {len(x) for x in arrays + ([] if group is None else [group])}
        if len(n) != 1:
            raise ValueError(f"FitData arrays must have equal lengths, got {[len(x) for x in arrays]}"
                             + ("" if group is None else f" and {len(group)} group labels"))
        return cls(*arrays, group=group)

    def __len__(self) -> int:
        return len(self.loss)

    @property
    def n_groups(self) -> int:
        return 1 if self.group is None or not len(self.group) else int(self.group.max()) + 1

    def subset(self, index) -> "FitData":
        return FitData(self.n_once[index], self.n_rec[index], self.r[index], self.tokens[index], self.loss[index],
                       None if self.group is None else self.group[index])


def _row_phi(theta: np.ndarray, data) -> np.ndarray:
    """Each run's phi: theta's phi, plus dphi_g on a run of group g > 0; (n,) for a (P,) theta, (k, n) for (k, P).
    `data` needs r and, for a joint fit, group (design points without one are all group 0)."""
    group = getattr(data, "group", None)
    phi = theta[..., I_PHI]
    n_extra = theta.shape[-1] - N_PARAMS
    if group is None or n_extra == 0:
        if group is not None and len(group) and group.max() > 0:
            raise ValueError(f"runs of {int(group.max()) + 1} variant groups need theta with "
                             f"{N_PARAMS + int(group.max())} entries (one dphi per extra group), got {theta.shape[-1]}")
        return np.broadcast_to(phi[..., None], theta.shape[:-1] + (len(data.r),))
    if len(group) and group.max() > n_extra:
        raise ValueError(f"runs of {int(group.max()) + 1} variant groups need theta with {N_PARAMS + int(group.max())}"
                         f" entries, got {theta.shape[-1]}")
    offsets = np.concatenate([np.zeros(theta.shape[:-1] + (1,)), theta[..., N_PARAMS:]], axis=-1)
    return phi[..., None] + offsets[..., group]


def huber_moments(sigma: float, delta: float) -> tuple[float, float]:
    """E[psi'] and E[psi^2] of the Huber loss for N(0, sigma^2) residuals (psi = clip(res, -delta, delta)).

    They turn the summed Huber loss into likelihood terms: the fit's asymptotic covariance is
    E[psi^2] / E[psi']^2 * (J'J)^-1, and 2 * E[psi'] / E[psi^2] times a drop of the objective is chi^2-scaled.
    """
    from scipy.stats import norm

    if not sigma > 0:
        raise ValueError(f"sigma: must be > 0, got {sigma!r}; give the log-loss noise, e.g. 0.01 for 1%")
    z = delta / sigma
    inside = 2.0 * norm.cdf(z) - 1.0
    psi2 = sigma ** 2 * (inside - 2.0 * z * norm.pdf(z)) + delta ** 2 * (1.0 - inside)
    return float(inside), float(psi2)


def log_predict(theta: np.ndarray, data: FitData) -> np.ndarray:
    """log L_hat for every run; theta may also be a (k, 6) stack giving a (k, n) result (a joint fit's theta has
    one dphi per extra variant group after phi)."""
    theta = np.asarray(theta, dtype=np.float64)
    t = theta[..., None] if theta.ndim == 2 else theta
    a, alpha, b, beta, e, phi = (t[..., i, :] if theta.ndim == 2 else t[i] for i in range(N_PARAMS))
    if theta.shape[-1] > N_PARAMS or getattr(data, "group", None) is not None:
        phi = _row_phi(theta, data)
    n_eff = data.n_once + np.exp(phi * np.log(data.r)) * data.n_rec
    t1 = a - alpha * np.log(n_eff)
    t2 = b - beta * np.log(data.tokens)
    t3 = np.broadcast_to(e, np.broadcast_shapes(np.shape(t1), np.shape(t2)))
    return np.logaddexp(np.logaddexp(t1, t2), t3)


def log_predict_jacobian(theta: np.ndarray, data) -> np.ndarray:
    """(n, P) derivatives of log L_hat with respect to theta at every run: what the Fisher information of a design
    is built from. `data` needs only n_once, n_rec, r and tokens (a FitData, or design points without losses); for a
    joint fit's theta (P > 6) also `group`, and column 6 + g - 1 (dphi_g) is phi's derivative on group g's runs."""
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape[-1] > N_PARAMS:
        phi_rows = _row_phi(theta, data)
        jac = _jacobian_at(theta[:N_PARAMS], data, phi_rows)
        extra = np.zeros((len(jac), theta.shape[-1] - N_PARAMS))
        for g in range(1, extra.shape[1] + 1):
            extra[:, g - 1] = np.where(data.group == g, jac[:, I_PHI], 0.0)
        return np.column_stack([jac, extra])
    return _jacobian_at(theta, data, theta[I_PHI])


def _jacobian_at(theta: np.ndarray, data, phi) -> np.ndarray:
    a, alpha, b, beta, e, _ = theta
    rp_nrec = np.exp(phi * np.log(data.r)) * data.n_rec
    n_eff = data.n_once + rp_nrec
    log_n, log_d = np.log(n_eff), np.log(data.tokens)
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    p1, p2, p3 = np.exp(terms - np.logaddexp.reduce(terms, axis=0))  # each term's share of the predicted loss
    return np.column_stack([p1, -p1 * log_n, p2, -p2 * log_d, p3, -alpha * p1 * rp_nrec * np.log(data.r) / n_eff])


def objective_values(thetas: np.ndarray, data: FitData, delta: float = DEFAULT_DELTA) -> np.ndarray:
    """Objective at many parameter vectors at once (k, 6) -> (k,): used to screen the start grid."""
    thetas = np.atleast_2d(thetas)
    y = np.log(data.loss)
    # Chunked so a large grid over many runs never builds a multi-GB (starts x runs) temporary.
    step = max(1, 2_000_000 // max(1, len(y)))
    out = np.concatenate([huber(delta, log_predict(thetas[i:i + step], data) - y).sum(axis=-1)
                          for i in range(0, len(thetas), step)])
    return np.where(np.isfinite(out), out, np.inf)


class Objective:
    """f(x), grad f(x) of the summed Huber loss for the free entries x of theta.

    `weights` are per-run multiplicities: a bootstrap resample is the same data with multinomial
    counts, which is cheaper than materialising the resampled rows.
    """

    def __init__(self, data: FitData, free: np.ndarray, fixed: np.ndarray, delta: float = DEFAULT_DELTA,
                 weights: np.ndarray | None = None):
        self.free = np.asarray(free, dtype=bool)
        self.theta = np.asarray(fixed, dtype=np.float64).copy()
        self.delta = float(delta)
        w = np.ones(len(data)) if weights is None else np.asarray(weights, dtype=np.float64)
        keep = w > 0  # rows a resample left out cost nothing; dropping them makes each call cheaper
        self.w = w[keep]
        self.y = np.log(data.loss[keep])
        self.log_d = np.log(data.tokens[keep])
        self.n_once = data.n_once[keep]
        self.n_rec = data.n_rec[keep]
        self.log_r = np.log(data.r[keep])
        self.n_extra = len(self.theta) - N_PARAMS  # dphi entries of a joint fit (0 otherwise)
        if self.n_extra < 0 or len(self.free) != len(self.theta):
            raise ValueError(f"Objective: free and fixed need equal lengths >= {N_PARAMS}, got {len(self.free)} and "
                             f"{len(self.theta)}")
        group = getattr(data, "group", None)
        self.group = None if group is None else group[keep]
        if self.n_extra and self.group is None:
            raise ValueError(f"Objective: theta has {self.n_extra} dphi entries but the runs carry no variant group")
        if self.group is not None and len(self.group) and self.group.max() > self.n_extra:
            raise ValueError(f"Objective: runs of {int(self.group.max()) + 1} variant groups need {self.n_extra} < "
                             f"{int(self.group.max())} dphi entries in theta")
        self.phi_free = bool(self.free[I_PHI:].any())
        if not self.phi_free:
            # phi held: N_eff is a constant of the data, so its log is computed once.
            self.log_n = np.log(self.n_once + np.exp(self._phi(self.theta) * self.log_r) * self.n_rec)

    def _phi(self, theta: np.ndarray):
        """phi (a scalar), or each run's phi + dphi_group in a joint fit."""
        if self.n_extra == 0:
            return theta[I_PHI]
        return theta[I_PHI] + np.concatenate([[0.0], theta[N_PARAMS:]])[self.group]

    def full(self, x: np.ndarray) -> np.ndarray:
        theta = self.theta.copy()
        theta[self.free] = x
        return theta

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        theta = self.theta
        theta[self.free] = x
        a, alpha, b, beta, e = theta[:I_PHI]
        if self.phi_free:
            rp_nrec = np.exp(self._phi(theta) * self.log_r) * self.n_rec
            n_eff = self.n_once + rp_nrec
            log_n = np.log(n_eff)
        else:
            log_n = self.log_n
        t1 = a - alpha * log_n
        t2 = b - beta * self.log_d
        m = np.maximum(np.maximum(t1, t2), e)
        e1 = np.exp(t1 - m)
        e2 = np.exp(t2 - m)
        e3 = np.exp(e - m)
        s = e1 + e2 + e3
        res = m + np.log(s) - self.y
        f = float(self.w @ huber(self.delta, res))
        # d huber / d res = clip(res, -delta, delta); d LSE / d term_i = softmax weight p_i.
        g = self.w * np.clip(res, -self.delta, self.delta) / s
        g1 = g * e1
        g2 = g * e2
        grad = np.empty(len(theta))
        grad[I_A] = g1.sum()
        grad[I_ALPHA] = -(g1 @ log_n)
        grad[I_B] = g2.sum()
        grad[I_BETA] = -(g2 @ self.log_d)
        grad[I_E] = (g * e3).sum()
        if self.phi_free and self.n_extra:
            per_run = -alpha * g1 * (rp_nrec * self.log_r / n_eff)
            per_group = np.bincount(self.group, weights=per_run, minlength=self.n_extra + 1)
            grad[I_PHI] = per_group.sum()
            grad[N_PARAMS:] = per_group[1:]
        elif self.phi_free:
            grad[I_PHI] = -alpha * (g1 @ (rp_nrec * self.log_r / n_eff))
        else:
            grad[I_PHI:] = 0.0
        if not np.isfinite(f):
            return np.inf, np.zeros(int(self.free.sum()))
        return f, grad[self.free]
