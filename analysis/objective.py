"""The fitting objective: Huber loss on log-loss residuals of the log-sum-exp law, with its exact gradient.

Parameter vector (always this order, in LSE space):
    theta = (a, alpha, b, beta, e, phi)
    log L_hat = LSE(a - alpha * log N_eff, b - beta * log D, e),   N_eff = N_once + r^phi * N_rec
so A = exp(a), B = exp(b), E = exp(e). The dense form is the same objective with phi held at 0
(N_eff = N_once + N_rec, the unique parameters); a probe fit holds everything but phi.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import huber  # 0.5*x^2 inside [-delta, delta], delta*(|x| - delta/2) outside

PARAM_NAMES: tuple[str, ...] = ("a", "alpha", "b", "beta", "e", "phi")
N_PARAMS = len(PARAM_NAMES)
I_A, I_ALPHA, I_B, I_BETA, I_E, I_PHI = range(N_PARAMS)

DEFAULT_DELTA = 1e-3


@dataclass(frozen=True)
class FitData:
    """Arrays one fit needs, all float64 of equal length (one entry per run)."""

    n_once: np.ndarray
    n_rec: np.ndarray
    r: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray

    @classmethod
    def from_arrays(cls, n_once, n_rec, r, tokens, loss) -> "FitData":
        arrays = [np.ascontiguousarray(np.asarray(x, dtype=np.float64)).reshape(-1) for x in (n_once, n_rec, r, tokens, loss)]
        n = {len(x) for x in arrays}
        if len(n) != 1:
            raise ValueError(f"FitData arrays must have equal lengths, got {[len(x) for x in arrays]}")
        return cls(*arrays)

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, index) -> "FitData":
        return FitData(self.n_once[index], self.n_rec[index], self.r[index], self.tokens[index], self.loss[index])


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
    """log L_hat for every run; theta may also be a (k, 6) stack giving a (k, n) result."""
    theta = np.asarray(theta, dtype=np.float64)
    t = theta[..., None] if theta.ndim == 2 else theta
    a, alpha, b, beta, e, phi = (t[..., i, :] if theta.ndim == 2 else t[i] for i in range(N_PARAMS))
    n_eff = data.n_once + np.exp(phi * np.log(data.r)) * data.n_rec
    t1 = a - alpha * np.log(n_eff)
    t2 = b - beta * np.log(data.tokens)
    t3 = np.broadcast_to(e, np.broadcast_shapes(np.shape(t1), np.shape(t2)))
    return np.logaddexp(np.logaddexp(t1, t2), t3)


def log_predict_jacobian(theta: np.ndarray, data) -> np.ndarray:
    """(n, 6) derivatives of log L_hat with respect to theta at every run: what the Fisher information of a design
    is built from. `data` needs only n_once, n_rec, r and tokens (a FitData, or design points without losses)."""
    a, alpha, b, beta, e, phi = np.asarray(theta, dtype=np.float64)
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
        self.phi_free = bool(self.free[I_PHI])
        if not self.phi_free:
            # phi held: N_eff is a constant of the data, so its log is computed once.
            self.log_n = np.log(self.n_once + np.exp(self.theta[I_PHI] * self.log_r) * self.n_rec)

    def full(self, x: np.ndarray) -> np.ndarray:
        theta = self.theta.copy()
        theta[self.free] = x
        return theta

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        theta = self.theta
        theta[self.free] = x
        a, alpha, b, beta, e, phi = theta
        if self.phi_free:
            rp_nrec = np.exp(phi * self.log_r) * self.n_rec
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
        grad = np.empty(N_PARAMS)
        grad[I_A] = g1.sum()
        grad[I_ALPHA] = -(g1 @ log_n)
        grad[I_B] = g2.sum()
        grad[I_BETA] = -(g2 @ self.log_d)
        grad[I_E] = (g * e3).sum()
        if self.phi_free:
            grad[I_PHI] = -alpha * (g1 @ (rp_nrec * self.log_r / n_eff))
        else:
            grad[I_PHI] = 0.0
        if not np.isfinite(f):
            return np.inf, np.zeros(int(self.free.sum()))
        return f, grad[self.free]
