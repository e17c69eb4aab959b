"""One pretraining run on Ray Train + DeepSpeed, recorded in the results store.

    python -m training.run --config RUN.yaml [--storage DIR]

Runs on the Ray cluster in RAY_ADDRESS, else on a local Ray it starts (and stops) itself. The config is
validated, and a prepared data folder checked, before Ray starts.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from typing import Any, Iterable

import deepspeed
import ray
import ray.train
import torch
from ray.train import TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

from models.accounting import param_counts, training_compute
from models.injection import check_plugins
from training import results_store
from training.config import RunConfig
from training.loader import load_meta
from training.loop import train_loop
from training.prepare import ensure_default_data
from training.ray_session import ray_session
from training.storage import storage_root
from training.trainer import read_summary


def check_data(cfg: RunConfig, data_dir: str | None = None) -> dict | None:
    """Check a prepared folder against the model before any training starts; returns its meta (None for an
    unprepared default corpus, which is prepared to fit the model's vocabulary)."""
    if data_dir is None:
        if cfg.data == "default":
            return None
        data_dir = cfg.data
    try:
        meta = load_meta(data_dir)
    except (ValueError, OSError) as exc:
        raise ValueError(f"data: {data_dir!r} is not a prepared data folder ({exc}); "
                         "run `python -m training.prepare --input SRC --out DIR` or use data: default") from None
    if int(meta["vocab_size"]) > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's tokenizer "
                         f"({meta['vocab_size']} tokens); set model.vocab_size >= {meta['vocab_size']}")
    return meta


def resolve_data(cfg: RunConfig) -> str:
    """The prepared folder the workers read: the run's own, or the default corpus prepared (once) at the model's vocab."""
    if cfg.data != "default":
        check_data(cfg)
        return cfg.data
    path = ensure_default_data(vocab_size=cfg.model.vocab_size)  # cached under $LOOPLAW_DATA_ROOT
    check_data(cfg, path)
    return path


def build_trainer(cfg: RunConfig, callbacks: Iterable[Any] = (), name: str | None = None):
    """The TorchTrainer of one run. Its Ray Train folder is STORAGE/ray/<name or run_id>: fitting it again after an
    interruption resumes from its newest checkpoint."""
    data_dir = resolve_data(cfg)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config={"run": cfg.to_dict(), "data_dir": data_dir},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name or cfg.run_id,
            storage_path=f"{storage_root(cfg)}/ray",
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "deepspeed": deepspeed.__version__}


def make_row(cfg: RunConfig, summary: dict[str, Any] | None, *, status: str | None = None,
             wall_seconds: float = math.nan, started_at: dt.datetime | None = None,
             finished_at: dt.datetime | None = None, error: str | None = None) -> dict[str, Any]:
    """The results-store row of a run: config, accounting (models.accounting) and outcome."""
    m = cfg.model
    counts = param_counts(m)
    summary = summary or {}
    steps = int(summary.get("steps", 0))
    tokens = steps * cfg.batch_tokens
    nan = results_store.finite_or_nan
    return {
        "run_id": cfg.run_id, "sweep": cfg.sweep, "variant": cfg.variant, "name": cfg.name,
        "status": status or summary.get("status", "failed"),
        "d_model": m.d_model, "size": cfg.size, "n_prelude": m.n_prelude, "n_rec_layers": m.n_rec_layers,
        "n_coda": m.n_coda, "r": m.r, "bptt_k": m.backprop_recurrences, "injection": m.injection,
        "hc_lanes": m.hc_lanes, "n_heads": m.n_heads, "head_dim": m.head_dim, "seq_len": m.seq_len,
        "vocab_size": m.vocab_size, "effective_depth": m.effective_depth,
        "n_once": counts.n_once, "n_rec": counts.n_rec, "n_embed": counts.n_embed,
        "flops_per_token": cfg.flops_per_token, "tokens": tokens, "compute": training_compute(m, tokens),
        "budget_compute": cfg.compute,
        "val_loss": nan(summary.get("val_loss")), "val_bpb": nan(summary.get("val_bpb")),
        "train_loss": nan(summary.get("train_loss")), "steps": steps, "wall_seconds": float(wall_seconds),
        "tokens_per_second": nan(summary.get("tokens_per_second")), "mfu": nan(summary.get("mfu")),
        **{key: nan(summary.get(key)) for key in ("train_seconds", "setup_seconds", "eval_seconds",
                                                  "checkpoint_seconds")},
        "restarts": int(summary.get("restarts", 0)),
        "seed": cfg.seed, "lr": cfg.optim.lr, "batch_tokens": cfg.batch_tokens, "zero_stage": cfg.zero_stage,
        "num_workers": cfg.num_workers, "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "versions": json.dumps(versions(), sort_keys=True),
        "error": error or summary.get("reason"),
        "started_at": started_at, "finished_at": finished_at,
        "parent_run_id": summary.get("parent_run_id"),
        "compute_spent": training_compute(m, cfg.batch_tokens * int(summary.get("steps_trained", steps))),
        **loop_columns(summary.get("loop")),
    }


