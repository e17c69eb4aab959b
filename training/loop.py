"""The per-worker entry point Ray Train runs: a Trainer (training.trainer) reporting to Ray Train.

Checkpoints: every rank saves its DeepSpeed shard (with the TrainState in client_state) into a folder it reports;
a restarted worker group resumes from the newest one that loads. A finished run's last report carries only its
summary.

A checkpoint is verified before it is trusted: every file of it read whole (training.trainer.verify_file), the
files shared out among the ranks and the verdicts gathered, so every rank picks the same one. Ray Train's newest
checkpoint first, then the run's older checkpoint folders, newest first; each unreadable one is set aside (its
files moved to the run's `_quarantine/` folder with a note saying why, an empty folder with that note left in its
place so Ray Train's own record of it stays valid) and named on the console (the first report after the resume
carries it as `checkpoint_note`, which tuning.progress prints). With none left the run starts again from step 0:
a bad checkpoint costs one restart, never the run.

Temporary checkpoint folders (`looplaw-ckpt<rank>-<pid>-*` in the system temp dir, removed after each report) are
left behind only by a killed worker; every worker start removes those whose process is gone.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from training.config import RunConfig
from training.trainer import BRANCH_PREFIX, Trainer, configure_cpu, read_summary, verify_file, write_summary

TEMP_PREFIX = "looplaw-ckpt"
QUARANTINE = "_quarantine"  # in the run's Ray Train folder, beside its checkpoint_* folders
NOTE_FILE = "QUARANTINED.json"  # left in a set-aside checkpoint's folder
LEGACY_TEMP_AGE = 3600.0  # seconds: a temp folder named without its pid (older code) is removed after this


def _owner_dead(pid: int, folder: Path) -> bool:
    """Is the process that made `folder` gone (no such pid, or the pid now names a process started after it)?"""
    try:
        import psutil

        proc = psutil.Process(pid)
        return proc.status() == psutil.STATUS_ZOMBIE or proc.create_time() > folder.stat().st_mtime + 1.0
    except ImportError:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    except Exception:  # psutil.NoSuchProcess, AccessDenied (then: not ours to judge, unless gone)
        import psutil

        return not psutil.pid_exists(pid)


def clean_stale_temp_checkpoints(temp_dir: str | None = None) -> list[str]:
    """Remove the temporary checkpoint folders of dead workers; returns what was removed."""
    removed = []
    pattern = re.compile(rf"^{TEMP_PREFIX}\d+-(\d+)-")
    for folder in Path(temp_dir or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        try:
            match = pattern.match(folder.name)
            if match:
                dead = int(match.group(1)) != os.getpid() and _owner_dead(int(match.group(1)), folder)
            else:  # named by older code, without its pid: only when nobody has touched it for long
                dead = time.time() - folder.stat().st_mtime > LEGACY_TEMP_AGE
            if dead and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(str(folder))
        except OSError:  # gone meanwhile
            continue
    # wsd branch snapshots (training.trainer.run_branch) of dead worker groups on this host
    host = socket.gethostname().replace("-", "_")
    branch = re.compile(rf"^{BRANCH_PREFIX}.+-(?P<host>[^-]+)-(?P<pid>\d+)$")
    for folder in Path(temp_dir or tempfile.gettempdir()).glob(f"{BRANCH_PREFIX}*"):
        match = branch.match(folder.name)
        try:
            if match and match["host"] == host and int(match["pid"]) != os.getpid() and \
                    _owner_dead(int(match["pid"]), folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(str(folder))
        except OSError:
            continue
    return removed


def _gather(obj: Any, world: int) -> list:
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any, world: int) -> Any:
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def checkpoint_candidates(checkpoint: Any) -> list[str]:
    """Ray Train's checkpoint, then the run's older checkpoint folders (by their time-stamped names), newest first.
    Newer folders than Ray's are not candidates: Ray never finished registering them."""
    import pyarrow.fs as pafs

    path = checkpoint.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    try:
        infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return [path]
    older = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [path] + [f"{parent}/{n}" for n in older]


