"""A plugin injection in a user's own project folder trains on a real local Ray (the driver's working directory is
importable on every worker, as `ray job submit --working-dir .` makes it on a cluster) and records exact counts."""
import os
import shutil
from pathlib import Path

import pytest

from models.accounting import flops_per_token, param_counts
from training.config import RunConfig

pytestmark = pytest.mark.slow

PLUGIN = Path(__file__).resolve().parent / "plugins" / "gated.py"


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """A folder holding the package `userloops` (tests/plugins/gated.py), made the working directory before Ray
    starts, as a user runs `python tuning/sweep.py` from their own project."""
    from training.ray_session import ray_session

    project = tmp_path_factory.mktemp("project")
    (project / "userloops").mkdir()
    (project / "userloops" / "__init__.py").write_text("")
    shutil.copy(PLUGIN, project / "userloops" / "gated.py")
    before = os.getcwd()
    os.chdir(project)
    try:
        with ray_session("local", num_cpus=2, log_to_driver=False):
            yield project
    finally:
        os.chdir(before)


def test_plugin_from_the_working_dir_trains_on_ray(user_project):
    from training.run import execute

    cfg = RunConfig.from_dict({
        "model": {"family": "tiny", "r": 2, "d_model": 32, "head_dim": 16, "rec_depth": 4, "seq_len": 64,
                  "vocab_size": 512, "injection": "userloops.gated:Gated", "injection_args": {"gate_init": 0.3}},
        "optim": {"lr": 3e-3, "embed_lr_mult": 10.0},
        "budget": {"tokens": 1024 * 8}, "batch_tokens": 1024, "micro_batch": 4, "zero_stage": 0,
        "resources": {"num_workers": 1, "cpus_per_worker": 1.0},
        "eval_every": 8, "checkpoint_every": 100, "val_tokens": 2048, "max_failures": 0,
        "eval_depths": [2], "storage": str(user_project / "results"), "name": "plugin",
    })
    row = execute(cfg)
    assert row["status"] == "completed", row.get("error")
    counts = param_counts(cfg.model)
    assert row["injection"] == "userloops.gated:Gated"
    assert (row["n_rec"], row["flops_per_token"]) == (counts.n_rec, flops_per_token(cfg.model))
    assert counts.injection == 32 * 32 + 32
