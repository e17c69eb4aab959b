"""The one way this project gets a Ray: for a run, a data preparation, a sweep and the tests.

`ray_session()` uses the Ray already initialised in this process; else attaches to `address` / RAY_ADDRESS (a
cluster, or a `ray job submit` driver); else starts a private local Ray in its own temp dir and stops it afterwards.

A private Ray must not outlive its driver, however the driver ends. Ray ties gcs_server, the raylet and the dashboard
to the driver (parent-death signal), but the raylet's agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) survive
a SIGKILLed driver and ignore SIGTERM. So each private Ray gets a guard: a small process in its own session, holding
a pipe whose other end only the driver has. When the driver exits (cleanly, by an exception or SIGKILL) the pipe
closes, and the guard kills every process of that Ray, found by its temp dir in their command lines and open files,
then removes the temp dir. Nothing else on the machine is touched (never `ray stop`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


def processes_of(temp_dir: str, spare: set[int] = frozenset()) -> list:
    """Live processes of the Ray whose temp dir is `temp_dir`: those naming it in their command line or holding a
    file open under it (the agents rename themselves, but keep their logs open), except the pids in `spare`."""
    import psutil

    root = os.path.realpath(temp_dir)
    inside = (root + os.sep, temp_dir.rstrip(os.sep) + os.sep)
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid in spare:
            continue
        try:
            named = any(root in arg or temp_dir in arg for arg in p.info["cmdline"] or ())
            if named or any(f.path.startswith(inside) for f in p.open_files()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _reap(temp_dir: str, spare: set[int], patience: float = 30.0) -> None:
    """Kill what is left of the Ray in `temp_dir` and remove the folder; processes still starting up or exiting
    can appear (or write a file) after a pass, so pass until a whole one finds nothing."""
    import psutil

    deadline = time.monotonic() + patience
    while True:
        procs = processes_of(temp_dir, spare)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()  # SIGKILL: the agents ignore SIGTERM, and nothing of a discarded Ray is worth saving
        psutil.wait_procs(procs, timeout=5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if (not procs and not os.path.exists(temp_dir)) or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def _guard_main(temp_dir: str, driver_pid: int) -> None:
    """The guard: wait for the driver's end of stdin to close, then reap its Ray."""
    sys.stdin.buffer.read()
    _reap(temp_dir, spare={os.getpid(), driver_pid})


def _start_guard(temp_dir: str) -> subprocess.Popen:
    # -P: not training/ first on sys.path (the guard needs only the standard library and psutil).
    # Its own session: a Ctrl-C to the driver's terminal, or a kill of the driver's process group, must not end it.
    return subprocess.Popen([sys.executable, "-P", __file__, temp_dir, str(os.getpid())], stdin=subprocess.PIPE,
                            start_new_session=True, close_fds=True)


# Ray Train on a private Ray (one machine: the laptop sweep, a single run, the tests), where a run trains for
# seconds and Train's own actors cost as much: the controller polls its workers every 0.1 s instead of 2 s, and no
# preemption watcher (one more actor process per run, for the drain notices of cloud nodes a private Ray does not
# have). A worker's `ray.train.report` waits until the controller has polled its previous one (a queue of one), so
# the poll interval is the floor of every report: at 0.5 s a 50-step tiny run with 13 reports took 18-19.5 s, at 0.1 s
# 12-13.5 s. The polling costs little: a 10 s busy train function used 27 CPU-s in all at either interval, and over a
# long laptop-sweep run the controller took 2.2% of a core at 0.1 s against 1.2% at 0.5 s (2026-12-07, this 2-core
# machine). Train reads both in the process that builds the TorchTrainer (the driver, or a Tune trial) and hands them
# to its controller; a value the user set wins.
PRIVATE_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` for the block, restored after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Ray gives a new node's raylet a fixed 30 s to register with the GCS (ray/_private/node.py, not configurable). On 2
# cores already busy (two test files side by side, each starting a Ray while the other trains) it has missed that
# twice in 3 CI runs (2026-12-06), failing the sweep before it began. Starting again costs one more Ray start-up.
STARTUP_TRIES = 3
STARTUP_TIMEOUT = "timed out during startup"  # the message of that exception


def _init_with_retries(tmp: str, guard_pid: int, **init_options) -> None:
    """ray.init(**init_options), started again (its processes reaped first) when the raylet missed the start-up wait."""
    import ray

    for attempt in range(1, STARTUP_TRIES + 1):
        try:
            ray.init(**init_options)
            return
        except Exception as exc:
            if STARTUP_TIMEOUT not in str(exc) or attempt == STARTUP_TRIES:
                raise
            print(f"ray_session: the local Ray's raylet did not register in time (a busy machine); starting it again "
                  f"(try {attempt + 1} of {STARTUP_TRIES})", file=sys.stderr, flush=True)
            ray.shutdown()
            _reap(tmp, spare={os.getpid(), guard_pid})


@contextlib.contextmanager
def _private_ray(num_cpus: int | None, dashboard: bool, log_to_driver: bool, log_options: dict) -> Iterator[str]:
    import ray

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 chars
    guard = _start_guard(tmp)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    # Every process of this Ray (and the driver, for the duration) sees `shared`.
    shared = {k: os.environ.get(k, v) for k, v in PRIVATE_TRAIN_ENV.items()}
    options = {"include_dashboard": False}
    if dashboard:
        # With Train V2 under Tune, the placement group of a trial stopped by a scheduler is released by Train's
        # PlacementGroupCleaner, which asks the dashboard's state API whether the controller died. That client finds
        # its cluster by address, and with several Rays on one machine "auto" is ambiguous (the cleaner dies and the
        # resources leak), so every process of this Ray is told its dashboard URL.
        port = _free_port()
        shared["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        options = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    # PYTHONPATH: workers import models/, training/, tuning/ however the driver was started.
    env_vars = {"PYTHONPATH": pythonpath, **shared}
    try:
        with _environ(shared):
            try:
                _init_with_retries(tmp, guard.pid, address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                                   _temp_dir=tmp, log_to_driver=log_to_driver, runtime_env={"env_vars": env_vars},
                                   **log_options, **options)
                yield tmp
            finally:
                ray.shutdown()
    finally:
        guard.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):  # a child forked (not exec'd) by this process holds
            guard.wait(timeout=60)  # the pipe too; else the caller now finds no process and no folder of this Ray


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False,
                log_to_driver: bool = True, logging_level: int | str | None = None) -> Iterator[str | None]:
    """Ray for the duration of the block; yields the private Ray's temp dir (None when attached to a cluster or to
    the Ray this process already has). `address="local"` always starts a private Ray (the tests), whatever
    RAY_ADDRESS says. `num_cpus` sizes a private Ray (default: all cores); `dashboard` starts its dashboard (the
    sweep needs it, see above); `log_to_driver=False` keeps the workers' output in the Ray logs; `logging_level` is
    the driver's "ray" logger level (default Ray's, INFO). Ray keeps the handlers the caller gave that logger
    (tuning.console routes it to a file); `ray.init(configure_logging=False)` would remove them."""
    import ray

    log_options = {} if logging_level is None else {"logging_level": logging_level}
    if ray.is_initialized():
        yield None
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=log_to_driver, **log_options)
        try:
            yield None
        finally:
            ray.shutdown()
        return
    with _private_ray(num_cpus, dashboard, log_to_driver, log_options) as tmp:
        yield tmp


if __name__ == "__main__":  # the guard process (see _start_guard)
    _guard_main(sys.argv[1], int(sys.argv[2]))
