"""Test-time depth, analysis side: Parcae's saturating-exponential fit, the per-run table of a store, the CLI and
plot, the sweep's per-variant verdict, and bad inputs."""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest

from analysis.cli import main
from analysis.depth import depth_curves, fit_depth_curve, saturating_exponential, variant_verdicts
from training import results_store as rs

PNG = b"\x89PNG\r\n\x1a\n"
PLANTED = {"asymptote": 3.2, "amplitude": 1.5, "rate": 0.6}
NOISE = 0.005  # nats: about the seed-to-seed spread of a tiny run's held-out loss


def _noisy(r, seed: int, noise: float = NOISE, **planted) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return saturating_exponential(r, **{**PLANTED, **planted}) + rng.normal(0, noise, len(r))


def test_fit_recovers_a_planted_curve_exactly_without_noise():
    r = np.arange(1, 9)
    fit = fit_depth_curve(r, saturating_exponential(r, **PLANTED), trained_r=4, bootstrap=0)
    assert fit.asymptote == pytest.approx(3.2, abs=1e-3) and fit.rate == pytest.approx(0.6, rel=1e-3)
    assert fit.amplitude == pytest.approx(1.5, rel=1e-2) and fit.rmse < 1e-4 and not fit.rate_at_bound


def test_fit_recovers_asymptote_and_rate_from_noisy_points():
    """Default depths 1..2r of an r=4 model, 0.005 nats of noise: the asymptote within 0.015 nats and the rate
    within 10% (both about 4 standard errors, measured over 100 seeds), and 95% bootstrap intervals that hold
    the planted values in most seeds (residual bootstrap on 8 points covers about 85-90%)."""
    r = np.arange(1, 9)
    covered = {"asymptote": 0, "rate": 0, "gain_fit": 0}
    true = {**PLANTED, "gain_fit": 1.5 * (math.exp(-0.6 * 4) - math.exp(-0.6 * 8))}
    seeds = range(20)
    for seed in seeds:
        fit = fit_depth_curve(r, _noisy(r, seed), trained_r=4, bootstrap=200, seed=seed)
        assert fit.asymptote == pytest.approx(3.2, abs=0.015)
        assert fit.rate == pytest.approx(0.6, rel=0.10)
        for name in covered:
            low, high = fit.ci[name]
            covered[name] += low <= true[name] <= high
    assert all(n >= 15 for n in covered.values()), covered


def test_gain_is_measured_from_the_trained_to_the_largest_depth():
    r = np.arange(1, 9)
    y = saturating_exponential(r, **PLANTED)
    fit = fit_depth_curve(r, y, trained_r=4, bootstrap=0)
    assert fit.loss_at_trained == y[3] and fit.loss_at_max == y[-1] and fit.gain == pytest.approx(y[3] - y[-1])
    assert fit.gain > 0 and fit.gain_fit == pytest.approx(fit.gain, rel=1e-3)


def test_a_curve_that_gets_worse_beyond_its_depth_fits_with_a_negative_amplitude():
    r = np.arange(1, 9)
    fit = fit_depth_curve(r, _noisy(r, 0, noise=0.001, amplitude=-0.8, rate=0.4), trained_r=2, bootstrap=0)
    assert fit.amplitude == pytest.approx(-0.8, rel=0.1) and fit.gain < 0


def test_points_that_never_saturate_are_flagged_not_trusted():
    r = np.arange(1, 9)
    fit = fit_depth_curve(r, 3.0 - 0.01 * r, trained_r=4, bootstrap=50)
    assert fit.rate_at_bound and "extrapolated" in fit.note


def test_a_curve_that_drops_at_once_then_stays_flat_saturated_within_one_recurrence():
    r = np.arange(1, 9)
    fit = fit_depth_curve(r, np.where(r == 1, 3.5, 3.0), trained_r=4, bootstrap=0)
    assert fit.rate >= 9.0 and "saturates within one recurrence" in fit.note and "extrapolated" not in fit.note
    assert fit.asymptote == pytest.approx(3.0, abs=1e-4)


def test_a_zero_mean_gain_is_no_effect_not_help():
    curves = pd.DataFrame({"variant": ["v"] * 4, "gain": [1e-5, -2e-5, 3e-5, -1e-5]})
    (verdict,) = variant_verdicts(curves)
    assert verdict["verdict"] == "make no measurable difference"


def test_too_few_depths_give_the_measured_gain_and_no_fit():
    fit = fit_depth_curve([4, 8], [3.1, 3.0], trained_r=4)
    assert fit.gain == pytest.approx(0.1) and math.isnan(fit.asymptote) and "no fit" in fit.note


@pytest.mark.parametrize("eval_r, loss, match", [
    ([0, 1, 2, 3], [4, 3, 2, 1], r"^eval_r: \[0.0\]"),
    ([1, 2.5, 3], [4, 3, 2], r"^eval_r: \[2.5\]"),
    ([1, 2, 2], [4, 3, 2], r"^eval_r: repeated"),
    ([1, 2, 3], [4, math.nan, 2], r"^loss: non-finite"),
    ([1, 2, 3], [4, 3], r"^eval_r, loss:"),
])
def test_bad_points_get_named_errors(eval_r, loss, match):
    with pytest.raises(ValueError, match=match):
        fit_depth_curve(eval_r, loss, trained_r=2)


