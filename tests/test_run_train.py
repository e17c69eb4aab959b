"""End to end on a real local Ray cluster with real DeepSpeed (CPU, gloo): train, record, resume, diverge, and the
test-time depth table."""
import math
import os
import signal
import subprocess
import sys
import threading
import time
import json
from pathlib import Path

import pandas as pd
import psutil
import pytest

from models.accounting import flops_per_token, param_counts
from training import results_store
from training.config import RunConfig
from training.weights import read_weights

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(storage, **changes) -> RunConfig:
    cfg = RunConfig.from_dict({
        "model": {"family": "tiny", "r": 2, "d_model": 64, "seq_len": 64, "vocab_size": 512,
                  "injection": "diagonal"},
        "optim": {"lr": 3e-3, "embed_lr_mult": 10.0},
        "budget": {"tokens": 1024 * 40}, "batch_tokens": 1024, "micro_batch": 4, "zero_stage": 2,
        "resources": {"num_workers": 2, "cpus_per_worker": 0.5},
        "eval_every": 10, "checkpoint_every": 10, "val_tokens": 2048, "max_failures": 1,
        "eval_depths": [1, 3, 4, 6], "storage": str(storage), "name": "test",
    })
    return cfg.replace(**changes)


@pytest.fixture(scope="module")
def baseline(ray_local, tmp_path_factory):
    from training.run import execute

    storage = tmp_path_factory.mktemp("baseline")
    cfg = tiny_cfg(storage)
    return cfg, execute(cfg)


def test_zero2_run_trains_and_records_its_row(baseline):
    from training.run import execute

    cfg, row = baseline
    assert row["status"] == "completed", row.get("error")
    curve = results_store.read_curve(cfg.storage, cfg.run_id).to_pandas()
    assert curve.step.tolist() == [0, 10, 20, 30, 40]
    assert row["val_loss"] == curve.val_loss.iloc[-1]
    assert row["val_loss"] < curve.val_loss.iloc[0] - 0.5, "validation loss must fall from the untrained model's"
    counts = param_counts(cfg.model)
    assert (row["n_once"], row["n_rec"], row["n_embed"]) == (counts.n_once, counts.n_rec, counts.n_embed)
    assert row["flops_per_token"] == flops_per_token(cfg.model)
    assert row["tokens"] == 40 * 1024 and row["steps"] == 40
    assert row["compute"] == pytest.approx(flops_per_token(cfg.model) * 40 * 1024)
    assert row["bptt_k"] == 2 and row["r"] == 2 and row["restarts"] == 0
    assert 0 < row["val_bpb"] < row["val_loss"] * 2 and row["tokens_per_second"] > 0 and row["mfu"] > 0
    stored = pd.read_parquet(f"{cfg.storage}/runs")
    assert len(stored) == 1 and stored.run_id[0] == cfg.run_id
    events = list(Path(cfg.storage, "tensorboard", cfg.run_id).glob("events.out.tfevents.*"))
    assert events, "rank 0 writes TensorBoard scalars under STORAGE/tensorboard/<run_id>"
    # a second execute of the same config returns the stored row instead of training again
    again = execute(cfg.replace(name="renamed"))
    assert again["finished_at"] == row["finished_at"] and len(pd.read_parquet(f"{cfg.storage}/runs")) == 1


def test_tensorboard_scalars(baseline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _ = baseline
    acc = EventAccumulator(str(Path(cfg.storage, "tensorboard", cfg.run_id)))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/bpb", "lr", "grad_norm", "tokens_per_second", "mfu",
            "loop/e_rms", "loop/state_rms/r1", "loop/state_rms/r2", "loop/state_change/r2"} <= tags
    # the loss reaches the host (and TensorBoard) every log_every steps, and at every eval and checkpoint
    flushes = [s for s in range(1, cfg.steps + 1)
               if s % cfg.log_every == 0 or s % cfg.eval_every == 0 or s % cfg.checkpoint_every == 0]
    assert [e.step for e in acc.Scalars("train/loss")] == flushes
    assert len(acc.Scalars("loop/state_rms/r2")) == len(flushes) + 1  # at every eval, the untrained one included


