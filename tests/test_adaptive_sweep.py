"""The adaptive sweep (issue 13): its spec section, its planner, and the sweep end to end on real Ray Tune with a
trainable that returns a planted law's loss plus 1% noise instead of training (the searcher, stopping, resume and
store are what is tested): it reaches the study grid's predicted phi half-width with <= 70% of the grid's FLOPs,
its interval covers the planted phi, and a rerun after its driver is SIGKILLed trains no run twice."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from analysis import ScalingLaw
from analysis.planning import DesignPoints, predict_precision
from analysis.synthetic import planted_row
from training import results_store
from tuning.adaptive import AdaptivePlanner
from tuning.grid import candidate_cells, expand
from tuning.spec import SweepSpec

ROOT = Path(__file__).resolve().parents[1]
REF = ScalingLaw.reference()


def grid_plan(study_spec: dict):
    """The study grid's predicted phi precision at 1% noise: the bar the adaptive sweep has to clear."""
    cells = expand(SweepSpec.from_dict({**study_spec, "storage": "/nonexistent/store"}))
    return predict_precision(REF, DesignPoints.from_runs([c.run for c in cells]), 0.01)


def adaptive_spec(study_spec: dict, storage: Path, **adaptive) -> dict:
    grid = grid_plan(study_spec)
    return {**study_spec, "storage": str(storage), "concurrency": 1, "lr": {"rule": "fixed", "value": 0.014},
            "fit": {"bootstrap": 0},
            "adaptive": {"target_phi_halfwidth": grid.halfwidth["phi"], "max_flops": grid.total_flops,
                         "initial_runs": 12, **adaptive}}


def test_spec_adaptive_section_is_validated(study_spec, tmp_path):
    spec = SweepSpec.from_dict(adaptive_spec(study_spec, tmp_path))
    assert spec.adaptive.initial_runs == 12 and spec.adaptive.prior == "reference"
    bad = [({"target_phi_halfwidth": None}, "adaptive.target_phi_halfwidth: missing"),
           ({"max_flops": -1}, "adaptive.max_flops: must be > 0"),
           ({"initial_runs": 3}, "adaptive.initial_runs: must be an integer >= 7"),
           ({"prior": str(tmp_path / "nope.json")}, "adaptive.prior: must be `reference` or an existing law JSON"),
           ({"every": 2}, "adaptive.every: unknown field")]
    for change, message in bad:
        d = adaptive_spec(study_spec, tmp_path)
        d["adaptive"] = {k: v for k, v in {**d["adaptive"], **change}.items() if v is not None}
        with pytest.raises(ValueError, match=message.replace("`", ".").replace("(", r"\(")):
            SweepSpec.from_dict(d)
    with pytest.raises(ValueError, match="r: an adaptive sweep pins phi"):
        SweepSpec.from_dict({**adaptive_spec(study_spec, tmp_path), "r": [4]})
    with pytest.raises(ValueError, match="adaptive: plans the baseline law alone"):
        variants = {"baseline": {}, "trunc": {"bptt_k": 1}}
        SweepSpec.from_dict({**adaptive_spec(study_spec, tmp_path), "variants": variants})


@pytest.mark.slow
def test_planner_alone_reaches_the_grid_interval_for_less(study_spec, tmp_path):
    """The planner's loop without Ray: pick, measure (planted), record, until it stops."""
    spec = SweepSpec.from_dict(adaptive_spec(study_spec, tmp_path))
    planner = AdaptivePlanner(spec, candidate_cells(spec), rows=[])
    while not planner.stopped:
        pick = planner.next_cell()
        if pick is None:
            break
        index, cell = pick
        planner.record(planted_row(REF, cell.run), index)
    report = planner.report()
    assert report["stopped"] == "target"
    assert report["phi_halfwidth"] <= spec.adaptive.target_phi_halfwidth
    assert report["flops"] <= 0.7 * spec.adaptive.max_flops
    lo, hi = report["phi_profile"]
    assert lo < REF.phi < hi
    # a budget too small for the target stops on the budget, and says so
    small = SweepSpec.from_dict(adaptive_spec(study_spec, tmp_path, max_flops=0.05 * spec.adaptive.max_flops))
    planner = AdaptivePlanner(small, candidate_cells(small), rows=[])
    while (pick := planner.next_cell()) is not None:
        planner.record(planted_row(REF, pick[1].run), pick[0])
    report = planner.report()
    assert report["stopped"] == "max_flops" and report["flops"] <= small.adaptive.max_flops