# ---- a store ----------------------------------------------------------------------------------------------------
def _write_run(store, run_id: str, variant: str, trained_r: int, losses, status: str = "completed") -> None:
    depths = [{"eval_r": r, "trained_r": trained_r, "val_loss": float(v), "val_bpb": float(v) / math.log(2),
               "seconds": 0.01} for r, v in enumerate(losses, start=1)]
    rs.write_depths(store, run_id, depths)
    rs.write_run(store, {"run_id": run_id, "status": status, "variant": variant, "name": f"{variant}-{run_id}",
                         "injection": "concat", "d_model": 64, "r": trained_r, "n_once": 1000, "n_rec": 2000,
                         "flops_per_token": 1e6, "tokens": 10_000, "compute": 1e10,
                         "val_loss": float(losses[trained_r - 1])})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two variants: `looping` improves past its trained r, `brittle` gets worse; a diverged run is left out."""
    root = str(tmp_path_factory.mktemp("depth") / "store")
    for i, trained_r in enumerate((2, 4)):
        r = np.arange(1, 2 * trained_r + 1)
        _write_run(root, f"d64-r{trained_r}-good{i}", "looping", trained_r, _noisy(r, i, noise=0.002))
        _write_run(root, f"d64-r{trained_r}-bad{i}", "brittle", trained_r,
                   _noisy(r, 10 + i, noise=0.002, amplitude=-0.5, rate=0.5))
    _write_run(root, "d64-r2-diverged", "looping", 2, [9.0, 9.0, 9.0, 9.0], status="diverged")
    return root


def test_depth_curves_has_one_row_per_completed_run(store):
    curves = depth_curves(store, bootstrap=50)
    assert sorted(curves["run_id"]) == ["d64-r2-bad0", "d64-r2-good0", "d64-r4-bad1", "d64-r4-good1"]
    good = curves.set_index("run_id").loc["d64-r4-good1"]
    assert good["trained_r"] == 4 and good["eval_r_max"] == 8 and good["n_depths"] == 8
    assert good["asymptote_low"] <= good["asymptote"] <= good["asymptote_high"]
    assert good["asymptote"] == pytest.approx(3.2, abs=0.02) and good["gain"] > 0
    assert good["eval_seconds"] == pytest.approx(0.08)
    only = depth_curves(store, bootstrap=0, variant="brittle")
    assert set(only["variant"]) == {"brittle"} and (only["gain"] < 0).all()


def test_verdicts_name_whether_extra_recurrences_help_or_hurt_per_variant(store):
    verdicts = {v["variant"]: v for v in variant_verdicts(depth_curves(store, bootstrap=0))}
    assert verdicts["looping"]["verdict"] == "help" and verdicts["looping"]["n_help"] == 2
    assert verdicts["brittle"]["verdict"] == "hurt" and verdicts["brittle"]["mean_gain"] < 0


def test_sweep_report_prints_the_verdicts(store):
    from tuning.spec import SweepSpec
    from tuning.sweep import depth_stage

    spec = SweepSpec.from_dict({"name": "unit", "storage": store, "model": {"family": "tiny"},
                                "budgets": [{"compute": 1e10, "widths": [64]}], "r": [2, 4]})
    out = io.StringIO()
    depth_stage(spec, out)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("test-time depth looping: extra recurrences help") for line in lines), lines
    assert any(line.startswith("test-time depth brittle: extra recurrences hurt") for line in lines), lines


def test_cli_prints_the_table_and_writes_the_plot(store, tmp_path, capsys):
    plot = tmp_path / "figs" / "depth.png"
    code = main(["depth", store, "--plot", str(plot), "--bootstrap", "20"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "asymptote [95%]" in out and "looping-d64-r4-good1" in out and "diverged" not in out
    assert plot.read_bytes().startswith(PNG) and plot.stat().st_size > 10_000


def test_a_store_without_depth_tables_gets_a_named_error(tmp_path, capsys):
    empty = str(tmp_path / "plain")
    rs.write_run(empty, {"run_id": "d64-r1-x", "status": "completed", "d_model": 64, "r": 1, "n_once": 1000,
                         "n_rec": 0, "flops_per_token": 1e6, "tokens": 10, "compute": 1e7, "val_loss": 4.0})
    with pytest.raises(ValueError, match="^STORE: .* has no depth tables"):
        depth_curves(empty)
    assert main(["depth", empty]) == 2
    assert "STORE:" in capsys.readouterr().err
    from tuning.spec import SweepSpec
    from tuning.sweep import depth_stage

    spec = SweepSpec.from_dict({"name": "unit", "storage": empty, "model": {"family": "tiny"},
                                "budgets": [{"compute": 1e10, "widths": [64]}], "r": [1]})
    out = io.StringIO()
    assert depth_stage(spec, out) == [] and "skipped" in out.getvalue()
