"""One writer per store: the lease in the store itself (training.store_lock), and two real sweep drivers started
together on one store: one trains, the other refuses in one line and writes nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from training import results_store
from training.store_lock import LOCK_DIR, StoreLock, StoreLocked
from two_cell_spec import two_cell_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["exclusive", "write-read-back"])
def mode(request) -> bool:
    """Both ways of creating the lease: os.link (local folders) and write-then-read-back (object stores)."""
    return request.param == "exclusive"


def lock(store, exclusive: bool, **kw) -> StoreLock:
    return StoreLock(str(store), command="test", exclusive=exclusive, settle=0.05, interval=0.2, **kw)


def test_second_writer_is_refused_and_named_until_the_first_releases(tmp_path, mode):
    first = lock(tmp_path / "store", mode).acquire()
    with pytest.raises(StoreLocked) as refused:
        lock(tmp_path / "store", mode).acquire()
    assert f"pid {os.getpid()}" in str(refused.value) and "command: test" in str(refused.value)
    time.sleep(0.5)  # heartbeats meanwhile keep it live
    assert first.holder().token == first.me.token and first.holder().age() < 0.5
    first.release()
    assert not list((tmp_path / "store" / LOCK_DIR).glob("*.json"))
    second = lock(tmp_path / "store", mode).acquire()
    assert second.took_over is None
    second.release()


def test_contenders_at_once_exactly_one_wins(tmp_path, mode):
    results: list = []
    barrier = threading.Barrier(4)

    def contend():
        lk = lock(tmp_path / "store", mode)
        barrier.wait()
        try:
            results.append(lk.acquire())
        except StoreLocked as exc:
            results.append(exc)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, StoreLock)]
    assert len(winners) == 1 and sum(isinstance(r, StoreLocked) for r in results) == 3
    winners[0].release()


HOLDER = textwrap.dedent("""
    import sys, time
    from training.store_lock import StoreLock
    StoreLock(sys.argv[1], command="holder", interval=0.2).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_killed_holder_is_taken_over_and_a_stale_remote_one_too(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(StoreLocked):
        StoreLock(str(store)).acquire()
    proc.send_signal(signal.SIGKILL)  # no release: its lease stays, naming a dead pid on this host
    proc.wait()
    lk = StoreLock(str(store), interval=0.2).acquire()
    assert lk.took_over.pid == proc.pid and "is gone" in lk.took_over_reason
    assert [p.name for p in (store / LOCK_DIR).glob("*.json")] == ["000002.json"]
    lk.release()

    # A holder on another host: alive while its heartbeat is fresh, dead once it is older than its stale_after.
    def plant(heartbeat_age: float) -> None:
        (store / LOCK_DIR).mkdir(exist_ok=True)
        (store / LOCK_DIR / "000007.json").write_text(json.dumps({
            "token": "t", "host": "elsewhere", "pid": 1, "started_at": "x", "command": "remote sweep",
            "heartbeat": time.time() - heartbeat_age, "stale_after": 30}))

    plant(5)
    with pytest.raises(StoreLocked, match="on elsewhere"):
        StoreLock(str(store)).acquire()
    plant(60)
    lk = StoreLock(str(store), interval=0.2).acquire()
    assert lk.took_over.host == "elsewhere" and "heartbeat is 60 s old" in lk.took_over_reason
    lk.release()


def test_wait_then_takeover_and_the_overtaken_writer_learns_it(tmp_path):
    store = tmp_path / "store"
    first = lock(store, True).acquire()
    waiter = lock(store, True)
    got = threading.Event()
    threading.Thread(target=lambda: (waiter.acquire(wait=True, poll=0.05), got.set()), daemon=True).start()
    time.sleep(0.3)
    assert not got.is_set()
    first.release()
    assert got.wait(5) and waiter.took_over is None
    lost = []
    taker = lock(store, True).acquire(takeover=True)  # --takeover of a live holder
    assert taker.took_over.token == waiter.me.token
    deadline = time.time() + 5
    waiter.on_lost = lost.append
    while not waiter.lost and time.time() < deadline:
        time.sleep(0.05)
    assert waiter.lost and "now held by" in waiter.lost and lost
    waiter.release()  # does not delete the taker's lease
    assert taker.holder().token == taker.me.token
    taker.release()


# ---- two real sweep drivers on one store ---------------------------------------------------------------------------
def spec_dict(store: Path) -> dict:
    """One cell of 10 steps (r = 1), fixed LR: what a driver's lock and a store's failure do needs no more."""
    return {**two_cell_spec("lock", store, {"rule": "fixed", "value": 1.0e-2}), "r": [1]}


def sweep(spec_path: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "tuning" / "sweep.py"), "--config", str(spec_path),
                                 "--num-cpus", "2", "--no-fit", *extra], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=spec_path.parent, start_new_session=True)


def ray_messages(console: str) -> str:
    """The Ray log file a sweep's console names (tuning.console), '' if nothing was written to it."""
    path = Path(next(line.split(" go to ", 1)[1].strip() for line in console.splitlines() if " go to " in line))
    return path.read_text() if path.exists() else ""


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.slow
def test_two_sweeps_started_together_train_each_run_once(tmp_path):
    store = tmp_path / "store"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(store)))
    drivers = [sweep(spec_path, tmp_path / f"driver{i}.log") for i in range(2)]
    try:
        # The refused one ends at once, before Ray starts: watch the store while the other trains.
        deadline = time.monotonic() + 120
        while all(d.poll() is None for d in drivers):
            assert time.monotonic() < deadline, "neither driver was refused"
            time.sleep(0.1)
        refused = next(i for i, d in enumerate(drivers) if d.poll() is not None)
        winner = drivers[1 - refused]
        log = (tmp_path / f"driver{refused}.log").read_text()
        assert drivers[refused].returncode == 75, log
        lines = [line for line in log.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in log, log
        assert lines[0].startswith(f"error: store {store} is in use by pid {winner.pid} on ") and \
            "--takeover" in lines[0] and "--wait" in lines[0], lines[0]
        assert winner.wait(timeout=600) == 0, (tmp_path / f"driver{1 - refused}.log").read_text()[-4000:]
    finally:
        for d in drivers:
            if d.poll() is None:
                os.killpg(d.pid, signal.SIGKILL)
    winner_log = (tmp_path / f"driver{1 - refused}.log").read_text()
    assert "grid: 1 cells, 0 already in the store, 1 to run" in winner_log
    rows = results_store.read_runs(str(store)).to_pylist()
    assert len(rows) == 1 and {r["status"] for r in rows} == {"completed"}
    for r in rows:  # each run trained once: one TensorBoard event file, one Ray Train run, no restart
        assert len(list((store / "tensorboard" / r["run_id"]).glob("events.out.tfevents.*"))) == 1
        assert r["restarts"] == 0
    assert len(list((store / "tune").iterdir())) == 1  # one Tune experiment: the winner's
    assert not list((store / LOCK_DIR).glob("*.json"))  # released at the end
    assert not [p for p in store.rglob(".*") if p.name.startswith((".tmp", ".probe", ".0"))]  # no temp names left

    # The same command again now: nothing to train, and it takes the free lock (and starts no Ray: no new Ray log).
    again = sweep(spec_path, tmp_path / "again.log")
    assert again.wait(timeout=300) == 0
    again_log = (tmp_path / "again.log").read_text()
    assert "grid: 1 cells, 1 already in the store, 0 to run" in again_log
    assert "Started a local Ray instance" in ray_messages(winner_log)
    assert "Started a local Ray instance" not in ray_messages(again_log)
