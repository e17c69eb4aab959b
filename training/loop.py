"""The per-worker entry point Ray Train runs: a Trainer (training.trainer) reporting to Ray Train.

Checkpoints: every rank saves its DeepSpeed shard (with the TrainState in client_state) into a folder it reports;
a restarted worker group resumes from the newest one. A finished run's last report carries only its summary.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

import torch

from training.config import RunConfig
from training.trainer import Trainer, configure_cpu, read_summary, write_summary


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

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            summary = read_summary(folder)
        if summary is not None:  # the group restarted after the run had finished: nothing left to do
            return summary

    t0 = time.perf_counter()
    scalars = Scalars(f"{storage_root(cfg)}/tensorboard/{cfg.run_id}" if rank == 0 else None)
    trainer = Trainer(cfg, config["data_dir"], rank, world, device, scalars)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.restore(folder)
    trainer.state.setup_seconds += time.perf_counter() - t0  # after the restore, which brings the earlier total

    def report(metrics: dict, with_checkpoint: bool, summary: dict | None) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        folder = tempfile.mkdtemp(prefix=f"looplaw-ckpt{rank}-")
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
