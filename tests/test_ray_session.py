"""A private Ray's environment: every process of it (the Tune trials and Train controllers included) and the driver
for the duration get Ray Train's settings for short local runs; the driver's own environment comes back after."""
import os

import pytest
import ray

from training.ray_session import PRIVATE_TRAIN_ENV, ray_session


@ray.remote
def _environment(names):
    return {n: os.environ.get(n) for n in names}


@pytest.mark.slow
def test_private_ray_sets_trains_local_settings_and_restores_the_drivers(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")  # the user's own value wins
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    expected = {**PRIVATE_TRAIN_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.5"}
    with ray_session("local", num_cpus=1, log_to_driver=False):
        assert ray.get(_environment.remote(list(expected))) == expected
        assert {n: os.environ.get(n) for n in expected} == expected
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    assert PRIVATE_TRAIN_ENV["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
