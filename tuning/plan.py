"""A sweep spec priced before it runs, and the IsoFLOP check of a fitted law against a spec's budgets.

Both expand the spec with the sweep's own code (tuning.grid), so the runs priced are exactly those the sweep would
train: the baseline variant's cells with models.accounting's N_once, N_rec, F and tokens. The arithmetic on those
cells is the analysis layer's (analysis.sweep_plan, analysis.planning), which never imports tuning.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NamedTuple

from analysis import sweep_plan
from analysis.cli import load_law
from analysis.law import ScalingLaw
from tuning.grid import candidate_cells, expand, run_config
from tuning.spec import SweepSpec


def plan_spec(spec_path: str, law: ScalingLaw, noise: float = 0.01, *, suggest: bool = False, simulate: int = 0,
              seed: int = 0, n_jobs: int | None = None) -> dict[str, Any]:
    """`python -m tuning.plan SPEC`: the plan of the spec's baseline cells as a JSON-able dict (see
    analysis.sweep_plan.plan_cells); `suggest` picks a better grid from tuning.grid.candidate_cells."""
    spec = SweepSpec.from_yaml(spec_path)
    cells = [c for c in expand(spec) if c.variant == spec.baseline.name]
    return sweep_plan.plan_cells(spec.name, cells, law, noise, candidates=(lambda: candidate_cells(spec)) if suggest
                                 else None, simulate=simulate, seed=seed, n_jobs=n_jobs)


render = sweep_plan.render


class WidthCell(NamedTuple):
    """One candidate width of a budget's IsoFLOP curve (a plain cell for analysis.sweep_plan.isoflop_optima)."""
    compute: float
    width: int
    r: int
    run: Any


def isoflop_cells(spec: SweepSpec) -> list[WidthCell]:
    """Per budget and r of the spec's baseline: a cell at every valid width from the budget's smallest to its
    largest (widths the family cannot build, e.g. not a multiple of head_dim, are left out)."""
    cells = []
    for budget in spec.budgets:
        for r in spec.r:
            for width in range(min(budget.widths), max(budget.widths) + 1):
                try:
                    run = run_config(spec, compute=budget.compute, width=width, r=r, variant=spec.baseline, lr=1e-3)
                except ValueError:  # not a width of the family
                    continue
                cells.append(WidthCell(budget.compute, width, r, run))
    return cells


def isoflop_optima(spec: SweepSpec, law: ScalingLaw) -> list[dict[str, Any]]:
    """Per budget and r of the spec's baseline: the width the law predicts lowest at that budget, searched over
    every valid width from the budget's smallest to its largest, and whether it is interior (strictly between
    them). An interior optimum at every budget is what makes an IsoFLOP grid pin the law's parameter term."""
    return sweep_plan.isoflop_optima(law, isoflop_cells(spec), {b.compute: b.widths for b in spec.budgets})


def _parser() -> argparse.ArgumentParser:
    plan = argparse.ArgumentParser(prog="python -m tuning.plan",
                                   description="Predict how precisely a sweep spec's grid pins phi, before it runs: "
                                               "predicted sd and 95%% half-width of phi, alpha, beta (Fisher "
                                               "information of the law at a prior), total FLOPs, each cell's "
                                               "information per FLOP.")
    plan.add_argument("spec", help="sweep spec YAML (e.g. tuning/configs/reference.yaml)")
    plan.add_argument("--noise", type=float, default=0.01, help="log-normal loss noise, sd of log loss (default 0.01)")
    plan.add_argument("--law", default="reference", help="prior law: `reference` (published) or a law JSON")
    plan.add_argument("--suggest", action="store_true",
                      help="also a greedy grid with the same FLOPs (smaller interval) and one with the same interval")
    plan.add_argument("--simulate", type=int, default=0, metavar="N",
                      help="fit N noisy sweeps drawn from the prior with the real fitter; measured sd and coverage")
    plan.add_argument("--seed", type=int, default=0, help="seed of the simulated noise")
    plan.add_argument("--jobs", type=int, default=None, help="processes for --simulate (default: all CPUs)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (every cell) instead of text")
    return plan


def main(argv: list[str] | None = None) -> int:
    """`python -m tuning.plan SPEC` (`looplaw plan SPEC`): how precisely the spec's grid would pin phi."""
    a = _parser().parse_args(argv)
    try:
        plan = plan_spec(a.spec, load_law(a.law), a.noise, suggest=a.suggest, simulate=a.simulate, seed=a.seed,
                         n_jobs=a.jobs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=1, default=str) if a.json else render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
