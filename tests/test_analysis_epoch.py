"""Issue 7: the dense form, fitted by the same engine, reproduces Epoch AI's Chinchilla replication."""

import subprocess
import sys
from pathlib import Path

import pytest

from analysis import fit_law, load_epoch_chinchilla

CSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "chinchilla_epoch_svg_extracted.csv"
EPOCH = {"E": 1.8172, "alpha": 0.3473, "beta": 0.3672, "A": 477.8, "B": 2143.9}
EPOCH_CI = {"alpha": (0.317, 0.373), "beta": (0.331, 0.415)}


@pytest.fixture(scope="module")
def epoch_law():
    if not CSV.exists():
        pytest.skip(f"reference data absent: {CSV} (see shared/reference/README.md)")
    table = load_epoch_chinchilla(CSV, exclude_highest_loss=5)
    # Epoch's start grid is the engine's default grid; it is screened and the best starts refined.
    return fit_law(table, bootstrap=300, seed=0, form="dense")


def test_point_estimates_match_epoch(epoch_law):
    law = epoch_law
    assert law.form == "dense" and law.n_runs == 240 and len(law.excluded) == 5
    for k in ("E", "alpha", "beta"):
        assert getattr(law, k) == pytest.approx(EPOCH[k], abs=0.005), k
    for k in ("A", "B"):
        assert getattr(law, k) == pytest.approx(EPOCH[k], rel=0.05), k


def test_bootstrap_intervals_overlap_epochs(epoch_law):
    for k, (lo, hi) in EPOCH_CI.items():
        ours = epoch_law.ci[k]
        assert ours[0] < hi and lo < ours[1], (k, ours)
        assert ours[0] < getattr(epoch_law, k) < ours[1]


def test_auto_form_is_dense_for_r1_tables():
    if not CSV.exists():
        pytest.skip(f"reference data absent: {CSV}")
    law = fit_law(load_epoch_chinchilla(CSV, exclude_highest_loss=5), bootstrap=0, extrapolation=False)
    assert law.form == "dense" and law.phi is None


def test_cli_fits_the_csv(tmp_path):
    if not CSV.exists():
        pytest.skip(f"reference data absent: {CSV}")
    out = tmp_path / "chinchilla.json"
    proc = subprocess.run([sys.executable, "-m", "analysis", "fit", str(CSV), "--form", "dense",
                           "--exclude-highest-loss", "5", "--bootstrap", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from analysis import ScalingLaw
    law = ScalingLaw.load(out)
    assert law.alpha == pytest.approx(EPOCH["alpha"], abs=0.005) and law.beta == pytest.approx(EPOCH["beta"], abs=0.005)