def loop_columns(loop: dict[str, Any] | None) -> dict[str, float | None]:
    """The row's loop-check fields from Trainer.loop_check (None for r = 1 and runs that did not finish)."""
    if not loop:
        return {"loss_r1": None, "e_rms": None, "state_rms": None, "state_change": None}
    changes, states = loop.get("state_change") or [], loop.get("state_rms") or []
    nan = results_store.finite_or_nan
    return {"loss_r1": nan(loop.get("loss_r1")), "e_rms": nan(loop.get("e_rms")),
            "state_rms": nan(states[-1]) if states else None,
            "state_change": nan(sum(changes) / len(changes)) if changes else None}


def _summary_from_checkpoint(checkpoint) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return read_summary(folder)


def execute(cfg: RunConfig, callbacks: Iterable[Any] = ()) -> dict[str, Any]:
    """Train `cfg` to its budget and record it: returns the results-store row.

    A run already in the store is returned as stored without training, unless it failed (a failure is the
    infrastructure's, not a result, so it is retried; the new row replaces the old one).
    """
    store = storage_root(cfg)
    stored = results_store.read_run(store, cfg.run_id)
    if stored is not None and stored["status"] != "failed":
        return stored
    error = None
    with ray_session():  # the caller's Ray (a sweep trial, main, a test), else a private one for this run
        started = dt.datetime.now(dt.timezone.utc)
        t0 = time.perf_counter()
        trainer = build_trainer(cfg, callbacks)
        try:
            result = trainer.fit()
            summary = result.return_value or _summary_from_checkpoint(result.checkpoint)
            if summary is None:
                error = "the training loop returned no summary"
        except TrainingFailedError as exc:
            summary, error = None, f"{type(exc).__name__}: {exc}"[:4000]
        wall = time.perf_counter() - t0
    row = make_row(cfg, summary, status="failed" if summary is None else None, wall_seconds=wall,
                   started_at=started, finished_at=dt.datetime.now(dt.timezone.utc), error=error)
    depths = (summary or {}).get("depths") or ()
    if depths:
        results_store.write_depths(store, cfg.run_id, [{**d, "trained_r": cfg.model.r} for d in depths])
    for branch_row in branch_rows(cfg, summary, started, wall):
        results_store.write_run(store, branch_row, ())
    results_store.write_run(store, row, (summary or {}).get("curve", ()))
    return row


def branch_rows(cfg: RunConfig, summary: dict[str, Any] | None, started: dt.datetime, wall: float) -> list[dict]:
    """The rows of a multi-horizon run's cooldown branches, each under the id of the run trained to its horizon
    alone. Written before the parent's row, so a stored parent implies its branches."""
    branches = (summary or {}).get("branches") or ()
    rows = []
    for branch in branches:
        branch_cfg = cfg.branch_at(branch["steps"])
        rows.append(make_row(branch_cfg, {**branch, "restarts": summary.get("restarts", 0),
                                          "parent_run_id": cfg.run_id, "steps_trained": branch["cooldown_steps"]},
                             wall_seconds=branch["seconds"], started_at=started,
                             finished_at=dt.datetime.now(dt.timezone.utc)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (see training/configs/tiny.yaml)")
    parser.add_argument("--storage", default=None, help="results store + Ray storage (local folder or URI)")
    args = parser.parse_args(argv)
    try:
        cfg = RunConfig.from_yaml(args.config)
        if args.storage:
            cfg = cfg.replace(storage=args.storage)
        check_data(cfg)
        check_plugins([cfg.model])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    with ray_session():
        print(f"run {cfg.run_id}: {cfg.steps} steps x {cfg.batch_tokens} tokens, "
              f"{cfg.num_workers} worker(s), ZeRO-{cfg.zero_stage}, storage {storage_root(cfg)}", flush=True)
        row = execute(cfg)
    print(f"run {row['run_id']}: {row['status']}  val_loss {row['val_loss']:.4f} nats  "
          f"val_bpb {row['val_bpb']:.4f}  steps {row['steps']}  tokens {row['tokens']}  "
          f"{row['tokens_per_second']:.0f} tok/s  mfu {row['mfu']:.3%}  wall {row['wall_seconds']:.1f}s", flush=True)
    if row.get("error"):
        print(f"  ({row['error']})", flush=True)
    print(f"row written to {storage_root(cfg)}/runs/{row['run_id']}.parquet", flush=True)
    depths = results_store.read_depths(storage_root(cfg), row["run_id"]).to_pylist()
    if depths:
        losses = "  ".join(f"r={d['eval_r']}: {d['val_loss']:.4f}" for d in depths)
        print(f"test-time depth val_loss {losses}  ({sum(d['seconds'] for d in depths):.1f} s of evaluation; "
              f"table in {storage_root(cfg)}/depths/)", flush=True)
    return 1 if row["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
