"""Test-time depth: how a trained loop's held-out loss moves with the recurrences it runs at evaluation.

Parcae (Prairie et al., arXiv 2604.12946) finds that looping more at test time lowers the loss along a saturating
exponential in the evaluation depth T,

    L(T) = L_inf + Z * exp(-z * T),

with L_inf the loss the loop saturates at and z the rate it gets there. Each run's depth table (written by
training at the end of every looped run, STORE/depths/<run_id>.parquet) is fitted to that form. For a fixed rate
the model is linear in (L_inf, Z), so the fit profiles them out in closed form and searches the rate alone (in
log space, on a grid then a parabola through the best point and its neighbours); a rate pinned at its search bound means the points do not saturate (or drop
at once) within the evaluated depths, and the asymptote is then an extrapolation, flagged as such. Z may be
negative: a loop that gets worse beyond its trained depth and levels off is the same curve upside down.
Intervals: residual bootstrap (percentile, 95%) when a run has at least MIN_POINTS_FOR_CI depths.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

RATE_BOUNDS = (1e-2, 10.0)  # per recurrence: slower is a straight line over any sane depth range, faster a step
MIN_POINTS_FOR_CI = 5  # three parameters plus two residual degrees of freedom to resample
_GRID = np.geomspace(*RATE_BOUNDS, 241)
_LOG_STEP = float(np.log(_GRID[1] / _GRID[0]))
NO_EFFECT = 0.002  # nats: a mean gain smaller than this is reported as no effect, not as help or harm
_AT_BOUND = 1.02  # within 2% of a bound counts as pinned there


def saturating_exponential(r, asymptote: float, amplitude: float, rate: float):
    """Parcae's test-time curve L(r) = asymptote + amplitude * exp(-rate * r)."""
    return asymptote + amplitude * np.exp(-rate * np.asarray(r, dtype=float))


