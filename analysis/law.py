"""ScalingLaw: fitted (or published) coefficients, their bootstrap draws, and the queries built on them.

    L(N_once, N_rec, r, D) = E + A * (N_once + r^phi * N_rec)^(-alpha) + B * D^(-beta)

phi = None is the dense form L = E + A * N^(-alpha) + B * D^(-beta) with N = N_once + N_rec.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from models.validate import fail

from .intervals import DEFAULT_LEVEL, percentile_interval
from .optimal import REFERENCE_MODELS, OptimalDesign, extrapolation, optimal_design

COEFFS = ("E", "A", "alpha", "B", "beta", "phi")
REC_MULTIPLIER_R = (2, 4, 8)


def describe_models(m: dict) -> str:
    """One line: the family and what the fit saw ('tiny family, d_model 8-32, r 1,4,8, vocab 1024, ...')."""
    parts = [f"{m.get('family', 'unknown')} family"]
    if m.get("widths"):
        parts.append(f"d_model {min(m['widths'])}-{max(m['widths'])}")
    if m.get("r_values"):
        parts.append("r " + ",".join(f"{r:g}" for r in m["r_values"]))
    for k in ("vocab_size", "seq_len", "head_dim", "injection", "optimizer"):
        if m.get(k) is not None:
            parts.append(f"{k} {m[k]}")
    if m.get("layout"):
        lay = m["layout"]
        parts.append(f"layout {lay['n_prelude']} + {lay['rec_depth']}/r x r + {lay['n_coda']}")
    for k, label in (("compute", "C"), ("tokens", "tokens")):
        if m.get(k):
            parts.append(f"{label} {m[k][0]:.3g}-{m[k][1]:.3g}")
    if m.get("mixed"):
        parts.append("MIXED " + "; ".join(f"{k} {v}" for k, v in m["mixed"].items()))
    return ", ".join(parts)


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
                   meta={"source": "arXiv 2604.21106 (published coefficients)",
                         "models": json.loads(json.dumps(REFERENCE_MODELS))})

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

    @property
    def models(self) -> dict:
        """What the law was fitted on (fit_law records it: family, vocab, seq_len, head_dim, injection, layout, r
        values, widths, compute and token ranges); {"family": "unknown"} for a law saved before it was recorded."""
        return dict(self.meta.get("models") or {"family": "unknown"})

    def extrapolation(self, *, n_once=None, n_rec=None, r=None, tokens=None, width=None, compute=None) -> dict:
        """How far a query lies outside what the law was fitted on: {quantity: {value, range, factor, side}} for each
        of r, tokens, width, compute and unique parameters (n_once + n_rec) given; {} inside (or when unrecorded)."""
        unique = None if n_once is None or n_rec is None else float(n_once) + float(n_rec)
        return extrapolation(self.meta.get("models"), compute=compute, width=width, tokens=tokens, r=r,
                             unique_params=unique)

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

    def optimal(self, compute: float, r_values=None, max_unique_params: float | None = None,
                max_inference_flops_per_token: float | None = None, family: str | None = None,
                sizes=None, level: float = DEFAULT_LEVEL) -> OptimalDesign:
        """Budget-optimal design (see analysis.optimal.optimal_design): by default in the family and at the r values
        the law was fitted on; a law that does not know its models answers in the reference family at r 1, 2, 4, 8."""
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
    def from_dict(cls, d: dict, source: str | None = None) -> "ScalingLaw":
        """A law from to_dict's form, validated: every coefficient a finite number (phi may be null only in a law
        whose form is dense); `source` (the file) prefixes every error."""
        where = f"{source}: " if source else ""

        def bad(problem: str) -> ValueError:
            return ValueError(f"{where}{problem}")

        if not isinstance(d, dict) or "coefficients" not in d:
            raise bad("not a saved ScalingLaw: no 'coefficients' key "
                      "(expected the JSON `python -m analysis fit` writes)")
        c = d["coefficients"]
        if not isinstance(c, dict):
            raise bad(f"'coefficients' must be an object of numbers, got {c!r}")
        missing = [k for k in COEFFS[:5] if k not in c]
        if missing:
            raise bad(f"saved law lacks coefficient(s) {missing}")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise bad(f"'meta' must be an object, got {type(meta).__name__}")
        form = d.get("form", meta.get("form"))
        if form not in ("looped", "dense", None):
            raise bad(f"'form' must be 'looped' or 'dense', got {form!r}")
        for k in COEFFS:
            v = c.get(k)
            if k == "phi" and v is None:
                if form != "dense":
                    raise bad(f"coefficient 'phi' is null but the law's form is {form or 'not given'!r}: a looped law "
                              "needs a finite phi (only a law whose form is 'dense' has none)")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(f"coefficient {k!r} must be a finite number, got {v!r} ({type(v).__name__})")
        if form == "dense" and c.get("phi") is not None:
            raise bad(f"the law's form is 'dense' but coefficient 'phi' is {c['phi']!r}: a dense law has no phi")
        ci = d.get("ci") or {}
        if not isinstance(ci, dict):
            raise bad(f"'ci' must be an object of [low, high] pairs, got {type(ci).__name__}")
        for k, v in ci.items():
            if (not isinstance(v, (list, tuple)) or len(v) != 2
                    or any(x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))) for x in v)):
                raise bad(f"ci[{k!r}] must be a [low, high] pair of numbers, got {v!r}")
        for k in ("r2", "n_runs"):
            v = d.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise bad(f"{k!r} must be a number or null, got {v!r}")
        draws = (d.get("draws") or {}).get("values") if isinstance(d.get("draws"), (dict, type(None))) else "bad"
        if draws is not None:
            try:
                cols = d["draws"].get("columns", list(COEFFS))
                arr = np.array([[np.nan if v is None else v for v in row] for row in draws], dtype=float)
                arr = arr.reshape(-1, len(cols))
            except (TypeError, ValueError, AttributeError) as exc:
                raise bad(f"'draws' must be {{columns: [...], values: [[numbers]]}} ({exc})") from None
            draws = np.column_stack([arr[:, cols.index(k)] if k in cols else np.full(len(arr), np.nan) for k in COEFFS])
        try:
            return cls(E=c["E"], A=c["A"], alpha=c["alpha"], B=c["B"], beta=c["beta"], phi=c.get("phi"),
                       ci={k: tuple(v) for k, v in ci.items()}, r2=d.get("r2"), n_runs=d.get("n_runs"),
                       loo=d.get("loo"), excluded=list(d.get("excluded") or []), draws=draws, meta=dict(meta))
        except ValueError as exc:
            raise bad(str(exc)) from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name no other writer uses (two fits saving one law.json must not write into each other's temp file).
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
            tmp.replace(path)  # atomic: a reader never sees half a law
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ScalingLaw":
        """Read a law.json; a file that is not one (truncated, hand-edited, wrong types) is named in the error."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); a "
                             f"truncated or hand-edited file? Refit it with `python -m analysis fit STORE --out "
                             f"{path}`") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a text (JSON) file ({exc.reason} at byte {exc.start})") from None
        return cls.from_dict(d, source=str(path))

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
        models = self.models
        if models.get("family") == "unknown" and "models" not in self.meta:
            lines.append("  models: unknown (saved before fits recorded them): design queries use the study's "
                         "reference family; refit to record them")
        else:
            lines.append(f"  models: {describe_models(models)}")
        if self.meta.get("notes"):
            lines += [f"  note: {n}" for n in self.meta["notes"]]
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
