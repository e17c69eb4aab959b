"""A bad checkpoint costs one restart, never the run; a failing store ends the sweep in one line and the rerun
resumes; a failed run says why on its console line.

Real Ray, real DeepSpeed, real files: a run killed after its checkpoints, its newest checkpoint truncated, then
resumed; a sweep on a tiny tmpfs that fills up, then on the same tmpfs grown."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from training import results_store
from training.loop import NOTE_FILE, QUARANTINE, clean_stale_temp_checkpoints, select_checkpoint
from training.trainer import DS_TAG

ROOT = Path(__file__).resolve().parents[1]


# ---- without Ray ---------------------------------------------------------------------------------------------------
def fake_checkpoint(folder: Path, good: bool) -> Path:
    """A checkpoint folder as Trainer.save leaves it: DeepSpeed's torch.save zip files under ds/."""
    (folder / DS_TAG).mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", os.urandom(4096))
        data = buf.getvalue()
        (folder / DS_TAG / name).write_bytes(data if good or "model" not in name else data[: len(data) // 2])
    return folder


def test_select_skips_and_sets_aside_unreadable_checkpoints(tmp_path):
    from ray.train import Checkpoint

    run = tmp_path / "ray" / "run"
    fake_checkpoint(run / "checkpoint_2026-01-01_00-00-01.000000", good=True)
    fake_checkpoint(run / "checkpoint_2026-01-01_00-00-02.000000", good=False)
    newest = fake_checkpoint(run / "checkpoint_2026-01-01_00-00-03.000000", good=False)
    fake_checkpoint(run / "checkpoint_2026-01-01_00-00-04.000000", good=True)  # never registered by Ray: not used
    chosen, notes = select_checkpoint(Checkpoint(str(newest)), rank=0, world=1)
    assert chosen.path.endswith("00-00-01.000000")
    assert len(notes) == 2 and all("unreadable" in n and "mp_rank_00_model_states.pt" in n for n in notes)
    for name in ("checkpoint_2026-01-01_00-00-03.000000", "checkpoint_2026-01-01_00-00-02.000000"):
        assert [p.name for p in (run / name).iterdir()] == [NOTE_FILE]  # the folder stays for Ray's record
        (moved,) = (run / QUARANTINE).glob(f"{name}.*")
        assert (moved / DS_TAG / "mp_rank_00_model_states.pt").exists()
        assert "zip" in json.loads((moved / NOTE_FILE).read_text())["reason"]
    # Once more (the next start): the set-aside ones are skipped quietly; with none readable, None (from scratch).
    shutil.rmtree(run / "checkpoint_2026-01-01_00-00-01.000000" / DS_TAG)
    chosen, notes = select_checkpoint(Checkpoint(str(newest)), rank=0, world=1)
    assert chosen is None and len(notes) == 1 and "no DeepSpeed files" in notes[0]


def test_temp_checkpoints_of_dead_workers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"looplaw-ckpt0-{dead.pid}-abc"
    live = tmp_path / f"looplaw-ckpt1-{os.getppid()}-abc"
    branch = tmp_path / f"looplaw-branch-d32-r1-x-20-{os.uname().nodename.replace('-', '_')}-{dead.pid}"
    legacy_old, legacy_new = tmp_path / "looplaw-ckpt0-old", tmp_path / "looplaw-ckpt0-new"
    for folder in (stale, live, branch, legacy_old, legacy_new):
        folder.mkdir()
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    removed = clean_stale_temp_checkpoints(str(tmp_path))
    assert sorted(removed) == sorted(map(str, (stale, branch, legacy_old)))
    assert live.exists() and legacy_new.exists()


def test_failed_run_says_why_on_its_console_line(tmp_path):
    from tuning.progress import Progress

    store = str(tmp_path)
    results_store.write_run(store, {"run_id": "d8-r1-x", "status": "failed", "d_model": 8, "r": 1, "n_once": 1,
                                    "n_rec": 1, "flops_per_token": 1.0, "tokens": 0, "compute": 0.0,
                                    "val_loss": float("nan"),
                                    "error": "TrainingFailedError: worker died\n  RuntimeError: PytorchStreamReader "
                                             "failed reading zip archive: failed finding central directory"})
    out = io.StringIO()
    progress = Progress("grid", total=1, out=out)
    trial = SimpleNamespace(trial_id="t1", config={"cell": {"run_id": "d8-r1-x", "label": "C=1 d=8 r=1",
                                                            "run": {"storage": store}}})
    progress.on_trial_start(0, [], trial)
    progress.on_trial_result(0, [], trial, {"final": 1, "status": "failed", "val_loss": float("nan")})
    progress.on_trial_complete(0, [], trial)
    line = next(line for line in out.getvalue().splitlines() if "failed val_loss -" in line)
    assert "PytorchStreamReader failed reading zip archive" in line
    assert f"{store}/runs/d8-r1-x.parquet" in line and f"{store}/ray/d8-r1-x/" in line


# ---- a truncated newest checkpoint, for real -----------------------------------------------------------------------
def _kill_worker_after_checkpoint(run_dir: Path, step: int, killed: dict, deadline: float) -> None:
    import psutil

    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            latest = {}
        metrics = latest.get("metrics") or {}
        if metrics.get("step", 0) >= step and not metrics.get("done"):
            for proc in psutil.Process().children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(proc.cmdline()):
                        killed["pid"] = proc.pid
                        proc.kill()
                        return
                except psutil.Error:
                    pass
        time.sleep(0.05)


@pytest.mark.slow
def test_truncated_newest_checkpoint_resumes_from_the_older_one(ray_local, tmp_path):
    """A run failed beyond max_failures is recorded as failed; run again, it resumes from its newest readable
    checkpoint (the newest one is truncated) and replaces the failed row."""
    from training.config import RunConfig
    from training.run import execute

    cfg = RunConfig.from_dict({
        "model": {"family": "tiny", "r": 2, "d_model": 32, "seq_len": 64, "vocab_size": 512},
        "optim": {"lr": 3e-3}, "budget": {"tokens": 512 * 16}, "batch_tokens": 512, "micro_batch": 4,
        "zero_stage": 1, "resources": {"num_workers": 1, "cpus_per_worker": 0.9},
        "eval_every": 4, "checkpoint_every": 4, "val_tokens": 1024, "max_failures": 0,
        "storage": str(tmp_path), "name": "ckpt",
    })
    run_dir = tmp_path / "ray" / cfg.run_id
    killed: dict = {}
    killer = threading.Thread(target=_kill_worker_after_checkpoint, args=(run_dir, 8, killed, time.time() + 300),
                              daemon=True)
    killer.start()
    row = execute(cfg)  # max_failures 0: the killed worker fails the run, its checkpoints stay
    killer.join(timeout=1)
    assert killed and row["status"] == "failed" and row["error"], row
    assert results_store.read_run(str(tmp_path), cfg.run_id)["status"] == "failed"  # recorded, to be retried
    # The checkpoints Ray Train registered (a newer folder may exist, cut short by the kill before it was registered:
    # never a candidate); the newest registered one truncated, as a write cut short leaves it.
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    registered = [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
    assert len(registered) == 2 and snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == registered[-1]
    newest = run_dir / registered[-1] / DS_TAG / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    # A failure is the infrastructure's, not a result: executing again trains (resuming) and replaces the row.
    row = execute(cfg)
    assert row["status"] == "completed", row.get("error")
    assert row["restarts"] == 1 and row["steps"] == 16
    assert [r["status"] for r in results_store.read_runs(str(tmp_path)).to_pylist()] == ["completed"]
    curve = results_store.read_curve(str(tmp_path), cfg.run_id).to_pandas()
    assert curve.step.tolist() == [0, 4, 8, 12, 16]
    (moved,) = (run_dir / QUARANTINE).glob(f"{registered[-1]}.*")
    assert "mp_rank_00_model_states.pt" in json.loads((moved / NOTE_FILE).read_text())["reason"]
    assert not list(Path("/tmp").glob(f"looplaw-ckpt*-{killed['pid']}-*"))  # the killed worker's temp folder


# ---- a full store --------------------------------------------------------------------------------------------------
def _mount(folder: Path, size: str, remount: bool = False) -> str | None:
    """Mount (or resize) a tmpfs at `folder`; the reason it cannot, or None."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "needs root and mount(8) to make a tiny tmpfs"
    opts = f"remount,size={size}" if remount else f"size={size}"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


@pytest.mark.slow
def test_full_store_ends_in_one_line_and_the_rerun_resumes(tmp_path):
    from test_store_lock import spec_dict

    store = tmp_path / "store"
    store.mkdir()
    why = _mount(store, "600k")
    if why:
        pytest.skip(why)
    try:
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec_dict(store)))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        cmd = [sys.executable, str(ROOT / "tuning" / "sweep.py"), "--config", str(spec_path), "--num-cpus", "2",
               "--no-fit"]
        full = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert full.returncode == 74, full.stdout[-3000:] + full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: store {store}: ENOSPC"), full.stderr[-3000:]
        assert "rerun the same command" in errors[0]
        assert "Traceback" not in full.stdout + full.stderr and "EOFError" not in full.stdout + full.stderr
        assert "ERROR: store" in full.stdout  # the trial that met the full disk says so on its line
        assert not list((store / "runs").glob("*.parquet")) if (store / "runs").exists() else True

        assert _mount(store, "64m", remount=True) is None
        rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        rows = results_store.read_runs(str(store)).to_pylist()
        assert len(rows) == 1 and {r["status"] for r in rows} == {"completed"}
    finally:
        subprocess.run(["umount", "-l", str(store)], capture_output=True)


# ---- signals: the same in every stage -----------------------------------------------------------------------------
SIGNALS_SCRIPT = """
import os, signal, sys, time
if sys.argv[1] == "ignored":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job of a non-interactive shell starts
from tuning.interrupt import Interrupt, SweepInterrupted
with Interrupt() as it:
    if sys.argv[1] == "ignored":
        os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)
        print("tune stage: requested" if it.requested else "tune stage: ignored", flush=True)
    try:
        with it.immediate("fit not finished"):  # the fit and plots
            os.kill(os.getpid(), signal.SIGINT if sys.argv[1] == "default" else signal.SIGTERM); time.sleep(0.2)
            time.sleep(5)
        print("fit: not stopped", flush=True)
    except SweepInterrupted as exc:
        print(f"fit: stopped ({exc.progress}, exit {exc.exit_code})", flush=True)
print("after:", "SIG_IGN" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "handler", flush=True)
"""


@pytest.mark.parametrize("start", ["default", "ignored"])
def test_signals_stop_every_stage_alike(start):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SIGNALS_SCRIPT, start], capture_output=True, text=True, env=env,
                          timeout=120)
    out = proc.stdout
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    if start == "default":
        # SIGINT in the fit stops it at once, as in a Tune stage (test_sweep_interrupt) it stops the stage.
        assert "fit: stopped (fit not finished, exit 130)" in out
        assert "after: handler" in out
    else:
        # Ignored at start: ignored in the Tune stage and in the fit alike; SIGTERM stops the fit at once.
        assert "tune stage: ignored" in out and "fit: stopped (fit not finished, exit 143)" in out
        assert "after: SIG_IGN" in out and "SIGINT is ignored" in proc.stderr
