"""The law's compute-optimal width per budget, searched over every valid width of a budget's range: the check that
a sweep's IsoFLOP curves have interior minima (tuning.sweep.report_isoflop_optima, tuning.plan on
analysis.sweep_plan)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from analysis import ScalingLaw
from tuning.plan import isoflop_optima
from tuning.spec import SweepSpec
from tuning.sweep import DEFAULT_CONFIG, report_isoflop_optima

ROOT = Path(__file__).resolve().parents[1]


def test_the_study_grid_brackets_the_study_law_optimum_at_every_budget():
    spec = SweepSpec.from_yaml(ROOT / "tuning" / "configs" / "reference.yaml")
    optima = isoflop_optima(spec, ScalingLaw.reference())
    assert len(optima) == len(spec.budgets) * len(spec.r)
    assert all(o["interior"] for o in optima), [o for o in optima if not o["interior"]]
    # The optimum grows with the budget (for every r), as an IsoFLOP analysis must find.
    for r in spec.r:
        widths = [o["width"] for o in optima if o["r"] == r]
        assert widths == sorted(widths) and widths[-1] > widths[0]
    # Each is the lowest prediction over the searched range, not just over the grid's own widths.
    o = optima[0]
    assert min(o["grid"]) < o["width"] < max(o["grid"])


def test_a_grid_that_misses_the_optimum_is_named_with_a_warning():
    spec = SweepSpec.from_yaml(ROOT / "tuning" / "configs" / "reference.yaml")
    budgets = [{"compute": b.compute, "widths": [w + 30 for w in b.widths]} for b in spec.budgets]
    shifted = SweepSpec.from_dict({**_spec_dict(ROOT / "tuning" / "configs" / "reference.yaml"), "budgets": budgets})
    out = io.StringIO()
    optima = report_isoflop_optima(shifted, ScalingLaw.reference(), out)
    assert not any(o["interior"] for o in optima)
    assert all(o["width"] == min(o["grid"]) for o in optima)  # too wide everywhere: the smallest width wins
    text = out.getvalue()
    assert "WARNING" in text and "edge of the grid's widths" in text and "C=4.64e+17 r=1" in text


def _spec_dict(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


# The law the default sweep fitted (tuning/configs/laptop.yaml on the 2-core dev machine, 2026-12-06, 512-token steps;
# README, "The sweep"): the grid must bracket its compute-optimal width, and a sweep of that grid must fit a law that
# says so.
MEASURED_LAPTOP_LAW = ScalingLaw(E=3.35236, A=227.159, alpha=0.656250, B=863.564, beta=0.578619, phi=0.870777)


def test_a_sweep_of_the_default_grid_fits_a_law_with_an_interior_optimum_at_every_budget():
    import pandas as pd

    from analysis import fit_law
    from analysis.synthetic import planted_row
    from tuning.grid import expand

    spec = SweepSpec.from_yaml(DEFAULT_CONFIG)
    cells = [c for c in expand(spec) if c.variant == spec.baseline.name]
    rows = pd.DataFrame([planted_row(MEASURED_LAPTOP_LAW, c.run, noise=0.01) for c in cells])
    law = fit_law(rows, bootstrap=0, extrapolation=False, profile=False)
    assert -1 < law.phi < 1.5 and not law.meta.get("warning")
    optima = isoflop_optima(spec, law)
    assert len(optima) == len(spec.budgets) * len(spec.r)
    assert all(o["interior"] for o in optima), [o for o in optima if not o["interior"]]
