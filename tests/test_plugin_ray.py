"""A plugin injection in a user's own project folder (not under models/) trains through `python tuning/sweep.py` on a
real local Ray, run from that folder as a user runs it: the driver finds the plugin in its working directory, and
Ray puts that directory on every worker's path (as `ray job submit --working-dir .` does on a cluster, tested in
tests/test_job_submit.py). Its rows carry the exact N_rec and F of models.accounting."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models.accounting import flops_per_token, param_counts
from training import results_store
from tuning.grid import expand
from tuning.spec import SweepSpec
from two_cell_spec import two_cell_spec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).resolve().parent / "plugins" / "gated.py"


def user_project(folder: Path) -> Path:
    """The package `userloops` (tests/plugins/gated.py) in a folder of the user's own."""
    (folder / "userloops").mkdir(parents=True)
    (folder / "userloops" / "__init__.py").write_text("")
    shutil.copy(PLUGIN, folder / "userloops" / "gated.py")
    return folder


def test_plugin_from_the_working_dir_trains_through_the_sweep(tmp_path):
    project = user_project(tmp_path / "project")
    spec = two_cell_spec("plugin", project / "results", {"rule": "fixed", "value": 3.0e-3})
    spec["model"].update(injection="userloops.gated:Gated", injection_args={"gate_init": 0.3})
    spec["r"] = [2]
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, str(ROOT / "tuning" / "sweep.py"), "--config", "spec.yaml",
                           "--num-cpus", "2", "--no-fit"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sys.path.append(str(project))  # to expand the spec here as the driver did
    try:
        (cell,) = expand(SweepSpec.from_yaml(project / "spec.yaml").replace(storage=str(project / "results")))
    finally:
        sys.path.remove(str(project))
    (row,) = results_store.read_runs(str(project / "results")).to_pylist()
    assert row["status"] == "completed" and row["run_id"] == cell.run_id, row.get("error")
    assert row["injection"] == "userloops.gated:Gated"
    counts = param_counts(cell.run.model)
    assert counts.injection == 32 * 32 + 32  # the plugin's W and gate, in N_rec
    assert (row["n_rec"], row["flops_per_token"]) == (counts.n_rec, flops_per_token(cell.run.model))