def quarantine_checkpoint(fs: Any, path: str, reason: str) -> str:
    """Move a checkpoint's files to the run's _quarantine/ folder (never deleting them) and leave its folder in
    place, empty but for a note: Ray Train refuses a run whose record names a missing checkpoint folder."""
    import pyarrow.fs as pafs

    parent, name = path.rstrip("/").rsplit("/", 1)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest = f"{parent}/{QUARANTINE}/{name}.{stamp}"
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        target = f"{dest}/{info.path[len(path.rstrip('/')) + 1:]}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.move(info.path, target)
    note = json.dumps({"checkpoint": name, "reason": reason, "moved_to": dest}).encode()
    with fs.open_output_stream(f"{dest}/{NOTE_FILE}") as f:
        f.write(note)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.Directory:
            try:
                fs.delete_dir(info.path)
            except OSError:
                pass
    with fs.open_output_stream(f"{path.rstrip('/')}/{NOTE_FILE}") as f:
        f.write(note)
    return dest


def select_checkpoint(checkpoint: Any, rank: int, world: int) -> tuple[Any, list[str]]:
    """The newest checkpoint of the run that every rank can read whole (None: none is left), and one note per
    checkpoint set aside. Every rank calls it; they agree (the verdicts are gathered)."""
    from ray.train import Checkpoint

    fs = checkpoint.filesystem
    candidates = _broadcast(checkpoint_candidates(checkpoint) if rank == 0 else None, world)
    notes = []
    for path in candidates:
        if fs.get_file_info(f"{path}/{NOTE_FILE}").type.name == "File":
            continue  # set aside by an earlier start
        cand = Checkpoint(path=path, filesystem=fs)
        try:
            with cand.as_directory() as folder:
                files = Trainer.checkpoint_files(folder)
                mine = [verify_file(f) for i, f in enumerate(files) if i % world == rank]
                problem = "no DeepSpeed files in it" if not files else next((m for m in mine if m), None)
        except Exception as exc:  # the folder cannot even be listed or downloaded
            problem = f"unreadable folder ({type(exc).__name__}: {exc})"[:300]
        problems = [p for p in _gather(problem, world) if p]
        if not problems:
            return cand, notes
        reason = "; ".join(dict.fromkeys(problems))
        name = path.rsplit("/", 1)[1]
        if rank == 0:
            try:
                where = quarantine_checkpoint(fs, path, reason)
            except OSError as exc:
                where = f"(could not be moved: {exc})"
            notes.append(f"checkpoint {name} is unreadable ({reason}); moved to {where}")
        else:
            notes.append(f"checkpoint {name} is unreadable ({reason})")
    return None, notes


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. config = {"run": RunConfig.to_dict(), "data_dir": prepared folder}.

    Returns (rank 0) the run summary, curve included, which `training.run.execute` turns into the row.
    """
    import ray.train
    from ray.train import Checkpoint

    from training.monitor import Scalars
    from training.storage import storage_root

    cfg = RunConfig.from_dict(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    configure_cpu(max(1, int(cfg.cpus_per_worker)))
    device = torch.device("cpu")
    if cfg.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)

    clean_stale_temp_checkpoints()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            summary = read_summary(folder)
        if summary is not None:  # the group restarted after the run had finished: nothing left to do
            return summary

    t0 = time.perf_counter()
    scalars = Scalars(f"{storage_root(cfg)}/tensorboard/{cfg.run_id}" if rank == 0 else None)
    trainer = Trainer(cfg, config["data_dir"], rank, world, device, scalars, weights_store=storage_root(cfg))
    notes: list[str] = []
    if checkpoint is not None:
        checkpoint, notes = select_checkpoint(checkpoint, rank, world)
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                trainer.restore(folder)
            if notes:
                notes.append(f"resumed from {checkpoint.path.rstrip('/').rsplit('/', 1)[1]} at step "
                             f"{trainer.state.step}")
        else:
            notes.append("no readable checkpoint left: the run starts again from step 0")
        for note in notes:
            print(f"run {cfg.run_id}: {note}", flush=True)
    trainer.state.setup_seconds += time.perf_counter() - t0  # after the restore, which brings the earlier total
    pending_note = "; ".join(notes)

    def report(metrics: dict, with_checkpoint: bool, summary: dict | None) -> None:
        nonlocal pending_note
        if pending_note:  # the console hears of the checkpoints set aside (tuning.progress prints it)
            metrics, pending_note = {**metrics, "checkpoint_note": pending_note}, ""
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        folder = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{rank}-{os.getpid()}-")
        try:
            if summary is None:
                trainer.save(folder)
            elif rank == 0:
                write_summary(folder, summary)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    try:
        return trainer.fit(report)
    finally:
        scalars.close()
