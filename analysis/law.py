"""ScalingLaw: fitted (or published) coefficients, their bootstrap draws, and the queries built on them.

    L(N_once, N_rec, r, D) = E + A * (N_once + r^phi * N_rec)^(-alpha) + B * D^(-beta)

phi = None is the dense form L = E + A * N^(-alpha) + B * D^(-beta) with N = N_once + N_rec.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from models.validate import fail

from .intervals import DEFAULT_LEVEL, percentile_interval
from .optimal import OptimalDesign, optimal_design

COEFFS = ("E", "A", "alpha", "B", "beta", "phi")
REC_MULTIPLIER_R = (2, 4, 8)


class Estimate(NamedTuple):
    """A query's value and its bootstrap percentile interval (low/high are None without draws)."""

    value: Any
    low: Any = None
    high: Any = None


def derived_quantities(coeffs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Quantities computed from the coefficients, for point estimates and for every draw alike.

    n_opt_exponent / d_opt_exponent: the compute-optimal N ~ C^a, D ~ C^b exponents of the
    dense Chinchilla analysis (a = beta/(alpha+beta)); rec_multiplier_rK = K^phi, what one
    recurrent parameter is worth in unique parameters at K recurrences.
    """
    alpha, beta = np.asarray(coeffs["alpha"], float), np.asarray(coeffs["beta"], float)
    out = {"n_opt_exponent": beta / (alpha + beta), "d_opt_exponent": alpha / (alpha + beta)}
    phi = coeffs.get("phi")
    if phi is not None and not np.all(np.isnan(np.asarray(phi, float))):
        for k in REC_MULTIPLIER_R:
            out[f"rec_multiplier_r{k}"] = np.power(float(k), np.asarray(phi, float))
    return out


# Query inputs: (lower bound, bound allowed). n_once = 0 is a model given as all-recurrent (or a dense table).
_QUERY_BOUNDS = {"n_once": (0.0, True), "n_rec": (0.0, True), "r": (1.0, True), "tokens": (0.0, False)}


def _check_query(**values) -> None:
    for name, value in values.items():
        lo, inclusive = _QUERY_BOUNDS[name]
        x = np.asarray(value, dtype=float)
        bad = ~(np.isfinite(x) & ((x >= lo) if inclusive else (x > lo)))
        if bad.any():
            want = f"{'>=' if inclusive else '>'} {lo:g}"
            fail(name, f"must be finite and {want}, got {float(x[bad].flat[0]):g}", f"give a count {want}")
    if "n_once" in values and np.any(np.asarray(values["n_once"], float) + np.asarray(values["n_rec"], float) <= 0):
        fail("n_once", "n_once + n_rec must be > 0 (a model has parameters)", "give at least one positive count")


def _scalar(x):
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


@dataclass(frozen=True, eq=False)
class ScalingLaw:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    phi: float | None = None
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    r2: float | None = None
    n_runs: int | None = None
    loo: dict | None = None  # leave-one-budget-out extrapolation errors (see engine.leave_one_budget_out)
    excluded: list[dict] = field(default_factory=list)
    draws: np.ndarray | None = None  # (n_draws, 6) in COEFFS order; phi column NaN for the dense form
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("E", "A", "alpha", "B", "beta"):
            v = getattr(self, name)
            if v is None or not math.isfinite(float(v)):
                raise ValueError(f"ScalingLaw.{name} must be a finite number, got {v!r}")
        for name in ("E", "A", "B"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"ScalingLaw.{name} must be > 0, got {getattr(self, name)!r}")
        if self.phi is not None and not math.isfinite(float(self.phi)):
            raise ValueError(f"ScalingLaw.phi must be finite or None (dense form), got {self.phi!r}")
        if self.draws is not None:
            d = np.asarray(self.draws, dtype=float)
            if d.ndim != 2 or d.shape[1] != len(COEFFS):
                raise ValueError(f"ScalingLaw.draws must have shape (n, {len(COEFFS)}) in order {COEFFS}")
            object.__setattr__(self, "draws", d)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def reference(cls) -> "ScalingLaw":
        """The published looped-LM law of arXiv 2604.21106 (116 runs, R^2 = 0.997)."""
        return cls(E=1.56773, A=28.027, alpha=0.19924, B=915.82, beta=0.36863, phi=0.459, r2=0.997, n_runs=116,
                   meta={"source": "arXiv 2604.21106 (published coefficients)"})

    @property
    def form(self) -> str:
        return "dense" if self.phi is None else "looped"

    @property
    def coefficients(self) -> dict[str, float | None]:
        return {k: (None if getattr(self, k) is None else float(getattr(self, k))) for k in COEFFS}

    @property
    def extrapolation_error(self) -> float | None:
        """Mean |relative loss error| on held-out budgets (leave-one-budget-out), if computed."""
        return None if not self.loo else self.loo.get("mean_abs_rel_error")

    def _phi(self, phi=None):
        return 0.0 if phi is None else phi

    # ---- queries ------------------------------------------------------------------------------
    @staticmethod
    def _eff(n_once, n_rec, r, phi):
        return np.asarray(n_once, float) + np.power(np.asarray(r, float), phi) * np.asarray(n_rec, float)

    def _draw_coeffs(self) -> dict[str, np.ndarray] | None:
        if self.draws is None or len(self.draws) == 0:
            return None
        d = self.draws[np.all(np.isfinite(self.draws[:, :5]), axis=1)]
        cols = {k: d[:, i] for i, k in enumerate(COEFFS)}
        if self.phi is None:
            cols["phi"] = np.zeros(len(d))
        return cols

    def _per_draw(self, fn, args) -> np.ndarray | None:
        """fn under every bootstrap draw: shape (n_draws, *the query's broadcast shape); None without draws."""
        cols = self._draw_coeffs()
        if cols is None or not len(cols["E"]):
            return None
        # Coefficients shaped (n_draws, 1, ..., 1) so the query's own array shape broadcasts behind them.
        nd = len(np.broadcast_shapes(*[np.shape(a) for a in args]))
        shaped = {k: v.reshape((-1,) + (1,) * nd) for k, v in cols.items()}
        return fn(shaped, *[np.asarray(a, float) for a in args])

    def _with_interval(self, fn, args, ci: bool, level: float):
        value = _scalar(fn(self.coefficients | {"phi": self._phi(self.phi)}, *args))
        if not ci:
            return value
        per_draw = self._per_draw(fn, args)
        if per_draw is None:
            return Estimate(value)
        lo, hi = percentile_interval(per_draw, level)
        return Estimate(value, _scalar(lo), _scalar(hi))

    def effective_params(self, n_once, n_rec, r, *, ci: bool = False, level: float = DEFAULT_LEVEL):
        """N_once + r^phi * N_rec (the dense form counts every unique parameter once: N_once + N_rec).

        Read as a size, it is the unique parameters of the plain (r=1) model with the same loss at the same
        tokens, since N enters the law only through N_eff: `dense_equivalent` is this method under that name.
        E.g. the reference law makes a 410M looped model (N_once:N_rec = 4.27:4 blocks, r=4) worth a ~586M dense one.
        """
        _check_query(n_once=n_once, n_rec=n_rec, r=r)
        return self._with_interval(lambda c, a, b, rr: self._eff(a, b, rr, c["phi"]), (n_once, n_rec, r), ci, level)

    dense_equivalent = effective_params  # the same number, read as the equal-loss plain model's size

    @classmethod
    def _loss(cls, c, n_once, n_rec, r, tokens):
        n_eff = cls._eff(n_once, n_rec, r, c["phi"])
        return c["E"] + c["A"] * np.power(n_eff, -c["alpha"]) + c["B"] * np.power(np.asarray(tokens, float), -c["beta"])

    def predict(self, n_once, n_rec, r, tokens, *, ci: bool = False, level: float = DEFAULT_LEVEL):
        """Predicted loss (nats) for models with these parameter counts, recurrences and training tokens."""
        _check_query(n_once=n_once, n_rec=n_rec, r=r, tokens=tokens)
        return self._with_interval(self._loss, (n_once, n_rec, r, tokens), ci, level)

    def predict_draws(self, n_once, n_rec, r, tokens) -> np.ndarray | None:
        """Predicted loss under every bootstrap draw, shape (n_draws, *query shape); None without draws."""
        _check_query(n_once=n_once, n_rec=n_rec, r=r, tokens=tokens)
        return self._per_draw(self._loss, (n_once, n_rec, r, tokens))

    def derived(self) -> dict[str, float]:
        return {k: float(v) for k, v in derived_quantities(self.coefficients | {"phi": self.phi}).items()}

    def optimal(self, compute: float, r_values=(1, 2, 4, 8), max_unique_params: float | None = None,
                max_inference_flops_per_token: float | None = None, family: str = "reference",
                sizes=None, level: float = DEFAULT_LEVEL) -> OptimalDesign:
        """Budget-optimal design: see analysis.optimal.optimal_design."""
        return optimal_design(self, compute, r_values=r_values, max_unique_params=max_unique_params,
                              max_inference_flops_per_token=max_inference_flops_per_token, family=family,
                              sizes=sizes, level=level)

    # ---- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _jsonable({
            "form": self.form,
            "coefficients": self.coefficients,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "r2": self.r2,
            "n_runs": self.n_runs,
            "loo": self.loo,
            "excluded": self.excluded,
            "draws": {"columns": list(COEFFS), "values": None if self.draws is None else self.draws},
            "meta": self.meta,
        })

    @classmethod
    def from_dict(cls, d: dict) -> "ScalingLaw":
        if "coefficients" not in d:
            raise ValueError("not a saved ScalingLaw: no 'coefficients' key")
        c = d["coefficients"]
        missing = [k for k in COEFFS[:5] if c.get(k) is None]
        if missing:
            raise ValueError(f"saved law lacks coefficient(s) {missing}")
        draws = (d.get("draws") or {}).get("values")
        if draws is not None:
            cols = d["draws"].get("columns", list(COEFFS))
            arr = np.array([[np.nan if v is None else v for v in row] for row in draws], dtype=float).reshape(-1, len(cols))
            draws = np.column_stack([arr[:, cols.index(k)] if k in cols else np.full(len(arr), np.nan) for k in COEFFS])
        return cls(E=c["E"], A=c["A"], alpha=c["alpha"], B=c["B"], beta=c["beta"], phi=c.get("phi"),
                   ci={k: tuple(v) for k, v in (d.get("ci") or {}).items()}, r2=d.get("r2"), n_runs=d.get("n_runs"),
                   loo=d.get("loo"), excluded=list(d.get("excluded") or []), draws=draws, meta=dict(d.get("meta") or {}))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a law
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ScalingLaw":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---- display ------------------------------------------------------------------------------
    def summary(self) -> str:
        lines = [f"{self.form} law: L = E + A*N_eff^-alpha + B*D^-beta" + ("" if self.phi is None else ",  N_eff = N_once + r^phi*N_rec")]
        for k in COEFFS:
            v = getattr(self, k)
            if v is None:
                continue
            iv = self.ci.get(k)
            lines.append(f"  {k:>6} = {v:.6g}" + (f"   95% CI [{iv[0]:.6g}, {iv[1]:.6g}]" if iv else ""))
        if "phi_profile" in self.ci:  # beside the bootstrap percentile interval on the phi line
            lo, hi = self.ci["phi_profile"]
            lines.append(f"  {'':>6}   profile-likelihood 95% CI [{lo:.6g}, {hi:.6g}]")
        if self.r2 is not None:
            lines.append(f"  R^2 = {self.r2:.4f} on {self.n_runs} runs")
        if self.extrapolation_error is not None:
            lines.append(f"  leave-one-budget-out mean |rel. loss error| = {self.extrapolation_error:.4f}")
        if self.excluded:
            lines.append(f"  {len(self.excluded)} run(s) excluded")
        unreadable = [e["run"] for e in self.excluded if e.get("quarantined")]
        if unreadable:
            lines.append(f"  {len(unreadable)} unreadable run file(s) moved to runs/_quarantine/: {', '.join(unreadable)}")
        if self.meta.get("residual_by_r"):
            by_r = ", ".join(f"r={k}: {v:+.4f}" for k, v in self.meta["residual_by_r"].items())
            lines.append(f"  mean residual (measured - law) per r: {by_r} nats; residual sd "
                         f"{self.meta.get('residual_sd', float('nan')):.4f}")
        if self.meta.get("loops_line"):
            lines.append(f"  {self.meta['loops_line']}")
        if self.meta.get("warning"):
            lines.append(f"  WARNING: {self.meta['warning']}")
        if (self.meta.get("loops") or {}).get("warning"):
            lines.append(f"  WARNING: {self.meta['loops']['warning']}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        c = ", ".join(f"{k}={getattr(self, k):.6g}" for k in COEFFS if getattr(self, k) is not None)
        return f"ScalingLaw({c}, form={self.form!r}, n_runs={self.n_runs}, r2={self.r2})"
