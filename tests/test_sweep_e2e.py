"""The sweep end to end on a real local Ray with real training (Ray Train + DeepSpeed, tiny models on CPU):
LR search with Optuna pruning, the grid, resume after the driver is SIGKILLed, and the fit at the end."""
from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from training import results_store
from training.ray_session import processes_of
from tuning.grid import expand, lr_plan, search_storage
from tuning.spec import SweepSpec
from tuning.sweep import absolute_storage, fit_stage, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(storage: Path, **changes) -> dict:
    """2 budgets x 1 width x r in {1, 2}: four cells of ~20-30 steps each."""
    spec = {
        "name": "e2e",
        "storage": str(storage),
        "model": {"family": "tiny", "vocab_size": 1024, "seq_len": 64, "head_dim": 16},
        "budgets": [{"compute": 1.5e10, "widths": [32]}, {"compute": 3.0e10, "widths": [32]}],
        "r": [1, 2],
        # A checkpoint at the end only: at 4-step intervals checkpoints took 3-6x the training time of these runs.
        "recipe": {"batch_tokens": 512, "micro_batch": 8, "eval_every": 4, "val_tokens": 1024,
                   "checkpoint_every": 100, "max_failures": 1},
        "lr": {"rule": "fixed", "value": 1.0e-2},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "zero_stage": 0, "trial_cpus": 0.1},
        "fit": {"bootstrap": 0},
    }
    spec.update(changes)
    return spec


@pytest.fixture(autouse=True)
def local_ray_only(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the sweep's driver subprocess must start its own local Ray


def no_ray_needed(monkeypatch):
    """From here on a sweep that would bring up Ray fails: what it has to do needs no trial."""
    def refuse(*args, **kwargs):
        raise AssertionError("the sweep started Ray with nothing to train")

    monkeypatch.setattr("tuning.sweep.ray_session", refuse)


def rows(store: Path) -> dict[str, dict]:
    table = results_store.read_runs(str(store))
    return {r["run_id"]: r for r in table.to_pylist()}


@pytest.mark.slow
def test_lr_search_prunes_then_grid_runs_every_cell_once(ray_for_sweeps, tmp_path, monkeypatch):
    store = tmp_path / "store"
    # Two workable LRs first, then one far too small: the median pruner stops it once two trials have finished.
    search = {"trials": 3, "low": 1.0e-5, "high": 3.0e-2, "enqueue": [1.0e-2, 3.0e-3, 1.0e-5], "pruner": "median",
              "pruner_args": {"n_startup_trials": 2}, "concurrency": 1}
    # One budget: its r = 1 cell is the search cell, so the grid trains only r = 2 (the copy is what is tested).
    spec = SweepSpec.from_dict(tiny_spec(store, budgets=[{"compute": 1.5e10, "widths": [32]}],
                                         lr={"rule": "tuned", "search": search}))
    result = run_sweep(spec, num_cpus=2, fit=False)

    study = optuna.load_study(study_name="e2e-lr", storage=f"sqlite:///{store / 'optuna.db'}")
    states = {t.params["lr"]: t.state for t in study.trials}
    assert states[1.0e-5] == TrialState.PRUNED
    assert states[1.0e-2] == states[3.0e-3] == TrialState.COMPLETE
    assert result["best_lr"] == study.best_trial.params["lr"]
    search_rows = rows(Path(search_storage(absolute_storage(spec))))
    assert sorted(r["lr"] for r in search_rows.values()) == [3.0e-3, 1.0e-2]  # the pruned trial left no row

    cells = expand(absolute_storage(spec), lr_plan(absolute_storage(spec), result["best_lr"]))
    stored = rows(store)
    assert set(stored) == {c.run_id for c in cells} and len(stored) == 2
    assert result["counts"] == {"completed": 2}
    for c in cells:
        row = stored[c.run_id]
        assert row["status"] == "completed" and row["sweep"] == "e2e" and row["variant"] == "baseline"
        assert (row["r"], row["d_model"], row["budget_compute"]) == (c.r, c.width, c.compute)
        assert row["lr"] == pytest.approx(result["best_lr"])  # same width as the search cell: no transfer factor
        assert row["val_loss"] < 6.9  # trained: below the uniform loss ln(1024) = 6.93
    # The search cell at the best LR is a grid cell: its run is copied, relabelled, not trained a second time.
    shared = set(search_rows) & set(stored)
    assert len(shared) == 1
    (run_id,) = shared
    assert stored[run_id]["val_loss"] == search_rows[run_id]["val_loss"]
    assert stored[run_id]["finished_at"] == search_rows[run_id]["finished_at"]
    assert search_rows[run_id]["variant"] == "lr_search" and stored[run_id]["variant"] == "baseline"

    # Rerunning the same spec trains nothing, without Ray: the study has its trials, the store has every cell.
    no_ray_needed(monkeypatch)
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(str(store / "runs" / "*.parquet"))}
    again = run_sweep(spec, num_cpus=2, fit=False)
    assert again["best_lr"] == result["best_lr"] and again["counts"] == {"completed": 2}
    assert len(optuna.load_study(study_name="e2e-lr", storage=f"sqlite:///{store / 'optuna.db'}").trials) == 3
    assert {p: os.path.getmtime(p) for p in glob.glob(str(store / "runs" / "*.parquet"))} == mtimes


