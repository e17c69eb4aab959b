"""The console of a sweep is for a person: our own lines (stage headers, progress, the report) and real errors; Ray's
and Ray Tune's own messages go to STORE/logs/sweep-<time>.log, whose path is printed once (tuning.console)."""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuning import console

from two_cell_spec import two_cell_spec

ROOT = Path(__file__).resolve().parents[1]
RAYLET_WARNING = ("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: abc with "
                  "address: 127.0.0.1, which is 4x the maximum expected startup concurrency (2). This could be ...")


def test_ray_messages_go_to_the_log_and_the_rest_passes(tmp_path, capsys):
    out = io.StringIO()
    ray_handlers = logging.getLogger("ray").handlers[:]
    with console.routed(str(tmp_path / "store"), out) as path:
        print(RAYLET_WARNING)  # as ray._private.worker prints what the raylet pushes to the driver
        print("(raylet) Task was killed due to the node running low on memory.")  # a real one: stays
        print("(RayTrainWorker pid=12) step 4 loss 6.9", file=sys.stderr)  # workers' output (--worker-logs)
        logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
        logging.getLogger("ray.tune").warning("a Tune warning")
        logging.getLogger("ray.tune.execution.tune_controller").error("Trial task failed ... Traceback")
        logging.getLogger("ray.train").error("a real error")
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    captured = capsys.readouterr()
    assert "startup concurrency" not in captured.out
    assert "(raylet) Task was killed" in captured.out
    assert "(RayTrainWorker pid=12) step 4" in captured.err
    assert "a real error" in captured.err
    assert "Started a local Ray" not in captured.err + captured.out and "Tune warning" not in captured.err
    assert "Trial task failed" not in captured.err  # the sweep reports a trial's error in one line of its own
    log = Path(path).read_text()
    assert Path(path).parent == tmp_path / "store" / "logs" and re.fullmatch(r"sweep-\d{8}-\d{6}\.log", Path(path).name)
    for text in ("startup concurrency", "Started a local Ray instance.", "a Tune warning", "Trial task failed",
                 "a real error"):
        assert text in log, text
    assert out.getvalue() == f"log: Ray's and Tune's own messages go to {path}\n"
    # all as it was afterwards
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ or os.environ["RAY_AIR_NEW_OUTPUT"] != "0"
    assert not isinstance(sys.stdout, console._LineRouter) and not isinstance(sys.stderr, console._LineRouter)
    assert logging.getLogger("ray").handlers == ray_handlers


def test_a_store_given_as_a_uri_gets_its_log_at_the_end(tmp_path):
    out = io.StringIO()
    with console.routed(f"file://{tmp_path}/store", out) as path:
        logging.getLogger("ray.tune").warning("a Tune warning")
        assert Path(path).is_file()
    (log,) = (tmp_path / "store" / "logs").iterdir()
    assert "a Tune warning" in log.read_text() and f"file://{tmp_path}/store/logs/{log.name}" in out.getvalue()
    assert not Path(path).parent.exists()  # no temporary folder left behind


@pytest.mark.slow
def test_a_sweep_console_shows_our_lines_only(tmp_path):
    store = tmp_path / "store"
    spec_path = tmp_path / "spec.yaml"
    # Two trials at once on 2 CPUs start the 8 worker processes (trial, Train controller and worker, and a watcher
    # each) that set off the raylet's startup-concurrency warning.
    spec = {**two_cell_spec("console", store, {"rule": "fixed", "value": 1.0e-2}), "concurrency": 2}
    spec_path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AIR_NEW_OUTPUT")}
    proc = subprocess.run([sys.executable, str(ROOT / "tuning" / "sweep.py"), "--config", str(spec_path),
                           "--num-cpus", "2"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    text = proc.stdout + proc.stderr
    print(text)  # the console, for the record (pytest -s)
    assert proc.returncode == 0, text
    for noise in ("startup concurrency", "Configuration for experiment", "Trial status", "View detailed results",
                  "Started a local Ray instance", "Token authentication", "Traceback"):
        assert noise not in text, noise
    assert re.search(r"^grid: 2 cells", proc.stdout, re.M) and re.search(r"^\[grid +\d+s\] done 2/2", proc.stdout, re.M)
    assert re.search(r"^fit", proc.stdout, re.M) and "sweep wall time" in proc.stdout
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("log: ")]
    path = Path(line.split(" go to ", 1)[1])
    assert path.parent == store / "logs" and path.is_file()
    assert "Started a local Ray instance" in path.read_text()
