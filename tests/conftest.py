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


@pytest.fixture(scope="module")
def ray_for_sweeps():
    """One private Ray for a module's in-process sweeps, dashboard on as the sweep's own (tuning.sweep): run_sweep uses
    the Ray this process has instead of starting and stopping one per call."""
    from training.ray_session import ray_session

    with ray_session("local", num_cpus=2, dashboard=True, log_to_driver=False) as temp_dir:
        yield temp_dir


# The study's sizes per budget (arXiv 2604.21106, shells/scaling_laws/scaling_laws.sh): 116 runs with r in {1,2,4,8}.
STUDY_SIZES = {4.64e17: [6, 8, 10, 12], 1.0e18: [6, 8, 10, 12, 14], 2.15e18: [8, 10, 12, 14, 16],
               4.64e18: [10, 12, 14, 16, 18, 20], 1.0e19: [12, 16, 18, 20, 24], 2.15e19: [18, 24, 28, 34]}


@pytest.fixture
def study_spec():
    """tuning/configs/reference.yaml as a dict, with the study's exact sizes per budget (whatever the file lists)."""
    from pathlib import Path

    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "tuning" / "configs" / "reference.yaml").read_text())
    for budget in spec["budgets"]:
        budget["widths"] = STUDY_SIZES[float(budget["compute"])]
    return spec