def _mid_run_checkpoint(store: Path, done_ids: set[str], after_step: int = 0) -> bool:
    """True when a run without a row has a mid-training checkpoint past `after_step` registered in its Train run
    snapshot (the record a restarted TorchTrainer restores from)."""
    for snap in glob.glob(str(store / "ray" / "*" / "checkpoint_manager_snapshot.json")):
        if Path(snap).parent.name in done_ids:
            continue
        try:
            with open(snap) as f:
                latest = json.load(f)["checkpoint_results"][-1]["metrics"]
        except (OSError, ValueError, KeyError, IndexError):
            continue  # being written
        if not latest.get("done") and latest.get("step", 0) > after_step:
            return True
    return False


def _session(sid: int) -> list[int]:
    """Pids of the driver's session (the driver started it): its own processes and its local Ray's."""
    pids = []
    for pid_dir in glob.glob("/proc/[0-9]*"):
        pid = int(Path(pid_dir).name)
        try:
            if os.getsid(pid) == sid:
                pids.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def _ray_left(sid: int, temp_dir: str, patience: float = 60) -> list[int]:
    """Processes of a SIGKILLed driver's private Ray still alive after `patience` seconds: in the driver's session,
    or naming its temp dir in their command lines or open files."""
    deadline = time.monotonic() + patience
    while True:
        left = sorted(set(_session(sid)) | {p.pid for p in processes_of(temp_dir)})
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


