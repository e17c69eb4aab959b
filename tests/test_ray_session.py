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


@pytest.mark.slow
def test_a_raylet_that_misses_the_start_up_wait_is_reaped_and_started_again(monkeypatch, capfd):
    """Ray's own start-up timeout, after its processes exist (as on a busy machine): the private Ray reaps them and
    starts once more; any other error of ray.init is raised as it is."""
    import psutil

    from training import ray_session as rs

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    real_init, first = ray.init, []

    def init_that_times_out_once(**options):
        real_init(**options)
        if not first:
            first.extend(p.pid for p in rs.processes_of(options["_temp_dir"], spare={os.getpid()})
                         if "ray" in " ".join(p.cmdline()) and "training/ray_session.py" not in " ".join(p.cmdline()))
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", init_that_times_out_once)
    with ray_session("local", num_cpus=1, log_to_driver=False):
        assert ray.get(_environment.remote(["PATH"]))["PATH"]
        assert first and not [pid for pid in first if psutil.pid_exists(pid)
                              and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert "starting it again (try 2 of 3)" in capfd.readouterr().err

    def init_that_fails(**options):
        raise ValueError("num_cpus: bad")

    monkeypatch.setattr(ray, "init", init_that_fails)
    with pytest.raises(ValueError, match="num_cpus: bad"):
        with ray_session("local", num_cpus=1, log_to_driver=False):
            pass