def _sse(r: np.ndarray, y: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Residual sum of squares of each row of y (B x n) at each rate (m), B x m, with the asymptote and amplitude
    at their least-squares values: a straight-line fit of y against exp(-rate * r) has a closed form."""
    uc = np.exp(-np.outer(rates, r))
    uc -= uc.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    cross = yc @ uc.T
    sse = (yc * yc).sum(axis=1, keepdims=True) - cross * cross / np.maximum((uc * uc).sum(axis=1), 1e-300)
    return np.maximum(sse, 0.0)


def _fit_many(r: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(asymptote, amplitude, rate) of each row of y (B x n), B x 3: the residual sum of squares on a log-rate
    grid, then a parabola through the best grid point and its neighbours (in log-rate) for the minimum."""
    sse = _sse(r, y, _GRID)
    i = np.clip(np.argmin(sse, axis=1), 1, len(_GRID) - 2)
    rows = np.arange(len(y))
    s0, s1, s2 = sse[rows, i - 1], sse[rows, i], sse[rows, i + 1]
    curvature = s0 - 2 * s1 + s2
    step = np.where(curvature > 0, 0.5 * (s0 - s2) / np.where(curvature > 0, curvature, 1.0), 0.0)
    log_rate = np.log(_GRID[i]) + np.clip(step, -1.0, 1.0) * _LOG_STEP
    rate = np.exp(np.clip(log_rate, *np.log(RATE_BOUNDS)))
    u = np.exp(-rate[:, None] * r[None])  # each row's basis at its own rate
    uc = u - u.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    amplitude = (uc * yc).sum(axis=1) / np.maximum((uc * uc).sum(axis=1), 1e-300)
    asymptote = y.mean(axis=1) - amplitude * u.mean(axis=1)
    return np.column_stack([asymptote, amplitude, rate])


@dataclass
class DepthFit:
    """The saturating-exponential fit of one run's loss against evaluation depth."""

    trained_r: int
    eval_r: np.ndarray
    loss: np.ndarray
    asymptote: float
    amplitude: float
    rate: float
    rmse: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # asymptote, rate, gain_fit

    def predict(self, r):
        return saturating_exponential(r, self.asymptote, self.amplitude, self.rate)

    @property
    def rate_at_bound(self) -> bool:
        low, high = RATE_BOUNDS
        return self.rate <= low * _AT_BOUND or self.rate >= high / _AT_BOUND

    @property
    def max_r(self) -> int:
        return int(self.eval_r.max())

    @property
    def loss_at_trained(self) -> float:
        at = self.loss[self.eval_r == self.trained_r]
        return float(at[0]) if len(at) else math.nan

    @property
    def loss_at_max(self) -> float:
        return float(self.loss[np.argmax(self.eval_r)])

    @property
    def gain(self) -> float:
        """Measured loss drop from the trained depth to the largest evaluated one (nats; > 0: looping more helps)."""
        return self.loss_at_trained - self.loss_at_max

    @property
    def gain_fit(self) -> float:
        return float(self.predict(self.trained_r) - self.predict(self.max_r))

    @property
    def note(self) -> str:
        if math.isnan(self.rate):
            return "fewer than 3 depths: no fit"
        if self.rate >= RATE_BOUNDS[1] / _AT_BOUND:
            return "saturates within one recurrence: the asymptote is its plateau"
        if self.rate_at_bound:
            return "no saturation in range: asymptote extrapolated"
        if "asymptote" not in self.ci:
            return f"fewer than {MIN_POINTS_FOR_CI} depths: no intervals"
        return ""


def _check_points(eval_r: Any, loss: Any, trained_r: Any) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(eval_r, dtype=float)
    y = np.asarray(loss, dtype=float)
    if r.ndim != 1 or r.shape != y.shape:
        raise ValueError(f"eval_r, loss: need two 1-D sequences of equal length, got shapes {r.shape} and {y.shape}")
    bad = r[~np.isfinite(r) | (r < 1) | (r != np.round(r))]
    if len(bad):
        raise ValueError(f"eval_r: {bad.tolist()} are not recurrence counts; every eval r must be an integer >= 1")
    if len(np.unique(r)) != len(r):
        raise ValueError(f"eval_r: repeated depths {sorted(r.tolist())}; give one loss per depth")
    if not np.isfinite(y).all():
        raise ValueError(f"loss: non-finite values {y.tolist()}; drop the depths where evaluation diverged")
    if not isinstance(trained_r, (int, np.integer)) or trained_r < 1:
        raise ValueError(f"trained_r: must be an integer >= 1, got {trained_r!r}")
    order = np.argsort(r)
    return r[order], y[order]


def fit_depth_curve(eval_r, loss, trained_r: int, *, bootstrap: int = 200, seed: int = 0) -> DepthFit:
    """Fit L(r) = asymptote + amplitude * exp(-rate * r) to one run's (eval r, loss) points; residual-bootstrap
    95% intervals for the asymptote, rate and fitted gain when there are >= MIN_POINTS_FOR_CI points."""
    r, y = _check_points(eval_r, loss, trained_r)
    if len(r) < 3:  # the curve has 3 parameters: report the measured gain alone
        return DepthFit(trained_r=int(trained_r), eval_r=r.astype(int), loss=y, asymptote=math.nan,
                        amplitude=math.nan, rate=math.nan, rmse=math.nan)
    asymptote, amplitude, rate = _fit_many(r, y[None])[0]
    fitted = saturating_exponential(r, asymptote, amplitude, rate)
    residuals = y - fitted
    out = DepthFit(trained_r=int(trained_r), eval_r=r.astype(int), loss=y, asymptote=asymptote, amplitude=amplitude,
                   rate=rate, rmse=float(np.sqrt(np.mean(residuals ** 2))))
    n = len(r)
    if bootstrap > 0 and n >= MIN_POINTS_FOR_CI:
        rng = np.random.default_rng(seed)
        scaled = residuals * math.sqrt(n / (n - 3))  # least squares shrinks residuals by its 3 fitted parameters
        samples = fitted + rng.choice(scaled, size=(bootstrap, n), replace=True)
        fits = _fit_many(r, samples)
        gains = fits[:, 1] * (np.exp(-fits[:, 2] * trained_r) - np.exp(-fits[:, 2] * r.max()))
        for name, values in (("asymptote", fits[:, 0]), ("rate", fits[:, 2]), ("gain_fit", gains)):
            low, high = np.percentile(values, [2.5, 97.5])
            out.ci[name] = (float(low), float(high))
    return out


# ---- a results store's depth tables ---------------------------------------------------------------------------
def _no_tables(store: Any) -> ValueError:
    return ValueError(f"STORE: {os.fspath(store)!r} has no depth tables (STORE/depths/<run_id>.parquet); training "
                      "writes one at the end of every completed looped run (r > 1), so train such a run with this "
                      "version, e.g. python -m training.run --config training/configs/tiny.yaml --storage STORE")


def load_depths(store: str | os.PathLike, *, variant: str | None = None) -> pd.DataFrame:
    """Every completed run's depth rows with the run's labels: run_id, label, variant, injection, d_model,
    compute, trained_r, eval_r, val_loss, val_bpb, seconds. Depth tables without a run row (a write that never
    finished) and runs that did not complete are left out."""
    from training import results_store

    depths = results_store.read_depths(store).to_pandas()
    if depths.empty:
        raise _no_tables(store)
    runs = results_store.read_runs(store).select(
        ["run_id", "name", "variant", "injection", "d_model", "compute", "status"]).to_pandas()
    runs = runs[runs["status"] == "completed"].drop(columns="status")
    points = depths.merge(runs, on="run_id", how="inner")
    if points.empty:
        raise _no_tables(store)
    points["variant"] = points["variant"].fillna("").astype(str)
    named = points["name"].fillna("").astype(str)
    points["label"] = named.where(named != "", points["run_id"])
    if variant is not None:
        present = sorted(points["variant"].unique())
        if variant not in present:
            raise ValueError(f"variant: {variant!r} has no depth tables; variants with them: {present}")
        points = points[points["variant"] == variant]
    return points.sort_values(["variant", "trained_r", "d_model", "run_id", "eval_r"]).reset_index(drop=True)


def fit_runs(points: pd.DataFrame, *, bootstrap: int = 200, seed: int = 0) -> dict[str, DepthFit]:
    """run_id -> its DepthFit, for every run in `points` (load_depths' table)."""
    return {run_id: fit_depth_curve(g["eval_r"].to_numpy(), g["val_loss"].to_numpy(), int(g["trained_r"].iloc[0]),
                                    bootstrap=bootstrap, seed=seed)
            for run_id, g in points.groupby("run_id", sort=False)}


def depth_curves(source: Any, *, bootstrap: int = 200, seed: int = 0, variant: str | None = None) -> pd.DataFrame:
    """One row per run: its trained r, evaluated depths, losses at the trained and largest depth, measured and
    fitted gain, and the saturating-exponential fit (asymptote, amplitude, rate) with intervals where the data
    allow. `source` is a results store (folder or URI) or load_depths' table."""
    points = source if isinstance(source, pd.DataFrame) else load_depths(source, variant=variant)
    return curves_table(points, fit_runs(points, bootstrap=bootstrap, seed=seed))


def curves_table(points: pd.DataFrame, fits: dict[str, DepthFit]) -> pd.DataFrame:
    """depth_curves' table from load_depths' points and fit_runs' fits."""
    rows = []
    for run_id, g in points.groupby("run_id", sort=False):
        f = fits[run_id]
        first = g.iloc[0]
        row = {"run_id": run_id, "label": first["label"], "variant": first["variant"],
               "injection": first["injection"], "d_model": first["d_model"], "compute": first["compute"],
               "trained_r": f.trained_r, "eval_r_min": int(f.eval_r.min()), "eval_r_max": f.max_r,
               "n_depths": len(f.eval_r), "loss_at_trained_r": f.loss_at_trained, "loss_at_max_r": f.loss_at_max,
               "gain": f.gain, "gain_fit": f.gain_fit, "asymptote": f.asymptote, "amplitude": f.amplitude,
               "rate": f.rate, "rmse": f.rmse, "eval_seconds": float(g["seconds"].sum()), "note": f.note}
        for name in ("asymptote", "rate", "gain_fit"):
            row[f"{name}_low"], row[f"{name}_high"] = f.ci.get(name, (math.nan, math.nan))
        rows.append(row)
    return pd.DataFrame(rows)


def variant_verdicts(curves: pd.DataFrame) -> list[dict[str, Any]]:
    """Per variant: do recurrences beyond the trained depth help or hurt on average (mean measured gain)?"""
    out = []
    for name, g in curves.groupby("variant", sort=True):
        mean = float(g["gain"].mean())
        verdict = "help" if mean > NO_EFFECT else "hurt" if mean < -NO_EFFECT else "make no measurable difference"
        out.append({"variant": name, "n_runs": len(g), "n_help": int((g["gain"] > 0).sum()), "mean_gain": mean,
                    "verdict": verdict})
    return out


def format_curves(curves: pd.DataFrame) -> str:
    """The table as text: one line per run."""

    def interval(row, name: str, fmt: str) -> str:
        low, high = row[f"{name}_low"], row[f"{name}_high"]
        value = format(row[name], fmt)
        return value if math.isnan(low) else f"{value} [{format(low, fmt)}, {format(high, fmt)}]"

    table = pd.DataFrame({
        "run": curves["label"],
        "variant": curves["variant"].replace("", "-"),
        "r": curves["trained_r"],
        "eval r": [f"{a}-{b}" for a, b in zip(curves["eval_r_min"], curves["eval_r_max"])],
        "L(r)": curves["loss_at_trained_r"].map("{:.4f}".format),
        "L(max)": curves["loss_at_max_r"].map("{:.4f}".format),
        "gain": curves["gain"].map("{:+.4f}".format),
        "asymptote [95%]": [interval(row, "asymptote", ".4f") for _, row in curves.iterrows()],
        "rate [95%]": [interval(row, "rate", ".3g") for _, row in curves.iterrows()],
        "rmse": curves["rmse"].map("{:.2g}".format),
        "eval s": curves["eval_seconds"].map("{:.1f}".format),
        "note": curves["note"],
    })
    return table.to_string(index=False)
