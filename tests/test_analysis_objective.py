"""The objective's value and analytic gradient, for every form the engine fits."""

import numpy as np
import pytest
from scipy.special import huber

from analysis.objective import FitData, Objective, log_predict, objective_values


def _data(seed=0, n=40):
    rng = np.random.default_rng(seed)
    n_once = rng.uniform(1e7, 1e9, n)
    n_rec = rng.uniform(0, 1e9, n)
    r = rng.choice([1, 2, 4, 8], n)
    tokens = rng.uniform(1e8, 1e11, n)
    loss = rng.uniform(2.0, 3.5, n)
    return FitData.from_arrays(n_once, n_rec, r, tokens, loss)


@pytest.mark.parametrize("free", [
    (True,) * 6,                                  # looped
    (True, True, True, True, True, False),        # dense (phi held)
    (False, False, False, False, False, True),    # probe (phi only)
])
def test_gradient_matches_finite_differences(free):
    data = _data()
    theta = np.array([5.0, 0.3, 7.0, 0.35, 0.5, 0.45])
    weights = np.random.default_rng(1).integers(0, 3, len(data)).astype(float)
    # delta large enough that residuals sit on both sides of the Huber kink without landing on it
    obj = Objective(data, np.array(free), theta, delta=0.05, weights=weights)
    x = theta[np.array(free)]
    f, g = obj(x)
    eps = 1e-6
    fd = np.array([(obj(x + eps * e)[0] - obj(x - eps * e)[0]) / (2 * eps) for e in np.eye(len(x))])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-9)


def test_value_agrees_with_vectorised_screen_and_law():
    data = _data(2)
    theta = np.array([4.0, 0.25, 6.0, 0.3, 0.4, 0.6])
    f, _ = Objective(data, np.ones(6, bool), theta)(theta)
    assert f == pytest.approx(objective_values(theta[None], data)[0], rel=1e-12)
    a, alpha, b, beta, e, phi = theta
    n_eff = data.n_once + data.r ** phi * data.n_rec
    direct = np.exp(e) + np.exp(a) * n_eff ** -alpha + np.exp(b) * data.tokens ** -beta
    np.testing.assert_allclose(np.exp(log_predict(theta, data)), direct, rtol=1e-12)
    assert f == pytest.approx(huber(1e-3, np.log(direct) - np.log(data.loss)).sum(), rel=1e-9)


def test_weights_equal_repeated_rows():
    data = _data(3, n=10)
    theta = np.array([4.0, 0.25, 6.0, 0.3, 0.4, 0.6])
    counts = np.array([0, 1, 2, 0, 3, 1, 1, 0, 2, 0], float)
    rows = np.repeat(np.arange(10), counts.astype(int))
    free = np.ones(6, bool)
    f_w, g_w = Objective(data, free, theta, weights=counts)(theta)
    f_r, g_r = Objective(data.subset(rows), free, theta)(theta)
    assert f_w == pytest.approx(f_r, rel=1e-12)
    np.testing.assert_allclose(g_w, g_r, rtol=1e-10)
