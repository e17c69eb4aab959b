"""A sweep's grid priced before it runs (see analysis.planning), on plain cells.

A cell here is anything with `.run` (the RunConfig that trains it: models.accounting reads N_once, N_rec, F and
tokens from it), `.label`, `.compute`, `.width`, `.r` and `.variant`. The sweep layer expands a spec into such cells
(tuning.plan, behind `python -m tuning.plan SPEC`); the analysis layer never imports tuning.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import planning
from .law import ScalingLaw


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


def plan_cells(name: str, cells: Sequence[Any], law: ScalingLaw, noise: float = 0.01, *,
               candidates: Callable[[], Sequence[Any]] | None = None, simulate: int = 0, seed: int = 0,
               n_jobs: int | None = None) -> dict[str, Any]:
    """The plan of sweep `name` training `cells`, as a JSON-able dict: phi_sd, phi_halfwidth, ..., total_flops,
    cells (+ suggest, when `candidates` gives the cells a better grid may pick from; + simulate)."""
    points = _points(cells)
    precision = planning.predict_precision(law, points, noise)
    info = planning.phi_information(law, points, noise)
    out: dict[str, Any] = {"spec": name, "prior": law.coefficients, **precision.to_dict(),
                           "unidentified": planning.unidentified(points), "cells": _cell_rows(cells, points, info)}
    if candidates is not None:
        pool = list(candidates())
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
    for reason in plan.get("unidentified", []):
        lines.append(f"  not identified (sd inf): {reason}")
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


def isoflop_optima(law: ScalingLaw, cells: Sequence[Any], grids: Mapping[float, Sequence[int]]) -> list[dict[str, Any]]:
    """Per budget and r: the width the law predicts lowest among `cells` (plain cells, one per candidate width of
    each budget and r, in order of width), and whether it is interior (strictly inside the range searched).
    `grids` maps each budget to the widths its grid trains. An interior optimum at every budget is what makes an
    IsoFLOP grid pin the law's parameter term."""
    curves: dict[tuple[float, int], list[Any]] = {}
    for c in cells:
        curves.setdefault((c.compute, c.r), []).append(c)
    out = []
    for (budget, r), curve in curves.items():
        curve = sorted(curve, key=lambda c: c.width)
        points = planning.DesignPoints.from_runs([c.run for c in curve])
        loss = np.asarray(law.predict(points.n_once, points.n_rec, points.r, points.tokens), dtype=float)
        best = int(np.argmin(loss))
        out.append({"budget": budget, "r": r, "width": curve[best].width, "loss": float(loss[best]),
                    "grid": sorted(grids[budget]), "interior": 0 < best < len(curve) - 1})
    return out
