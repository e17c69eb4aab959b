"""Shared fixtures. Each test module that needs Ray gets its own local cluster in its own temp dir, stopped by
ray.shutdown() (never `ray stop`, which would kill every Ray on the machine)."""
import tempfile

import pytest


@pytest.fixture(scope="module")
def ray_local(request):
    import ray
    from ray import cloudpickle

    from training.prepare import remove_ray_temp_dir

    # tests/ is not importable on Ray workers: ship the test module's own functions by value.
    cloudpickle.register_pickle_by_value(request.module)
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must stay under 108 chars
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    yield
    ray.shutdown()
    remove_ray_temp_dir(tmp)
