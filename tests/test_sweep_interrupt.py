"""Ctrl-C ends a real sweep driver cleanly, in the LR search and in the grid, and a rerun of the same command
finishes the sweep with each run stored once. The driver runs `python tuning/sweep.py` in its own session and gets
SIGINT on its process group, as a terminal's Ctrl-C sends it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from optuna_file import trial_states
from training import results_store
from training.ray_session import processes_of
from tuning.spec import SweepSpec
from tuning.sweep import absolute_storage, validate
from two_cell_spec import two_cell_spec

ROOT = Path(__file__).resolve().parents[1]
RESUME_LINE = "rerun the same command to resume"


def spec_dict(store: Path) -> dict:
    """Two cells of 10 steps (r in {1, 2} at one budget) after a 1-trial LR search at the r=1 cell: the grid trains
    one cell itself, the other is the search's run."""
    return two_cell_spec("intr", store, {"rule": "tuned", "search": {
        "trials": 1, "low": 1.0e-3, "high": 3.0e-2, "enqueue": [1.0e-2], "pruner": "none", "width": 32, "r": 1,
        "concurrency": 1}})


class Driver:
    """One `python tuning/sweep.py --config SPEC` in its own session, its output in a log file."""

    def __init__(self, spec_path: Path, log: Path):
        self.log_path = log
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tuning" / "sweep.py"), "--config",
                                          str(spec_path), "--num-cpus", "2"], stdout=out, stderr=subprocess.STDOUT,
                                         env=env, cwd=spec_path.parent, start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def ray_temp_dir(self) -> str | None:
        """The private Ray's temp dir: its session folder is named after the pid of the driver that started it."""
        found = list(Path("/tmp").glob(f"ray*/session_*_{self.proc.pid}"))
        return str(found[0].parent) if found else None

    def interrupt_when(self, ready: Callable[[], bool], timeout: float = 400) -> str:
        """SIGINT to the driver's process group once `ready()`; returns its Ray's temp dir."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the driver ended (rc {self.proc.returncode}) first:\n{self.log[-4000:]}"
            assert time.monotonic() < deadline, f"never ready:\n{self.log[-4000:]}"
            time.sleep(0.3)
        temp_dir = self.ray_temp_dir()
        assert temp_dir, "the driver has no private Ray"
        os.killpg(self.proc.pid, signal.SIGINT)
        return temp_dir

    def wait(self, timeout: float = 400) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


def running_trials(storage: str, study: str) -> list[int]:
    return [n for n, state in trial_states(Path(storage.removeprefix("sqlite:///")), study) if state == "RUNNING"]


def stored_ids(store: Path) -> list[str]:
    return results_store.read_runs(str(store)).column("run_id").to_pylist() if (store / "runs").exists() else []


def assert_clean_interrupt(driver: Driver, rc: int, temp_dir: str, store: Path, optuna_db: str) -> None:
    log = driver.log
    assert rc == 130, log[-4000:]
    lines = [line for line in log.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and lines[0].endswith(RESUME_LINE), log[-4000:]
    assert "Traceback" not in log and "Tuner.restore" not in log, log[-4000:]
    assert not (store / "law.json").exists()
    assert running_trials(optuna_db, "intr-lr") == []
    assert processes_of(temp_dir) == [] and not os.path.exists(temp_dir)  # the private Ray went with the driver


@pytest.mark.slow
def test_ctrl_c_in_lr_search_and_in_grid_then_rerun_finishes(tmp_path):
    store = tmp_path / "store"
    spec = spec_dict(store)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    optuna_db = f"sqlite:///{store / 'optuna.db'}"
    n_cells = len(validate(absolute_storage(SweepSpec.from_dict(spec))))

    # 1. Ctrl-C while an LR-search trial is running.
    first = Driver(spec_path, tmp_path / "first.log")
    temp_dir = first.interrupt_when(lambda: running_trials(optuna_db, "intr-lr") != [])
    assert_clean_interrupt(first, first.wait(), temp_dir, store, optuna_db)
    assert "interrupted: lr search 0 of 1 trials done, grid not started" in first.log

    # 2. The same command again: it finishes the search, then Ctrl-C while the grid trains its own cell.
    second = Driver(spec_path, tmp_path / "second.log")
    temp_dir = second.interrupt_when(lambda: "[grid" in second.log and "running 1" in second.log.split("[grid")[-1])
    assert_clean_interrupt(second, second.wait(), temp_dir, store, optuna_db)
    assert "lr search: re-queued" not in second.log  # the first driver left nothing RUNNING to recover
    stored = stored_ids(store)
    assert f"interrupted: {len(stored)} of {n_cells} runs stored, {n_cells - len(stored)} left" in second.log
    assert len(stored) < n_cells

    # 3. Once more, to the end: every cell stored exactly once, the search's budget spent exactly.
    third = Driver(spec_path, tmp_path / "third.log")
    assert third.wait() == 0, third.log[-4000:]
    assert "grid result: {'completed': 2}" in third.log
    runs = stored_ids(store)
    assert len(runs) == n_cells == len(set(runs)) == len(list((store / "runs").glob("*.parquet")))
    study = optuna.load_study(study_name="intr-lr", storage=optuna_db)
    # The interrupted trial: FAIL, tagged so it does not count against the budget, its LR run again.
    interrupted, resumed = study.trials
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["interrupted"]
    assert resumed.state == TrialState.COMPLETE and resumed.params == interrupted.params


SIGNALS_SCRIPT = textwrap.dedent("""
    import os, pickle, signal, time
    from tuning.interrupt import Interrupt, InterruptStopper

    stops = []
    before = signal.getsignal(signal.SIGTERM)
    with Interrupt() as interrupt:
        stopper = InterruptStopper(interrupt, on_stop=lambda: stops.append(1))
        pickle.loads(pickle.dumps(stopper))  # Tune pickles its run config
        assert not stopper.stop_all() and os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
        os.kill(os.getpid(), signal.SIGTERM)  # what `ray job stop` sends first
        assert interrupt.requested and stopper.stop_all() and stopper.stop_all() and stops == [1]
    assert signal.getsignal(signal.SIGTERM) is before and "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ
    with Interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        print("first signal recorded", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    print("not reached")
""")


def test_first_signal_asks_tune_to_stop_second_exits_at_once():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
    proc = subprocess.run([sys.executable, "-c", SIGNALS_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "first signal recorded" in proc.stdout and "not reached" not in proc.stdout
    assert "SIGINT again: stopping now" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