@pytest.mark.slow
def test_killed_driver_resumes_without_training_twice(ray_for_sweeps, tmp_path, monkeypatch):
    """Multi-horizon (wsd) runs: each r trains once to the larger budget with the smaller one as a cooldown branch.
    The driver is SIGKILLed after one run finished and the other has checkpointed past its branch: the rerun keeps
    what was stored, resumes the interrupted run (its branch comes back from the checkpoint), writes every row
    exactly once, and a third run trains nothing."""
    store = tmp_path / "store"
    recipe = {**tiny_spec(store)["recipe"], "checkpoint_every": 8, "optim": {"schedule": "wsd", "cooldown_frac": 0.2}}
    spec_dict = tiny_spec(store, concurrency=1, recipe=recipe)
    cells = expand(absolute_storage(SweepSpec.from_dict(spec_dict)))
    small = min(c.compute for c in cells)
    branch_done = max(c.run.optim.cooldown_start(c.run.steps) for c in cells if c.compute == small)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, str(ROOT / "tuning" / "sweep.py"), "--config", str(path),
                               "--num-cpus", "2", "--no-fit"], stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 900  # a bound on failure only: 2 cores under other load have needed over 420 s
        killed_with = None
        while time.monotonic() < deadline and driver.poll() is None:
            done = set(rows(store)) if (store / "runs").exists() else set()
            if done and _mid_run_checkpoint(store, done, after_step=branch_done):
                killed_with = done
                # The private Ray's session folder is named after the pid of the driver that started it.
                (session,) = glob.glob(f"/tmp/ray*/session_*_{driver.pid}")
                os.kill(driver.pid, signal.SIGKILL)
                break
            time.sleep(0.3)
        assert killed_with is not None, f"the driver ended (rc {driver.poll()}) before a run was interrupted; " \
                                        f"log: {(tmp_path / 'driver.log').read_text()[-3000:]}"
        driver.wait(timeout=30)
        temp_dir = str(Path(session).parent)
        left = _ray_left(driver.pid, temp_dir)
    finally:
        for pid in _session(driver.pid):  # only if the assertion below fails: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
    assert not left, f"processes of the killed driver's Ray still alive: {left}"
    assert not os.path.exists(temp_dir)
    before = rows(store)
    assert len(before) == 2 and sum(r["parent_run_id"] is not None for r in before.values()) == 1  # run + branch

    spec = SweepSpec.from_dict(spec_dict)
    log = io.StringIO()
    result = run_sweep(spec, num_cpus=2, fit=False, out=log)
    assert "grid: 4 cells, 2 already in the store, 2 to run in 1 trials" in log.getvalue(), log.getvalue()
    after = rows(store)
    assert set(after) == {c.run_id for c in cells} and result["counts"] == {"completed": 4}
    assert len(glob.glob(str(store / "runs" / "*.parquet"))) == 4  # one row per run, none twice
    for run_id, row in before.items():  # finished before the kill: not trained again
        assert after[run_id]["finished_at"] == row["finished_at"]
    resumed = [r for run_id, r in after.items() if run_id not in before and r["restarts"] >= 1]
    assert len(resumed) == 2, "the interrupted run and its branch should come from its checkpoint"
    (branch,) = [r for r in resumed if r["parent_run_id"] is not None]
    assert branch["tokens"] < after[branch["parent_run_id"]]["tokens"] and branch["budget_compute"] == small
    assert 0 < branch["compute_spent"] < branch["compute"]  # only its cooldown was extra

    no_ray_needed(monkeypatch)
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(str(store / "runs" / "*.parquet"))}
    log = io.StringIO()
    assert run_sweep(spec, num_cpus=2, fit=False, out=log)["counts"] == {"completed": 4}
    assert "grid: 4 cells, 4 already in the store, 0 to run" in log.getvalue(), log.getvalue()
    assert {p: os.path.getmtime(p) for p in glob.glob(str(store / "runs" / "*.parquet"))} == mtimes


def test_fit_stage_writes_the_law_next_to_the_results(tmp_path):
    from analysis import ScalingLaw
    from analysis.synthetic import synthetic_sweep, write_store

    store = tmp_path / "store"
    write_store(synthetic_sweep(ScalingLaw.reference(), noise=0.005, seed=1), store)
    spec = SweepSpec.from_yaml(ROOT / "tuning" / "configs" / "reference.yaml")
    spec = spec.replace(storage=str(store), fit=spec.fit.__class__(bootstrap=20, seed=0))
    law = fit_stage(spec)
    assert law is not None and law.phi == pytest.approx(0.459, abs=0.05)
    saved = ScalingLaw.load(store / "law.json")
    assert saved.phi == pytest.approx(law.phi)
    pngs = sorted(p.name for p in (store / "plots").glob("*.png"))
    assert len(pngs) >= 4 and all((store / "plots" / p).stat().st_size > 0 for p in pngs)


