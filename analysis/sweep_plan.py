"""`python -m analysis plan SPEC`: a sweep spec's grid priced before it runs (see analysis.planning).

The spec is expanded by the sweep's own code (tuning.grid), so the runs priced are exactly those the sweep would
train: the baseline variant's cells with models.accounting's N_once, N_rec, F and tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import planning
from .law import ScalingLaw


def _cells(spec_path: str):
    from tuning.grid import candidate_cells, expand
    from tuning.spec import SweepSpec

    spec = SweepSpec.from_yaml(spec_path)
    return spec, [c for c in expand(spec) if c.variant == spec.baseline.name], candidate_cells


def _points(cells) -> planning.DesignPoints:
    return planning.DesignPoints.from_runs([c.run for c in cells], [c.label for c in cells])


def _cell_rows(cells, points: planning.DesignPoints, info: np.ndarray | None = None) -> list[dict[str, Any]]:
    rows = []
    for i, c in enumerate(cells):
        row = {"budget": c.compute, "width": c.width, "r": c.r, "variant": c.variant, "n_once": points.n_once[i],
               "n_rec": points.n_rec[i], "tokens": points.tokens[i], "flops": points.flops[i]}
        if info is not None:
            row |= {"phi_information": info[i], "phi_information_per_flop": info[i] / points.flops[i]}
        rows.append(row)
    return rows


def _design(cells, points: planning.DesignPoints, picks: list[int], precision: planning.Precision) -> dict:
    chosen = [cells[i] for i in picks]
    return {**precision.to_dict(), "cells": _cell_rows(chosen, points.subset(picks))}


def plan_spec(spec_path: str, law: ScalingLaw, noise: float = 0.01, *, suggest: bool = False, simulate: int = 0,
              seed: int = 0, n_jobs: int | None = None) -> dict[str, Any]:
    """The plan as a JSON-able dict: phi_sd, phi_halfwidth, ..., total_flops, cells (+ suggest, simulate)."""
    spec, cells, candidate_cells = _cells(spec_path)
    points = _points(cells)
    precision = planning.predict_precision(law, points, noise)
    info = planning.phi_information(law, points, noise)
    out: dict[str, Any] = {"spec": spec.name, "prior": law.coefficients, **precision.to_dict(),
                           "cells": _cell_rows(cells, points, info)}
    if suggest:
        pool = candidate_cells(spec)
        pool_points = _points(pool)
        found = planning.suggest(law, points, pool_points, noise)
        out["suggest"] = {"n_candidates": len(pool)} | {
            key: _design(pool, pool_points, found[key]["picks"], found[key]["precision"])
            for key in ("equal_flops", "equal_interval")}
    if simulate:
        out["simulate"] = planning.simulate(law, points, simulate, noise, seed=seed, n_jobs=n_jobs)
    return out


def _grouped(cells: list[dict]) -> list[str]:
    """Cells as one line per budget: `C=1e18: s6 r1,2,8 | s8 r1,8`."""
    by_budget: dict[float, dict[int, list[int]]] = {}
    for c in cells:
        by_budget.setdefault(c["budget"], {}).setdefault(c["width"], []).append(c["r"])
    return [f"    C={b:.3g}: " + " | ".join(f"w{w} r{','.join(str(r) for r in sorted(rs))}"
                                       for w, rs in sorted(widths.items()))
            for b, widths in sorted(by_budget.items())]


def render(plan: dict[str, Any], top: int = 10) -> str:
    """The plan as text for a terminal."""
    prior = plan["prior"]
    lines = [f"plan for sweep {plan['spec']!r}: {plan['n_runs']} runs, {plan['total_flops']:.3g} FLOPs; "
             f"{plan['noise']:.3g} log-normal loss noise; prior law phi={prior['phi']:.3g} alpha={prior['alpha']:.3g} "
             f"beta={prior['beta']:.3g}",
             f"  {'':6} {'sd':>8} {'95% +-':>8} {'Cramer-Rao sd':>14}"]
    for name in planning.REPORTED:
        lines.append(f"  {name:6} {plan[name + '_sd']:8.4f} {plan[name + '_halfwidth']:8.4f} "
                     f"{plan[name + '_sd_cramer_rao']:14.4f}")
    lines.append("  (sd: the project's Huber fit; Cramer-Rao: the bound for any fitter on this grid)")
    best = sorted(plan["cells"], key=lambda c: -c["phi_information_per_flop"])[:top]
    lines.append(f"information about phi per FLOP, best {len(best)} of {len(plan['cells'])} cells (--json: all):")
    for c in best:
        lines.append(f"  C={c['budget']:<8.3g} w={c['width']:<3} r={c['r']:<2} {c['flops']:.3g} FLOPs  "
                     f"1/var(phi) +{c['phi_information']:.3g}  ({c['phi_information_per_flop']:.3g} per FLOP)")
    if "suggest" in plan:
        s = plan["suggest"]
        eq_f, eq_i = s["equal_flops"], s["equal_interval"]
        lines.append(f"suggest (greedy over {s['n_candidates']} candidate cells, sizes x budgets x r):")
        lines.append(f"  same FLOPs ({eq_f['total_flops']:.3g}): {eq_f['n_runs']} runs, phi sd {eq_f['phi_sd']:.4f} "
                     f"(+-{eq_f['phi_halfwidth']:.4f}) instead of {plan['phi_sd']:.4f}")
        lines += _grouped(eq_f["cells"])
        lines.append(f"  same interval (phi sd {eq_i['phi_sd']:.4f}): {eq_i['n_runs']} runs, {eq_i['total_flops']:.3g} "
                     f"FLOPs = {eq_i['total_flops'] / plan['total_flops']:.0%} of the grid's")
        lines += _grouped(eq_i["cells"])
    if "simulate" in plan:
        m = plan["simulate"]
        lines.append(f"simulate: {m['n_draws']} noisy sweeps from the prior, each fitted by analysis.fit_law "
                     f"({m['n_failed']} failed):")
        lines.append(f"  sd(phi) {m['phi_sd']:.4f} measured vs {m['predicted_phi_sd']:.4f} predicted "
                     f"(rmse {m['phi_rmse']:.4f}, bias {m['phi_bias']:+.4f})")
        lines.append(f"  coverage of the 95% interval: {m['coverage_profile']:.0%} profile-likelihood, "
                     f"{m['coverage_planned']:.0%} planned (phi_hat +-{m['predicted_phi_halfwidth']:.4f})")
    return "\n".join(lines)


def isoflop_optima(spec: Any, law: ScalingLaw) -> list[dict[str, Any]]:
    """Per budget and r of the spec's baseline: the width the law predicts lowest at that budget, searched over
    every valid width from the budget's smallest to its largest, and whether it is interior (strictly between
    them). An interior optimum at every budget is what makes an IsoFLOP grid pin the law's parameter term."""
    from tuning.grid import run_config

    out = []
    for budget in spec.budgets:
        lo, hi = min(budget.widths), max(budget.widths)
        for r in spec.r:
            widths, runs = [], []
            for width in range(lo, hi + 1):
                try:
                    runs.append(run_config(spec, compute=budget.compute, width=width, r=r, variant=spec.baseline,
                                           lr=1e-3))
                except ValueError:  # not a width of the family (e.g. not a multiple of head_dim)
                    continue
                widths.append(width)
            points = planning.DesignPoints.from_runs(runs)
            loss = np.asarray(law.predict(points.n_once, points.n_rec, points.r, points.tokens), dtype=float)
            best = int(np.argmin(loss))
            out.append({"budget": budget.compute, "r": r, "width": widths[best], "loss": float(loss[best]),
                        "grid": sorted(budget.widths), "interior": 0 < best < len(runs) - 1})
    return out