DRIVER = '''
import sys
sys.path.insert(0, {root!r})


def planted_cell(config):
    from ray import tune

    from analysis import ScalingLaw
    from analysis.synthetic import planted_row
    from training import results_store
    from training.config import RunConfig

    run = RunConfig.from_dict(config["cell"]["run"])
    with open({log!r}, "a") as f:  # one line per execution: a repeated run shows up twice
        f.write(run.run_id + "\\n")
    row = planted_row(ScalingLaw.reference(), run, noise=0.01)
    results_store.write_run(run.storage, row)
    tune.report({{"final": 1, "status": "completed", "run_id": run.run_id, "val_loss": row["val_loss"]}})


if __name__ == "__main__":
    from tuning.spec import SweepSpec
    from tuning.sweep import run_sweep

    run_sweep(SweepSpec.from_yaml({spec!r}), num_cpus=2, fit=False, trainable=planted_cell)
'''


def _kill_session(sid: int) -> None:
    """SIGKILL what the killed driver left running: its local Ray, all in the driver's session."""
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(proc.pid) == sid:
                proc.kill()


def _driver(tmp_path: Path, name: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, str(tmp_path / "driver.py")], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=tmp_path, start_new_session=True)


@pytest.mark.slow
def test_adaptive_sweep_on_ray_tune_stops_at_the_target_and_resumes(study_spec, tmp_path):
    store = tmp_path / "store"
    spec_dict = adaptive_spec(study_spec, store)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec_dict))
    executions = tmp_path / "executions.log"
    (tmp_path / "driver.py").write_text(DRIVER.format(root=str(ROOT), log=str(executions),
                                                      spec=str(tmp_path / "spec.yaml")))

    # First driver: SIGKILLed once the planner is past its initial design and refitting.
    first = _driver(tmp_path, "first")
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None:
            if (store / "runs").exists() and len(results_store.read_runs(str(store))) >= 20:
                os.kill(first.pid, signal.SIGKILL)
                break
            time.sleep(0.5)
        assert first.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        _kill_session(first.pid)
        for session in glob.glob(f"/tmp/rs*/session_*_{first.pid}"):  # its Ray temp dir, named after its pid
            shutil.rmtree(Path(session).parent, ignore_errors=True)
    before = {r["run_id"]: r for r in results_store.read_runs(str(store)).to_pylist()}
    assert not (store / "adaptive.json").exists()

    # Second driver: picks up from the store and runs to the stop.
    second = _driver(tmp_path, "second")
    try:
        assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        _kill_session(second.pid)
    log = (tmp_path / "second.log").read_text()
    assert f"{len(before)} runs already in the store" in log and "stopped: target half-width reached" in log

    after = {r["run_id"]: r for r in results_store.read_runs(str(store)).to_pylist()}
    executed = executions.read_text().split()
    assert len(executed) == len(set(executed)), "a run was executed twice"
    assert set(after) <= set(executed) and len(set(executed) - set(after)) <= 1  # at most the one killed in flight
    for run_id, row in before.items():  # finished before the kill: kept, not trained again
        assert after[run_id]["finished_at"] == row["finished_at"]

    report = json.loads((store / "adaptive.json").read_text())
    spec = SweepSpec.from_dict(spec_dict)
    assert report["stopped"] == "target" and report["completed"] == len(after)
    assert report["phi_halfwidth"] <= spec.adaptive.target_phi_halfwidth
    assert report["flops"] == pytest.approx(sum(r["compute"] for r in after.values()))
    assert report["flops"] <= 0.7 * spec.adaptive.max_flops, report
    lo, hi = report["phi_profile"]
    assert lo < REF.phi < hi
    candidates = {c.run_id for c in candidate_cells(SweepSpec.from_dict(spec_dict))}
    assert set(after) <= candidates