def test_a_trained_looped_run_stores_its_depth_table(baseline):
    """Test-time depth: one depth row per evaluation r, and the loss at the trained r is the run's final loss."""
    cfg, row = baseline
    depths = results_store.read_depths(cfg.storage, cfg.run_id).to_pandas()
    assert depths["eval_r"].tolist() == [1, 2, 3, 4, 6]  # the trained r joins the asked-for depths
    assert (depths["trained_r"] == 2).all() and (depths["run_id"] == cfg.run_id).all()
    at_trained = depths.set_index("eval_r").loc[2]
    # same validation batches, same all-reduced mean: the trained depth reproduces the final loss
    assert at_trained["val_loss"] == pytest.approx(row["val_loss"], rel=1e-6)
    assert at_trained["val_bpb"] == pytest.approx(row["val_bpb"], rel=1e-6)
    assert all(math.isfinite(v) for v in depths["val_loss"]) and (depths["seconds"] > 0).all()


def _train_workers() -> list[psutil.Process]:
    """Ray Train worker processes of the cluster this test process started (its descendants only)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: dict, deadline: float) -> None:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline:
        try:
            state = json.loads(snapshot.read_text())
        except (OSError, ValueError):
            state = {}
        latest = state.get("latest_checkpoint_result")
        if latest and not latest["metrics"]["done"]:
            workers = _train_workers()
            if workers:
                killed["pid"], killed["at_step"] = workers[-1].pid, latest["metrics"]["step"]
                os.kill(workers[-1].pid, signal.SIGKILL)
                return
        time.sleep(0.05)


def _execute_killing_a_worker(cfg, tmp_path):
    """Run `cfg` while a thread SIGKILLs one Train worker after the first checkpoint; returns (row, what was killed)."""
    from training.run import execute

    killed: dict = {}
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(tmp_path / "ray" / cfg.run_id, killed, time.time() + 300), daemon=True)
    killer.start()
    row = execute(cfg)
    killer.join(timeout=1)
    return row, killed


def test_killed_worker_resumes_exactly_from_checkpoint(baseline, tmp_path):
    base_cfg, base_row = baseline
    cfg = tiny_cfg(tmp_path)
    assert cfg.run_id == base_cfg.run_id
    row, killed = _execute_killing_a_worker(cfg, tmp_path)
    assert killed, "the test never saw a checkpoint to kill after"
    assert row["status"] == "completed", row.get("error")
    assert row["restarts"] >= 1, "the worker group must have restarted from a checkpoint"
    assert len(pd.read_parquet(f"{cfg.storage}/runs")) == 1
    curve = results_store.read_curve(cfg.storage, cfg.run_id).to_pandas()
    assert curve.step.tolist() == [0, 10, 20, 30, 40]
    # same data position, LR schedule, optimizer state and RNG after resume => the same numbers as uninterrupted
    base_curve = results_store.read_curve(base_cfg.storage, base_cfg.run_id).to_pandas()
    assert curve.val_loss.tolist() == pytest.approx(base_curve.val_loss.tolist(), rel=1e-5)
    assert row["val_loss"] == pytest.approx(base_row["val_loss"], rel=1e-5)
    # the loop check's fields are written once, at the end, and a restart does not change them
    for key in ("loss_r1", "e_rms", "state_rms", "state_change"):
        assert math.isfinite(row[key]) and row[key] == pytest.approx(base_row[key], rel=1e-5), key
    depth = results_store.read_depths(cfg.storage, cfg.run_id).to_pandas().set_index("eval_r")
    assert row["loss_r1"] == depth.loc[1, "val_loss"] and row["val_loss"] == depth.loc[2, "val_loss"]


def test_cli_runs_tiny_yaml(tmp_path):
    """The shipped tiny config through the command line, on a local Ray the command starts itself."""
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "training.run", "--config", "training/configs/tiny.yaml",
                           "--storage", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = pd.read_parquet(tmp_path / "runs")
    assert len(runs) == 1 and runs.status[0] == "completed"
    assert runs.val_loss[0] < math.log(1024)


def test_branch_rows_are_written_once_and_survive_a_killed_worker(ray_local, tmp_path):
    """A multi-horizon run writes its cooldown branch as a row of its own (the id of the run trained to that horizon,
    its parent named), also when a worker dies mid-run; executing it again trains nothing. Under ZeRO-3 on two
    workers, which partitions every parameter: the final weights of the run and of its branch are stored gathered."""
    from training.run import execute

    cfg = tiny_cfg(tmp_path, optim={"lr": 3e-3, "embed_lr_mult": 10.0, "schedule": "wsd"}, tokens=1024 * 30,
                   horizons=[1024 * 20], zero_stage=3)
    row, killed = _execute_killing_a_worker(cfg, tmp_path)
    assert killed and row["status"] == "completed" and row["restarts"] >= 1, row.get("error")
    runs = pd.read_parquet(f"{cfg.storage}/runs").set_index("run_id")
    branch_id = cfg.branch_config(1024 * 20).run_id
    assert set(runs.index) == {cfg.run_id, branch_id}
    branch = runs.loc[branch_id]
    assert branch.parent_run_id == cfg.run_id and branch.tokens == 1024 * 20 and branch.status == "completed"
    assert branch.compute == pytest.approx(cfg.flops_per_token * 1024 * 20)
    assert branch.compute_spent == pytest.approx(cfg.flops_per_token * 1024 * 4)  # its cooldown: 20% of 20 steps
    assert runs.loc[cfg.run_id].compute_spent == pytest.approx(cfg.flops_per_token * 1024 * 34)
    assert math.isfinite(branch.val_loss) and branch.val_loss < math.log(512)
    assert math.isfinite(branch.loss_r1) and math.isfinite(branch.e_rms) and branch.state_change > 0
    curve = results_store.read_curve(cfg.storage, cfg.run_id).to_pandas()
    assert row["val_loss"] < curve.val_loss.iloc[0] - 0.3
    for run_id, step in ((cfg.run_id, 30), (branch_id, 20)):  # whole tensors: a rank's partition would not load
        stored = read_weights(cfg.storage, run_id)
        assert stored.step == step and stored.model().embed.weight.shape == (512, 64)
    again = execute(cfg)
    assert again["finished_at"] == row["finished_at"] and len(pd.read_parquet(f"{cfg.storage}/runs")) == 2


def test_muonh_run_trains_under_ray(ray_local, tmp_path):
    """The study's recipe (MuonH, tests/test_muonh.py) end to end: one small run on Ray Train + DeepSpeed ZeRO-2."""
    from training.run import execute

    cfg = RunConfig.from_dict({
        "model": {"family": "tiny", "r": 2, "d_model": 64, "seq_len": 64, "vocab_size": 512},
        "optim": {"optimizer": "muonh", "lr": 0.014},
        "budget": {"tokens": 1024 * 40}, "batch_tokens": 1024, "micro_batch": 4, "zero_stage": 2,
        "resources": {"num_workers": 2, "cpus_per_worker": 0.5},
        "eval_every": 10, "checkpoint_every": 40, "val_tokens": 2048, "max_failures": 0,
        "storage": str(tmp_path), "name": "muonh",
    })
    row = execute(cfg)
    assert row["status"] == "completed", row.get("error")
    curve = results_store.read_curve(cfg.storage, cfg.run_id).to_pandas()
    assert row["val_loss"] < curve.val_loss.iloc[0] - 0.5, curve.val_loss.tolist()
