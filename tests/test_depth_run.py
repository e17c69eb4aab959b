"""Test-time depth end to end: a tiny looped model trained on a real local Ray cluster with real DeepSpeed stores
one depth row per evaluation r, and its loss at the trained r is the run's final validation loss."""
import math

import pytest

from training import results_store
from training.config import RunConfig

pytestmark = pytest.mark.slow


def test_a_trained_looped_run_stores_its_depth_table(ray_local, tmp_path):
    from training.run import execute

    cfg = RunConfig.from_dict({
        "model": {"family": "tiny", "r": 2, "d_model": 64, "seq_len": 64, "vocab_size": 512,
                  "injection": "diagonal"},
        "optim": {"lr": 3e-3, "embed_lr_mult": 10.0},
        "budget": {"tokens": 1024 * 20}, "batch_tokens": 1024, "micro_batch": 4, "zero_stage": 2,
        "resources": {"num_workers": 2, "cpus_per_worker": 0.5},
        "eval_every": 10, "checkpoint_every": 100, "val_tokens": 2048, "max_failures": 0,
        "eval_depths": [1, 3, 4, 6], "storage": str(tmp_path), "name": "depth",
    })
    row = execute(cfg)
    assert row["status"] == "completed", row.get("error")
    depths = results_store.read_depths(cfg.storage, cfg.run_id).to_pandas()
    assert depths["eval_r"].tolist() == [1, 2, 3, 4, 6]  # the trained r joins the asked-for depths
    assert (depths["trained_r"] == 2).all() and (depths["run_id"] == cfg.run_id).all()
    at_trained = depths.set_index("eval_r").loc[2]
    # same validation batches, same all-reduced mean: the trained depth reproduces the final loss
    assert at_trained["val_loss"] == pytest.approx(row["val_loss"], rel=1e-6)
    assert at_trained["val_bpb"] == pytest.approx(row["val_bpb"], rel=1e-6)
    assert all(math.isfinite(v) for v in depths["val_loss"]) and (depths["seconds"] > 0).all()
