"""fit_law: runs in, ScalingLaw (with bootstrap intervals, R^2, extrapolation error) out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from . import engine
from .profile import profile_phi_interval
from .data import RunTable, describe_models, load_runs
from .intervals import DEFAULT_LEVEL, percentile_interval
from .law import COEFFS, ScalingLaw, derived_quantities
from .loops import check_loops, check_store, residuals_by_r
from training.storage import filesystem

from .objective import DEFAULT_DELTA, I_A, I_B, I_E, I_PHI, N_PARAMS, PARAM_NAMES, FitData

FORMS = ("auto", "looped", "dense")


def theta_to_coeffs(theta: np.ndarray, dense: bool) -> dict[str, np.ndarray]:
    """LSE-space (a, alpha, b, beta, e, phi) -> natural coefficients; works on (6,) and (k, 6)."""
    t = np.asarray(theta, dtype=float)
    return {"E": np.exp(t[..., I_E]), "A": np.exp(t[..., I_A]), "alpha": t[..., 1], "B": np.exp(t[..., I_B]),
            "beta": t[..., 3], "phi": np.full(t.shape[:-1], np.nan) if dense else t[..., I_PHI]}


def law_to_theta(law: ScalingLaw) -> np.ndarray:
    return np.array([np.log(law.A), law.alpha, np.log(law.B), law.beta, np.log(law.E),
                     0.0 if law.phi is None else law.phi])


def _fit_data(table: RunTable) -> FitData:
    f = table.frame
    return FitData.from_arrays(f["n_once"], f["n_rec"], f["r"], f["tokens"], f["val_loss"])


def _choose_spec(data: FitData, form: str, baseline: ScalingLaw | None, delta: float) -> tuple[str, engine.FitSpec]:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    r_values = sorted(set(np.unique(data.r).tolist()))
    if baseline is not None:
        if not isinstance(baseline, ScalingLaw):
            raise TypeError(f"baseline must be a ScalingLaw, got {type(baseline).__name__}")
        if not np.any((data.r > 1) & (data.n_rec > 0)):
            raise ValueError("a probe fit needs runs with r > 1 and n_rec > 0: phi only acts on recurrent parameters")
        free = tuple(i == I_PHI for i in range(N_PARAMS))
        return "probe", engine.FitSpec(free=free, fixed=tuple(law_to_theta(baseline)), delta=delta)
    if form == "auto":
        form = "dense" if r_values == [1.0] or not np.any(data.n_rec > 0) else "looped"
    if form == "looped" and len(r_values) < 2:
        raise ValueError(f"phi is not identifiable: every run has r={r_values[0]:g}, so r^phi is one constant "
                         f"absorbed into A. Add runs at a second r value, or fit form='dense'")
    if form == "looped" and not np.any(data.n_rec > 0):
        raise ValueError("phi is not identifiable: no run has recurrent parameters (n_rec > 0); fit form='dense'")
    dense = form == "dense"
    free = tuple(not (dense and i == I_PHI) for i in range(N_PARAMS))
    return form, engine.FitSpec(free=free, fixed=(0.0,) * N_PARAMS, delta=delta)


def fit_law(results: Any, bootstrap: int = 1000, seed: int | None = 0, *, form: str = "auto",
            variant: str | None = None, baseline: ScalingLaw | None = None, exclude_highest_loss: int = 0,
            delta: float = DEFAULT_DELTA, start_grid: dict[str, tuple[float, ...]] | None = None,
            n_starts: int | None = engine.DEFAULT_N_STARTS, n_jobs: int | None = None,
            extrapolation: bool = True, level: float = DEFAULT_LEVEL, profile: bool = True,
            init: ScalingLaw | None = None, allow_mixed: bool = False) -> ScalingLaw:
    """Fit L = E + A*(N_once + r^phi*N_rec)^-alpha + B*D^-beta (or the dense form) to finished runs.

    results: a results store (folder or pyarrow.fs URI), a .parquet/.csv file, a pyarrow.Table, a
        pandas.DataFrame (columns n_once, n_rec, r, tokens, val_loss; or a dense `params` column) or a
        RunTable from analysis.load_runs.
    bootstrap: resamples of the runs for percentile intervals (0 = none).
    form: "looped", "dense" (phi absent, N = N_once + N_rec) or "auto" (dense when every run has r=1).
    variant: fit only the runs of this variant.
    baseline: a fitted law; when given, only phi is refitted (a probe, e.g. truncated backprop) with
        every other coefficient held at the baseline's values.
    exclude_highest_loss: drop the k highest-loss runs (Epoch's handling of Chinchilla: 5).
    start_grid: overrides of engine.EPOCH_GRID values per parameter name (a, alpha, b, beta, e, phi).
    n_starts: L-BFGS-B runs from the best-screened grid points (None = every grid point).
    n_jobs: processes for the bootstrap (default: the CPUs this process may use).
    extrapolation: compute the leave-one-budget-out extrapolation error.
    profile: add phi's profile-likelihood interval as ci["phi_profile"] (see analysis.profile).
    init: a law (e.g. the previous fit of a growing sweep) to start L-BFGS-B from besides the screened grid.
    allow_mixed: fit runs that differ in model family, injection, head_dim, vocab_size, seq_len or optimizer
        (refused otherwise: such a law prices the difference between the models, not their scale).

    The law records what it was fitted on in meta["models"] (analysis.data.describe_models), so its design queries
    answer in that family and flag extrapolation beyond the fitted ranges.
    """
    t0 = time.perf_counter()
    if int(bootstrap) != bootstrap or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    if n_starts is not None and n_starts < 1:
        raise ValueError(f"n_starts must be >= 1 or None (all grid points), got {n_starts!r}")
    if isinstance(results, RunTable):
        table = results
    else:
        table = load_runs(results, variant=variant, exclude_highest_loss=exclude_highest_loss)
    models = _fitted_models(table, allow_mixed)
    data = _fit_data(table)
    if len(data) == 0:
        raise ValueError("no completed runs to fit" + (f"; excluded: {table.excluded[:5]}" if table.excluded else ""))
    kind, spec = _choose_spec(data, form, baseline, delta)
    dense = kind == "dense"
    if len(data) < spec.n_free + 1:
        raise ValueError(f"too few runs: {len(data)} completed run(s) for {spec.n_free} free parameters "
                         f"({kind} form); need at least {spec.n_free + 1}")

    opt = engine.multistart(data, spec, engine.start_grid(spec, start_grid), n_starts=n_starts,
                            always=None if init is None else law_to_theta(init)[None])
    phi_profile = profile_phi_interval(data, spec, opt, level) if profile and spec.free[I_PHI] else None
    draws_theta = engine.bootstrap(data, spec, opt, int(bootstrap), seed=seed, n_jobs=n_jobs)
    loo = None
    if extrapolation and table.frame["budget"].nunique() >= 2:
        loo = engine.leave_one_budget_out(data, spec, opt, table.frame["budget"].to_numpy(), table.budget_labels)
    ok = np.all(np.isfinite(draws_theta), axis=1)

    point = {k: float(v) for k, v in theta_to_coeffs(opt.theta, dense).items()}
    draw_coeffs = theta_to_coeffs(draws_theta[ok], dense)
    free_names = {"a": "A", "b": "B", "e": "E"}
    varied = [free_names.get(PARAM_NAMES[i], PARAM_NAMES[i]) for i in range(N_PARAMS) if spec.free[i]]
    ci: dict[str, tuple[float, float]] = {}
    if ok.sum() >= 2:
        for k in COEFFS:
            if k in varied:
                lo, hi = percentile_interval(draw_coeffs[k], level)
                ci[k] = (float(lo), float(hi))
        derived = derived_quantities(draw_coeffs)
        for k, v in derived.items():
            if kind != "probe" or k.startswith("rec_multiplier"):
                lo, hi = percentile_interval(v, level)
                ci[k] = (float(lo), float(hi))
    if phi_profile is not None:
        ci["phi_profile"] = (float(phi_profile[0]), float(phi_profile[1]))

    meta = {
        "form": kind if kind != "probe" else "looped",
        "probe": kind == "probe",
        "delta": delta,
        "objective": opt.fun,
        "n_bootstrap": int(bootstrap),
        "n_bootstrap_failed": int((~ok).sum()),
        "level": level,
        "seed": seed,
        "n_starts": n_starts,
        "local_optima": len(opt.candidates),
        "variant": variant if variant is not None else table.variant,
        "exclude_highest_loss": sum("highest-loss" in e["reason"] for e in table.excluded),
        "r_values": sorted(set(np.unique(data.r).astype(float).tolist())),
        "fit_seconds": round(time.perf_counter() - t0, 3),
        "parameterisation": "log L = LSE(a - alpha*log N_eff, b - beta*log D, e); Huber(delta) on log residuals, summed",
    }
    meta["models"] = models
    if table.notes:
        meta["notes"] = list(table.notes)
    unidentified = _not_identified(point, dense, spec)
    if unidentified:
        # An optimum pinned to a search bound, or at a scale no loss curve has, means these runs do not identify that
        # coefficient: say so, don't clip it away.
        meta["not_identified"] = unidentified
        meta["warning"] = "; ".join(unidentified.values()) + "; do not read them as results"
    if kind == "probe":
        meta["baseline"] = baseline.coefficients
        meta["note"] = "probe: only phi refitted; other coefficients held at the baseline, so intervals reflect phi alone"
    draws = np.column_stack([draw_coeffs[k] for k in COEFFS]) if ok.any() else None
    law = ScalingLaw(E=point["E"], A=point["A"], alpha=point["alpha"], B=point["B"], beta=point["beta"],
                     phi=None if dense else point["phi"], ci=ci, r2=engine.r_squared(opt.theta, data),
                     n_runs=len(data), loo=loo, excluded=list(table.excluded), draws=draws, meta=meta)
    _attach_loop_check(law, table, results, meta["variant"], spec.n_free)
    return law


# Scales no loss curve of a language model has: a fit that lands there traded one coefficient against another.
ABSURD_E = 1e-6  # the irreducible loss (nats) effectively zero
ABSURD_SCALE = 1e12  # A or B: the power law's prefactor exploding to make up for a vanishing exponent


def _not_identified(point: dict[str, float], dense: bool, spec: engine.FitSpec) -> dict[str, str]:
    """Each coefficient the runs do not identify, with why: free and on its search bound (engine.PHI_BOUNDS), E below
    ABSURD_E, A or B above ABSURD_SCALE."""
    out = {}
    if not dense and spec.free[I_PHI] and min(abs(point["phi"] - b) for b in engine.PHI_BOUNDS) < 1e-6:
        out["phi"] = (f"phi sits on its search bound {point['phi']:g} (bounds {list(engine.PHI_BOUNDS)}): these runs "
                      "do not identify it (too few sizes per budget, or runs too short to separate r)")
    if spec.free[I_E] and point["E"] < ABSURD_E:
        out["E"] = (f"E = {point['E']:.3g} sits at an absurd scale (< {ABSURD_E:g} nats): not identified, the "
                    "runs do not reach the loss floor")
    for k, i in (("A", I_A), ("B", I_B)):
        if spec.free[i] and point[k] > ABSURD_SCALE:
            out[k] = (f"{k} = {point[k]:.3g} sits at an absurd scale (> {ABSURD_SCALE:g}): not identified, traded "
                      f"against its exponent")
    return out


def _fitted_models(table: RunTable, allow_mixed: bool) -> dict:
    """What the fit sees (analysis.data.describe_models); runs of different models refused unless allow_mixed."""
    models = describe_models(table.frame)
    mixed = models.get("mixed")
    if mixed and not allow_mixed:
        fields = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in mixed.items())
        raise ValueError(f"the runs mix models that one law cannot describe ({fields}); fit each separately "
                         f"(e.g. variant=...), or pass allow_mixed=True (CLI: --allow-mixed) to fit them together")
    return models


def _attach_loop_check(law: ScalingLaw, table: RunTable, results: Any, variant: str | None, n_free: int) -> None:
    """Per-r residuals, the seed noise and the idle-loop check (analysis.loops) into law.meta, so every report of
    phi carries the evidence that its loops work."""
    f = table.frame
    predicted = law.predict(f["n_once"].to_numpy(float), f["n_rec"].to_numpy(float), f["r"].to_numpy(float),
                            f["tokens"].to_numpy(float))
    residual = f["val_loss"].to_numpy(float) - np.asarray(predicted, dtype=float)
    dof = len(f) - n_free
    residual_sd = float(np.sqrt((residual ** 2).sum() / dof)) if dof > 0 else float("nan")
    law.meta["residual_by_r"] = {str(k): v for k, v in residuals_by_r(f, predicted).items()}
    law.meta["residual_sd"] = residual_sd
    if law.phi is None:
        return
    is_store = isinstance(results, (str, Path)) and _is_store(str(results))
    check = (check_store(str(results), f, residual_sd, variant) if is_store
             else check_loops(f, residual_sd=residual_sd, variant=variant))
    law.meta["loops"] = check.to_dict()
    law.meta["loops_line"] = check.line()


def _is_store(source: str) -> bool:
    fs, root = filesystem(source)
    return fs.get_file_info(root.rstrip("/") + "/runs").type == pafs.FileType.Directory


def fit_probe(results: Any, baseline: ScalingLaw, variant: str | None = None, bootstrap: int = 1000,
              seed: int | None = 0, **kwargs) -> ScalingLaw:
    """Refit only phi for a variant (truncated backprop, hyper-connections) against a baseline law.

    Every other coefficient is frozen at the baseline's point estimate, so the interval of phi ignores the baseline's
    own uncertainty (its E, A, alpha, B, beta and its phi's error): too narrow for a difference of phis. For
    phi_variant - phi_baseline with an interval that carries both, use analysis.compare (one joint fit)."""
    return fit_law(results, bootstrap=bootstrap, seed=seed, variant=variant, baseline=baseline, **kwargs)
