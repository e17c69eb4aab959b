"""ScalingLaw: the published law's numbers, queries with intervals, JSON round trip, budget-optimal designs."""

import json

import numpy as np
import pytest

from analysis import Estimate, ScalingLaw


def test_reference_law_coefficients():
    law = ScalingLaw.reference()
    assert (law.A, law.alpha, law.B, law.beta, law.E, law.phi) == (28.027, 0.19924, 915.82, 0.36863, 1.56773, 0.459)
    assert law.form == "looped"


def test_reference_reproduces_the_studys_410m_example():
    # N_once : N_rec = 4.27 : 4 blocks at r = 4 -> N_eff / N_total ~= 1.43, so 410M looped ~= 586M dense.
    law = ScalingLaw.reference()
    total = 410e6
    n_once, n_rec = total * 4.27 / 8.27, total * 4 / 8.27
    ratio = law.effective_params(n_once, n_rec, 4) / total
    assert ratio == pytest.approx(1.43, abs=0.005)
    assert law.dense_equivalent(n_once, n_rec, 4) == pytest.approx(586e6, rel=0.01)
    # equal loss at equal tokens: the dense model of that size predicts the same loss
    d = 1e10
    assert law.predict(n_once, n_rec, 4, d) == pytest.approx(law.predict(law.dense_equivalent(n_once, n_rec, 4), 0, 1, d), rel=1e-12)


def test_predict_is_the_formula_and_broadcasts():
    law = ScalingLaw(E=1.5, A=30.0, alpha=0.2, B=900.0, beta=0.35, phi=0.5)
    n_once, n_rec, r, d = np.array([1e7, 2e7]), np.array([3e7, 1e7]), np.array([1, 4]), np.array([1e9, 2e9])
    expected = 1.5 + 30 * (n_once + r ** 0.5 * n_rec) ** -0.2 + 900 * d ** -0.35
    np.testing.assert_allclose(law.predict(n_once, n_rec, r, d), expected, rtol=1e-12)
    assert isinstance(law.predict(1e7, 1e7, 2, 1e9), float)


def test_dense_form_counts_unique_parameters():
    law = ScalingLaw(E=1.8, A=480.0, alpha=0.35, B=2100.0, beta=0.37)
    assert law.form == "dense"
    assert law.effective_params(1e8, 5e7, 8) == pytest.approx(1.5e8)


def _law_with_draws(n=400, seed=0):
    rng = np.random.default_rng(seed)
    draws = np.column_stack([1.5 + 0.02 * rng.standard_normal(n), 30 * np.exp(0.05 * rng.standard_normal(n)),
                             0.2 + 0.01 * rng.standard_normal(n), 900 * np.exp(0.05 * rng.standard_normal(n)),
                             0.35 + 0.01 * rng.standard_normal(n), 0.5 + 0.05 * rng.standard_normal(n)])
    return ScalingLaw(E=1.5, A=30.0, alpha=0.2, B=900.0, beta=0.35, phi=0.5, draws=draws,
                      ci={"phi": (0.4, 0.6)}, r2=0.99, n_runs=100, meta={"note": "test"})


def test_queries_carry_bootstrap_intervals():
    law = _law_with_draws()
    est = law.predict(1e8, 1e8, 4, 1e10, ci=True)
    assert isinstance(est, Estimate) and est.low < est.value < est.high
    eff = law.effective_params(np.array([1e8, 2e8]), np.array([1e8, 1e8]), np.array([2, 8]), ci=True)
    assert eff.value.shape == eff.low.shape == (2,)
    assert np.all(eff.low < eff.value) and np.all(eff.value < eff.high)
    # r = 1: r^phi = 1 whatever phi is, so the interval collapses onto the value
    flat = law.effective_params(1e8, 1e8, 1, ci=True)
    assert flat.low == pytest.approx(flat.value) and flat.high == pytest.approx(flat.value)
    assert ScalingLaw.reference().predict(1e8, 1e8, 4, 1e10, ci=True).low is None


def test_save_load_round_trip_keeps_draws(tmp_path):
    law = _law_with_draws()
    path = law.save(tmp_path / "law.json")
    json.loads(path.read_text())  # plain JSON
    back = ScalingLaw.load(path)
    assert back.coefficients == law.coefficients
    assert back.ci == law.ci and back.r2 == law.r2 and back.n_runs == law.n_runs and back.meta == law.meta
    np.testing.assert_allclose(back.draws, law.draws)
    assert back.predict(1e8, 1e8, 4, 1e10, ci=True) == pytest.approx(law.predict(1e8, 1e8, 4, 1e10, ci=True))
    dense = ScalingLaw(E=1.8, A=480.0, alpha=0.35, B=2100.0, beta=0.37)
    assert ScalingLaw.load(dense.save(tmp_path / "dense.json")).phi is None


def test_invalid_coefficients_are_refused():
    with pytest.raises(ValueError, match="ScalingLaw.A"):
        ScalingLaw(E=1.5, A=-1.0, alpha=0.2, B=900.0, beta=0.35, phi=0.5)
    with pytest.raises(ValueError, match="ScalingLaw.alpha"):
        ScalingLaw(E=1.5, A=1.0, alpha=float("nan"), B=900.0, beta=0.35)
    with pytest.raises(ValueError, match="draws"):
        ScalingLaw(E=1.5, A=1.0, alpha=0.2, B=900.0, beta=0.35, draws=np.zeros((3, 4)))


def test_optimal_design_with_reference_law():
    pytest.importorskip("models.accounting")
    law = ScalingLaw.reference()
    opt = law.optimal(4.64e17)
    by_r = {d.r: d for d in opt.table}
    assert set(by_r) == {1, 2, 4, 8} and opt.r == 1 and not opt.at_size_edge
    # The study's compute-optimal losses at 4.64e17 FLOPs (2.852, 2.914, 2.936, 2.977): same order, within 0.03.
    for r, loss in {1: 2.852, 2: 2.914, 4: 2.936, 8: 2.977}.items():
        assert by_r[r].loss == pytest.approx(loss, abs=0.03)
    assert [d.loss for d in opt.table] == sorted(d.loss for d in opt.table)
    best = opt.best
    assert best.tokens * best.flops_per_token == pytest.approx(4.64e17, rel=1e-12)


def test_optimal_respects_constraints_and_reports_intervals():
    pytest.importorskip("models.accounting")
    law = _law_with_draws()
    free = law.optimal(1e19)
    capped = law.optimal(1e19, max_unique_params=free.best.unique_params / 3)
    assert capped.best.unique_params <= free.best.unique_params / 3
    assert all(d.unique_params <= free.best.unique_params / 3 for d in capped.table)
    cheap = law.optimal(1e19, max_inference_flops_per_token=free.best.inference_flops_per_token / 2)
    assert all(d.inference_flops_per_token <= free.best.inference_flops_per_token / 2 for d in cheap.table)
    lo, hi = free.best.loss_ci
    assert lo < free.best.loss < hi
    assert sum(free.r_share.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no design satisfies"):
        law.optimal(1e19, max_unique_params=10)
    with pytest.raises(ValueError, match="family"):
        law.optimal(1e19, family="chinchilla")
