"""Delta phi with an honest interval: a variant's phi against the baseline's, from one joint fit of both.

    L = E + A*(N_once + r^phi_g * N_rec)^(-alpha) + B*D^(-beta),   phi_g = phi_baseline + dphi on the variant's runs

E, A, alpha, B, beta are shared by both variants and fitted with them; the baseline's runs and the variant's runs
each pin their own phi, and dphi = phi_variant - phi_baseline is a parameter of the fit (analysis.objective's joint
form). Its intervals therefore carry the baseline's own uncertainty, which `fit --baseline` (fit_probe: phi alone
refitted with every other coefficient frozen at the baseline law's point estimate) leaves out:
- bootstrap: runs resampled with replacement within each variant (stratified, so each resample keeps both variants
  at full size), the joint fit redone on each, percentile intervals of phi_baseline, phi_variant and dphi;
- profile likelihood: the entry held, everything else refitted, the Huber objective's rise scaled to chi^2_1
  (analysis.profile), for dphi, phi_baseline and phi_variant.
The verdict says whether the data can tell the two phis apart: every interval computed for dphi excludes 0.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import engine
from .data import RunTable, describe_models, load_runs, mixed_models, model_rows
from .intervals import DEFAULT_LEVEL, percentile_interval
from .objective import DEFAULT_DELTA, I_A, I_ALPHA, I_B, I_BETA, I_E, I_PHI, N_PARAMS, FitData, log_predict
from .optimal import compact, format_table
from .profile import profile_interval

I_DPHI = N_PARAMS  # the variant's phi offset: theta = (a, alpha, b, beta, e, phi_baseline, dphi)
# What the two variants must share: one law's E, A, alpha, B, beta describe them only if they are the same models but
# for what is being compared (injection, truncated backprop, lanes, recipe are free to differ).
SAME_FIELDS = ("family", "vocab_size", "seq_len", "head_dim")
DEFAULT_BOOTSTRAP = 1000
QUANTITIES = ("phi_baseline", "phi_variant", "delta_phi")
PHI_BOUND_TOLERANCE = 1e-3  # an estimate or interval end this close to a bound of phi's search sits on it


@dataclass
class Comparison:
    """Result of `compare`: the two phis and their difference, each with a bootstrap and a profile interval."""

    variant: str
    baseline: str
    n_runs: dict[str, int]  # {baseline name: runs, variant name: runs}
    estimate: dict[str, float]  # phi_baseline, phi_variant, delta_phi
    bootstrap_ci: dict[str, tuple[float, float]]  # empty without a bootstrap
    profile_ci: dict[str, tuple[float, float]]  # empty with profile=False
    shared: dict[str, float]  # E, A, alpha, B, beta of the joint fit
    level: float = DEFAULT_LEVEL
    n_bootstrap: int = 0
    n_bootstrap_failed: int = 0
    seed: int | None = 0
    r2: float = float("nan")
    residual_sd: float = float("nan")
    models: dict[str, Any] = field(default_factory=dict)
    loops: dict[str, dict] = field(default_factory=dict)  # per variant: analysis.loops' {"line", "warning"}
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fit_seconds: float = 0.0

    # ---- the verdict -------------------------------------------------------------------------------------------
    def excludes_zero(self) -> dict[str, bool]:
        """Per interval method computed: does dphi's interval exclude 0?"""
        out = {}
        for method, ci in (("bootstrap", self.bootstrap_ci), ("profile", self.profile_ci)):
            if "delta_phi" in ci:
                lo, hi = ci["delta_phi"]
                out[method] = bool(lo > 0 or hi < 0)
        return out

    def at_bound(self) -> list[str]:
        """Variants whose phi estimate or interval reaches phi's search bounds: the runs do not pin that phi, so an
        interval on delta phi is cut by the bound, not measured."""
        names = []
        for q, name in (("phi_baseline", self.baseline), ("phi_variant", self.variant)):
            ends = [self.estimate[q]] + [v for ci in (self.bootstrap_ci, self.profile_ci) for v in ci.get(q, ())]
            if any(abs(v - b) < PHI_BOUND_TOLERANCE for v in ends for b in engine.PHI_BOUNDS):
                names.append(name)
        return names

    @property
    def distinguishable(self) -> bool:
        """The data can tell the two phis apart: every dphi interval computed excludes 0, and neither phi reaches
        its search bound."""
        ex = self.excludes_zero()
        return bool(ex) and all(ex.values()) and not self.at_bound()

    @property
    def verdict(self) -> str:
        ex = self.excludes_zero()
        pct = f"{self.level:.0%}"
        unpinned = self.at_bound()
        if unpinned:
            return (f"no verdict: phi of {' and '.join(map(repr, unpinned))} reaches its search bound "
                    f"{list(engine.PHI_BOUNDS)} (estimate or {pct} interval), so these runs do not pin it and delta "
                    "phi's interval is set by the bound")
        if not ex:
            return "no interval for delta phi was computed (bootstrap=0 and profile=False): no verdict"
        if all(ex.values()):
            return (f"the data can tell them apart: delta phi's {pct} interval"
                    f"{'s' if len(ex) > 1 else ''} ({' and '.join(ex)}) exclude{'' if len(ex) > 1 else 's'} 0")
        if not any(ex.values()):
            return (f"the data cannot tell them apart: delta phi's {pct} interval"
                    f"{'s' if len(ex) > 1 else ''} ({' and '.join(ex)}) include{'' if len(ex) > 1 else 's'} 0")
        yes = [m for m, v in ex.items() if v]
        no = [m for m, v in ex.items() if not v]
        return (f"the data cannot tell them apart (borderline): the {' and '.join(yes)} interval excludes 0, the "
                f"{' and '.join(no)} interval does not")

    # ---- reports -------------------------------------------------------------------------------------------------
    def line(self) -> str:
        """One line: delta phi, its intervals, the runs and the verdict (the sweep's report)."""
        d = self.estimate["delta_phi"]
        cis = [f"{m} [{lo:+.3f}, {hi:+.3f}]" for m, ci in (("bootstrap", self.bootstrap_ci),
                                                          ("profile", self.profile_ci))
               if "delta_phi" in ci for lo, hi in [ci["delta_phi"]]]
        ci = f" ({self.level:.0%} CI {', '.join(cis)})" if cis else ""
        est = self.estimate
        return (f"delta phi = phi {self.variant} - phi {self.baseline} = {d:+.3f}{ci}; phi {self.baseline} "
                f"{est['phi_baseline']:.3f}, phi {self.variant} {est['phi_variant']:.3f}; joint fit on "
                f"{self.n_runs[self.baseline]} + {self.n_runs[self.variant]} runs: {self.verdict}")

    def __str__(self) -> str:
        pct = f"{self.level:.0%}"
        labels = {"phi_baseline": f"phi ({self.baseline})", "phi_variant": f"phi ({self.variant})",
                  "delta_phi": f"delta phi ({self.variant} - {self.baseline})"}
        runs = {"phi_baseline": str(self.n_runs[self.baseline]), "phi_variant": str(self.n_runs[self.variant]),
                "delta_phi": str(sum(self.n_runs.values()))}
        fmt = "{:+.4f}".format
        rows = []
        for q in QUANTITIES:
            value = fmt(self.estimate[q]) if q == "delta_phi" else f"{self.estimate[q]:.4f}"
            cis = []
            for ci in (self.bootstrap_ci, self.profile_ci):
                lo_hi = ci.get(q)
                cis.append("-" if lo_hi is None else (f"[{fmt(lo_hi[0])}, {fmt(lo_hi[1])}]" if q == "delta_phi"
                                                      else f"[{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]"))
            rows.append([labels[q], value, *cis, runs[q]])
        header = ["", "estimate", f"{pct} CI bootstrap", f"{pct} CI profile", "runs"]
        s = self.shared
        lines = [f"compare: variant {self.variant!r} against {self.baseline!r}, one joint fit (E, A, alpha, B, beta "
                 f"shared; one phi per variant)"]
        lines += format_table(rows, header, right={1, 4})
        boot = (f"{self.n_bootstrap} bootstrap resamples of the runs within each variant"
                + (f" ({self.n_bootstrap_failed} failed)" if self.n_bootstrap_failed else "")
                if self.n_bootstrap else "no bootstrap")
        lines.append(f"shared: E={s['E']:.4f} A={compact(s['A'])} alpha={s['alpha']:.4f} B={compact(s['B'])} "
                     f"beta={s['beta']:.4f}; R^2={self.r2:.4f}, residual sd {self.residual_sd:.4f} (log loss); {boot}")
        for name, check in self.loops.items():
            lines.append(f"{name}: {check['line']}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"WARNING: {w}" for w in self.warnings]
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def interval(ci, q):
            return None if q not in ci else [float(ci[q][0]), float(ci[q][1])]

        return {
            "variant": self.variant, "baseline": self.baseline, "n_runs": dict(self.n_runs),
            **{q: {"estimate": float(self.estimate[q]), "bootstrap_ci": interval(self.bootstrap_ci, q),
                   "profile_ci": interval(self.profile_ci, q)} for q in QUANTITIES},
            "distinguishable": self.distinguishable, "verdict": self.verdict,
            "excludes_zero": self.excludes_zero(), "level": self.level,
            "shared": dict(self.shared), "r2": self.r2, "residual_sd": self.residual_sd,
            "n_bootstrap": self.n_bootstrap, "n_bootstrap_failed": self.n_bootstrap_failed, "seed": self.seed,
            "models": self.models, "loops": {k: dict(v) for k, v in self.loops.items()}, "notes": list(self.notes),
            "warnings": list(self.warnings), "fit_seconds": self.fit_seconds,
            "method": "joint fit (E, A, alpha, B, beta shared; phi_variant = phi_baseline + delta_phi on the variant's "
                      "runs); bootstrap: runs resampled within each variant, percentile; profile: Huber objective "
                      "rise scaled to chi^2_1",
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        return path


# ---- the comparison ------------------------------------------------------------------------------------------------
def _load(results: Any, name: str, role: str, exclude_highest_loss: int) -> RunTable:
    if isinstance(results, RunTable):
        raise TypeError("compare needs the runs of both variants: give a results store, a table or a DataFrame, "
                        "not a RunTable of one variant")
    try:
        table = load_runs(results, variant=name, exclude_highest_loss=exclude_highest_loss)
    except ValueError as exc:
        raise ValueError(f"compare: {role} variant {name!r}: {exc}") from None
    if len(table) == 0:
        why = "; ".join(f"{e['run']}: {e['reason']}" for e in table.excluded
                        if "variant" not in e["reason"] and "seed-noise" not in e["reason"])[:300]
        raise ValueError(f"compare: {role} variant {name!r} has no completed runs" + (f" ({why})" if why else ""))
    return table


def _check_models(base: RunTable, var: RunTable, baseline: str, variant: str, allow_mixed: bool) -> dict:
    """Each variant's models (describe_models), refused where one variant mixes models, or where the two differ in
    SAME_FIELDS: one E, A, alpha, B, beta cannot describe both then."""
    models = {}
    for name, table in ((baseline, base), (variant, var)):
        models[name] = describe_models(table.frame)
        mixed = models[name].get("mixed")
        if mixed and not allow_mixed:
            fields = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in mixed.items())
            raise ValueError(f"compare: variant {name!r} mixes models that one law cannot describe ({fields}); "
                             f"pass allow_mixed=True (CLI: --allow-mixed) to fit them anyway")
    rows = [model_rows(t.frame) for t in (base, var)]
    if not allow_mixed and all(r is not None for r in rows):
        differ = {k: v for k, v in mixed_models(pd.concat(rows)).items() if k in SAME_FIELDS}
        if differ:
            per = "; ".join(f"{k}: {baseline!r} {_values(rows[0], k)}, {variant!r} {_values(rows[1], k)}"
                            for k in differ)
            raise ValueError(f"compare: variants {baseline!r} and {variant!r} are different models ({per}); a joint "
                             f"fit shares E, A, alpha, B, beta, so only what is being compared (injection, bptt_k, "
                             f"lanes, recipe) may differ. Pass allow_mixed=True (CLI: --allow-mixed) to fit them "
                             f"anyway")
    return models


def _values(rows: pd.DataFrame, name: str) -> list:
    return sorted({v for v in rows[name] if v is not None}, key=str)


def _data(base: RunTable, var: RunTable) -> FitData:
    f = pd.concat([base.frame[["n_once", "n_rec", "r", "tokens", "val_loss"]],
                   var.frame[["n_once", "n_rec", "r", "tokens", "val_loss"]]], ignore_index=True)
    group = np.r_[np.zeros(len(base), dtype=np.intp), np.ones(len(var), dtype=np.intp)]
    return FitData.from_arrays(f["n_once"], f["n_rec"], f["r"], f["tokens"], f["val_loss"], group)


def _check_identifiable(data: FitData, baseline: str, variant: str) -> None:
    looped = (data.r > 1) & (data.n_rec > 0)
    if not np.any(looped[data.group == 1]):
        raise ValueError(f"compare: variant {variant!r} has no run with r > 1 and recurrent parameters: its phi is "
                         f"not identifiable (phi only acts on N_rec at r > 1)")
    r_base = np.unique(data.r[data.group == 0])
    if len(r_base) < 2 or not np.any(looped[data.group == 0]):
        raise ValueError(f"compare: baseline variant {baseline!r} has runs at r = "
                         f"{', '.join(f'{r:g}' for r in r_base)} only: its phi is not identifiable; it needs runs at "
                         f"two r values or more, one of them > 1")
    n_free = N_PARAMS + 1
    if len(data) < n_free + 1:
        raise ValueError(f"compare: too few runs: {len(data)} completed run(s) of {baseline!r} and {variant!r} for "
                         f"{n_free} free parameters; need at least {n_free + 1}")


def _swap(data: FitData, theta: np.ndarray) -> tuple[FitData, np.ndarray]:
    """The same fit with the variant as group 0: theta's phi is then phi_variant and dphi is -delta_phi."""
    swapped = FitData(data.n_once, data.n_rec, data.r, data.tokens, data.loss, 1 - data.group)
    t = theta.copy()
    t[I_PHI], t[I_DPHI] = theta[I_PHI] + theta[I_DPHI], -theta[I_DPHI]
    return swapped, t


def compare(results: Any, variant: str, baseline: str = "baseline", bootstrap: int = DEFAULT_BOOTSTRAP,
            seed: int | None = 0, *, level: float = DEFAULT_LEVEL, profile: bool = True,
            exclude_highest_loss: int = 0, delta: float = DEFAULT_DELTA,
            n_starts: int | None = engine.DEFAULT_N_STARTS, n_jobs: int | None = None, loops: bool = True,
            allow_mixed: bool = False) -> Comparison:
    """Fit the `baseline` and `variant` runs of `results` jointly (E, A, alpha, B, beta shared, one phi each) and
    state delta phi = phi_variant - phi_baseline with intervals that carry both variants' uncertainty.

    results: a results store (folder or pyarrow.fs URI), a .parquet/.csv file, a pyarrow Table or a DataFrame with a
        `variant` column holding both variants.
    bootstrap: resamples of the runs, drawn within each variant, for percentile intervals (0 = none).
    profile: profile-likelihood intervals of delta phi and of each phi (cheap: no resampling).
    exclude_highest_loss: drop each variant's k highest-loss runs.
    loops: attach each variant's idle-loop line (analysis.loops): a phi is only as good as its loops.
    allow_mixed: fit variants that differ in family, vocab_size, seq_len or head_dim (refused otherwise), or a
        variant whose own runs mix models.
    """
    t0 = time.perf_counter()
    if int(bootstrap) != bootstrap or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    if not isinstance(variant, str) or not variant:
        raise ValueError(f"compare: name the variant to compare, got {variant!r}")
    if variant == baseline:
        raise ValueError(f"compare: variant {variant!r} is the baseline itself; name another variant (or another "
                         f"baseline=...)")
    base = _load(results, baseline, "baseline", exclude_highest_loss)
    var = _load(results, variant, "compared", exclude_highest_loss)
    models = _check_models(base, var, baseline, variant, allow_mixed)
    data = _data(base, var)
    _check_identifiable(data, baseline, variant)

    spec = engine.FitSpec(free=(True,) * (N_PARAMS + 1), fixed=(0.0,) * (N_PARAMS + 1), delta=delta)
    opt = engine.multistart(data, spec, engine.start_grid(spec), n_starts=n_starts)
    theta = opt.theta
    estimate = {"phi_baseline": float(theta[I_PHI]), "phi_variant": float(theta[I_PHI] + theta[I_DPHI]),
                "delta_phi": float(theta[I_DPHI])}

    profile_ci: dict[str, tuple[float, float]] = {}
    if profile:
        profile_ci["phi_baseline"] = profile_interval(data, spec, opt, I_PHI, level)
        swapped, t_swapped = _swap(data, theta)
        profile_ci["phi_variant"] = profile_interval(swapped, spec, engine.Optimum(theta=t_swapped, fun=opt.fun),
                                                     I_PHI, level)
        profile_ci["delta_phi"] = profile_interval(data, spec, opt, I_DPHI, level)
        profile_ci = {k: (float(lo), float(hi)) for k, (lo, hi) in profile_ci.items()}

    draws = engine.bootstrap(data, spec, opt, int(bootstrap), seed=seed, n_jobs=n_jobs, strata=data.group)
    ok = np.all(np.isfinite(draws), axis=1)
    bootstrap_ci: dict[str, tuple[float, float]] = {}
    if ok.sum() >= 2:
        d = draws[ok]
        for q, values in (("phi_baseline", d[:, I_PHI]), ("phi_variant", d[:, I_PHI] + d[:, I_DPHI]),
                          ("delta_phi", d[:, I_DPHI])):
            lo, hi = percentile_interval(values, level)
            bootstrap_ci[q] = (float(lo), float(hi))

    res = log_predict(theta, data) - np.log(data.loss)
    residual_sd = float(np.sqrt(np.sum(res ** 2) / max(1, len(data) - spec.n_free)))
    pred = np.exp(log_predict(theta, data))
    ss_tot = float(np.sum((data.loss - data.loss.mean()) ** 2))
    r2 = 1.0 - float(np.sum((data.loss - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    shared = {"E": float(np.exp(theta[I_E])), "A": float(np.exp(theta[I_A])), "alpha": float(theta[I_ALPHA]),
              "B": float(np.exp(theta[I_B])), "beta": float(theta[I_BETA])}

    notes = list(dict.fromkeys(base.notes + var.notes))
    warnings = []
    for q, name in (("phi_baseline", baseline), ("phi_variant", variant)):
        if min(abs(estimate[q] - b) for b in engine.PHI_BOUNDS) < 1e-6:
            warnings.append(f"phi of {name!r} sits on its search bound {estimate[q]:g} (bounds "
                            f"{list(engine.PHI_BOUNDS)}): these runs do not identify it; do not read delta phi")
    if shared["E"] < 1e-6 or shared["A"] > 1e12 or shared["B"] > 1e12:
        warnings.append("a shared coefficient sits at an absurd scale (E < 1e-6 or A, B > 1e12): the joint fit does "
                        "not identify it")

    loop_checks = _loop_checks(results, {baseline: base, variant: var}, residual_sd) if loops else {}
    # Idle loops are a warning on the comparison itself: the sweep's report prints `warnings`, and a delta phi
    # between variants whose loops sit idle prices shallow networks.
    warnings += [f"{name}: {check['warning']}" for name, check in loop_checks.items() if check.get("warning")]

    return Comparison(variant=variant, baseline=baseline, n_runs={baseline: len(base), variant: len(var)},
                      estimate=estimate, bootstrap_ci=bootstrap_ci, profile_ci=profile_ci, shared=shared, level=level,
                      n_bootstrap=int(bootstrap), n_bootstrap_failed=int((~ok).sum()), seed=seed, r2=r2,
                      residual_sd=residual_sd, models=models, loops=loop_checks, notes=notes, warnings=warnings,
                      fit_seconds=round(time.perf_counter() - t0, 3))


def _loop_checks(results: Any, tables: dict[str, RunTable], residual_sd: float) -> dict[str, dict]:
    """Per variant: analysis.loops' line and warning (the store's seed replicates and depth tables when a store)."""
    from .fit import _is_store
    from .loops import check_loops, check_store

    is_store = isinstance(results, (str, Path)) and _is_store(str(results))
    out = {}
    for name, table in tables.items():
        check = (check_store(str(results), table.frame, residual_sd, name) if is_store
                 else check_loops(table.frame, residual_sd=residual_sd, variant=name))
        out[name] = {"line": check.line(), "warning": check.warning}
    return out
