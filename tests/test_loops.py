"""The idle-loop check: every reported phi says whether its looped runs use their loops (analysis.loops)."""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pandas as pd
import pytest

from analysis import fit_law
from analysis.cli import main
from analysis.law import ScalingLaw
from analysis.loops import check_loops, replicate_noise
from analysis.synthetic import synthetic_sweep
from training import results_store as rs

LAW = ScalingLaw(E=1.6, A=28.0, alpha=0.2, B=900.0, beta=0.37, phi=0.5)
BUDGETS = (4.64e17, 1e18, 2.15e18)
SIZES = ((6, 8, 10, 12), (8, 10, 12, 14), (10, 12, 14, 16))


def _plant(store, *, gain: float, via_depths: bool, seed_sd: float = 0.01) -> pd.DataFrame:
    """A planted sweep whose looped runs gain `gain` nats from one recurrence to their trained r, stored either in
    depth tables (as stores written before the loss_r1 column) or in the rows, plus three seeds of two cells."""
    frame = synthetic_sweep(LAW, budgets=BUDGETS, sizes=SIZES, r_values=(1, 2, 4), noise=0.005, seed=3)
    frame["name"] = [f"c{c:.3g}-d{d}-r{r}" for c, d, r in zip(frame["compute"], frame["d_model"], frame["r"])]
    frame["seed"] = 0
    looped = frame["r"] > 1
    if not via_depths:
        frame["loss_r1"] = np.where(looped, frame["val_loss"] + gain, np.nan)
    rng = np.random.default_rng(0)
    extra = []
    for i in (frame.index[looped][0], frame.index[looped][-1]):
        for seed in (1, 2):
            row = frame.loc[i].copy()
            row["run_id"] = f"{row['run_id']}-seed{seed}"
            row["variant"], row["seed"] = "seed_noise", seed
            row["val_loss"] = row["val_loss"] + seed_sd * rng.standard_normal()
            extra.append(row)
    frame = pd.concat([frame, pd.DataFrame(extra)], ignore_index=True)
    for row in frame.to_dict("records"):
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        rs.write_run(store, row)
        if via_depths and row["r"] > 1 and row["variant"] == "baseline":
            r = row["r"]
            rs.write_depths(store, row["run_id"], [
                {"eval_r": e, "trained_r": r, "val_loss": row["val_loss"] + gain * max(0, r - e) / (r - 1),
                 "val_bpb": 1.0, "seconds": 0.1} for e in range(1, 2 * r + 1)])
    return frame


def test_flat_depth_tables_are_flagged_and_named_in_the_fit_and_its_cli(tmp_path):
    """A store like the idle default sweep: depth tables whose loss at one recurrence equals the trained r's."""
    store = tmp_path / "idle"
    frame = _plant(store, gain=0.0005, via_depths=True)
    law = fit_law(str(store), bootstrap=0, variant="baseline", extrapolation=False, profile=False)
    loops = law.meta["loops"]
    n_looped = int(((frame["r"] > 1) & (frame["variant"] == "baseline")).sum())
    assert loops["n_measured"] == n_looped and loops["n_working"] == 0 and len(loops["idle"]) == n_looped
    assert loops["seed_sd_source"] == "replicates" and loops["replicate_groups"] == 2
    assert loops["threshold"] == pytest.approx(2 * loops["seed_sd"])
    assert "leave their loops idle" in loops["warning"] and "shallow networks" in loops["warning"]
    saved = json.loads((tmp_path / "law.json").read_text()) if (tmp_path / "law.json").exists() else None
    assert saved is None
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(["fit", str(store), "--variant", "baseline", "--out", str(tmp_path / "law.json"),
                     "--bootstrap", "0", "--no-extrapolation"])
    assert code == 0
    text = err.getvalue()
    assert "WARNING: " in text and "leave their loops idle" in text
    idle_names = frame[(frame["r"] > 1) & (frame["variant"] == "baseline")]["name"]
    assert all(name in text for name in idle_names)
    assert "mean residual (measured - law) per r" in text
    saved = json.loads((tmp_path / "law.json").read_text())
    assert saved["meta"]["loops"]["warning"] == loops["warning"]


def test_loops_that_gain_pass_quietly(tmp_path):
    store = tmp_path / "working"
    _plant(store, gain=0.08, via_depths=False)
    law = fit_law(str(store), bootstrap=0, variant="baseline", extrapolation=False, profile=False)
    loops = law.meta["loops"]
    assert loops["warning"] is None and loops["n_working"] == loops["n_measured"] > 0
    assert "WARNING" not in law.summary() and "use their loops" in law.summary()


def test_a_gain_just_below_two_seed_sd_is_idle_and_just_above_is_not():
    rows = pd.DataFrame({"run_id": ["a", "b", "c", "a1"], "name": ["a", "b", "c", "a1"], "r": [4, 4, 1, 4],
                         "d_model": 16, "tokens": 1000, "lr": 0.01, "injection": "additive",
                         "seed": [0, 0, 0, 1], "status": "completed", "variant": ["x", "x", "x", "seed_noise"],
                         "val_loss": [4.00, 4.10, 4.2, 4.02]})
    rows.loc[rows["name"] == "b", "d_model"] = 24  # b is not a replicate of a
    sd = replicate_noise(rows)[0]
    assert sd == pytest.approx(math.sqrt(0.02 ** 2 / 2))
    fitted = rows[rows["variant"] == "x"].assign(loss_r1=[4.00 + 2 * sd * 0.9, 4.10 + 2 * sd * 1.1, np.nan])
    check = check_loops(fitted, store_frame=rows)
    assert check.idle == ["a"] and "a (gain" in check.warning and "b (gain" not in check.warning


def test_the_warning_says_at_which_budgets_the_r_axis_measures_recurrence():
    """As in the default sweep: the largest budget's loops all work, the short cooldown branches' do not."""
    rows = pd.DataFrame({"run_id": list("abcdef"), "name": list("abcdef"), "r": [4, 8, 4, 8, 4, 4],
                         "compute": [1e11, 1e11, 1e12, 1e12, 1e12, 1e12], "d_model": 16,
                         "tokens": [1e3, 1e3, 1e4, 1e4, 1e4, 1e4], "lr": 0.01, "injection": "additive",
                         "status": "completed", "val_loss": [4.0, 4.0, 3.8, 3.8, 3.8, 3.82],
                         "seed": [0, 0, 0, 0, 1, 2], "variant": ["x"] * 4 + ["seed_noise"] * 2})
    fitted = rows[rows["variant"] == "x"].assign(loss_r1=[4.001, 4.2, 4.3, 4.5])
    check = check_loops(fitted, store_frame=rows)
    assert check.idle == ["a"] and check.working_budgets() == [1e12]
    assert "at C=1e+12 every looped run uses its loops: only there does the r axis measure recurrence" in check.warning
    everything_idle = check_loops(fitted.assign(loss_r1=fitted["val_loss"]), store_frame=rows)
    assert everything_idle.working_budgets() == [] and "every looped run uses" not in everything_idle.warning


def test_without_replicates_the_fit_residuals_stand_in_and_say_so():
    rows = pd.DataFrame({"run_id": ["a"], "name": ["a"], "r": [4], "val_loss": [4.0], "loss_r1": [4.1],
                         "status": "completed", "seed": [0]})
    check = check_loops(rows, residual_sd=0.02)
    assert check.noise.source == "residuals" and check.threshold == pytest.approx(0.04) and not check.idle
    assert check_loops(rows).noise.source == "assumed" and "not measured" in check_loops(rows).line()