@pytest.mark.slow
def test_an_unreadable_run_file_costs_only_its_cell_and_an_upgrade_costs_nothing(ray_for_sweeps, tmp_path,
                                                                                  monkeypatch):
    """A truncated run file and a junk .parquet file: the rerun names both, moves them to runs/_quarantine/ and
    trains exactly the cell whose row was lost. Then the code grows a defaulted field in the model, optimizer and
    run configs: a rerun finds every cell under its old id and trains nothing."""
    store = tmp_path / "store"
    spec = SweepSpec.from_dict(tiny_spec(store, budgets=[{"compute": 1.5e10, "widths": [32]}]))
    assert run_sweep(spec, num_cpus=2, fit=False)["counts"] == {"completed": 2}
    before = rows(store)
    lost, kept = sorted(before)
    runs = store / "runs"
    data = (runs / f"{lost}.parquet").read_bytes()
    (runs / f"{lost}.parquet").write_bytes(data[: len(data) // 2])
    (runs / "junk.parquet").write_text("not parquet")
    kept_mtime = os.path.getmtime(runs / f"{kept}.parquet")

    log = io.StringIO()
    result = run_sweep(spec, num_cpus=2, fit=False, out=log)
    log = log.getvalue()
    assert "grid: 2 cells, 1 already in the store, 1 to run" in log, log
    assert f"{lost}.parquet" in log and "junk.parquet" in log and "runs/_quarantine/" in log
    assert result["counts"] == {"completed": 2}
    after = rows(store)
    assert set(after) == set(before)
    assert os.path.getmtime(runs / f"{kept}.parquet") == kept_mtime  # the readable run was not touched
    assert after[lost]["finished_at"] > before[lost]["finished_at"]
    quarantined = {q.file for q in results_store.quarantined(str(store))}
    assert quarantined == {f"{lost}.parquet", "junk.parquet"}
    assert len(list((runs / "_quarantine").glob("*.parquet"))) == 2

    import dataclasses

    import training.config
    import tuning.grid

    def grown(cls, name, default):
        return dataclasses.make_dataclass(cls.__name__, [(name, type(default), default)], bases=(cls,), frozen=True)

    monkeypatch.setattr(training.config, "LoopedConfig", grown(training.config.LoopedConfig, "norm", "rms"))
    monkeypatch.setattr(training.config, "OptimConfig", grown(training.config.OptimConfig, "recipe", "adamw"))
    monkeypatch.setattr(tuning.grid, "RunConfig", grown(training.config.RunConfig, "new_setting", ()))
    cells = expand(absolute_storage(spec))
    assert all(hasattr(c.run, "new_setting") and c.run.optim.recipe == "adamw" for c in cells)
    no_ray_needed(monkeypatch)
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(str(runs / "*.parquet"))}
    log = io.StringIO()
    assert run_sweep(spec, num_cpus=2, fit=False, out=log)["counts"] == {"completed": 2}
    assert "grid: 2 cells, 2 already in the store, 0 to run" in log.getvalue(), log.getvalue()
    assert {p: os.path.getmtime(p) for p in glob.glob(str(runs / "*.parquet"))} == mtimes


@pytest.mark.slow
def test_a_diverging_cell_is_recorded_as_diverged(ray_for_sweeps, tmp_path):
    """The grid stops nothing itself: training's guard ends a diverging run (both ranks of a two-worker ZeRO-2 group
    stop together), and the sweep keeps its row, NaN loss and the reason included."""
    store = tmp_path / "store"
    recipe = {**tiny_spec(store)["recipe"], "micro_batch": 4, "optim": {"grad_clip": 0.0}}
    spec = SweepSpec.from_dict(tiny_spec(store, budgets=[{"compute": 1.5e10, "widths": [32]}], r=[2],
                                         recipe=recipe, lr={"rule": "fixed", "value": 1.0e4},
                                         resources={"num_workers": 2, "cpus_per_worker": 0.9, "zero_stage": 2,
                                                    "trial_cpus": 0.1}))
    result = run_sweep(spec, num_cpus=2, fit=False)
    assert result["counts"] == {"diverged": 1}
    (row,) = rows(store).values()
    assert row["status"] == "diverged" and row["lr"] == 1.0e4
    assert row["steps"] < expand(absolute_storage(spec))[0].run.steps  # stopped early
    assert math.isnan(row["val_loss"]) and "loss" in row["error"]
