"""Shared fixtures. Each test module that needs Ray gets its own private local Ray in its own temp dir, stopped with
the module (training.ray_session; never `ray stop`, which would kill every Ray on the machine)."""
import pytest


@pytest.fixture(scope="module")
def ray_local(request):
    from ray import cloudpickle

    from training.ray_session import ray_session

    # tests/ is not importable on Ray workers: ship the test module's own functions by value.
    cloudpickle.register_pickle_by_value(request.module)
    with ray_session("local", num_cpus=2, log_to_driver=False) as temp_dir:
        yield temp_dir
