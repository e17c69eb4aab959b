"""The per-worker training loop Ray Train runs: DeepSpeed ZeRO engine, evaluation, checkpoints, divergence guard.

Every rank runs the same sequence of collectives (steps, evals, reports), so every decision that ends or
branches the loop (divergence, eval points) is taken on values all-reduced across ranks.
"""
from __future__ import annotations

import base64
import json
import math
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from training.config import RunConfig
from training.depth_eval import evaluate, evaluate_depths
from training.optim import apply_lr, build_engine

SPIKE_WINDOW = 20  # steps in the running mean the spike guard compares against
SPIKE_MIN_HISTORY = 5  # no spike verdict before this many steps: early losses fall fast
DS_TAG = "ds"


def configure_cpu(threads: int) -> None:
    """Threads per worker (fractional Ray CPUs still need one), and denormals flushed to zero: tiny weights and
    Adam moments otherwise hit the slow denormal path, measured 1.5-3x slower steps on CPU."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def train_step(engine, batches, grad_accum: int, device: torch.device) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches; returns this rank's mean micro-batch loss (a tensor)."""
    total = torch.zeros((), device=device)
    for _ in range(grad_accum):
        x, y = next(batches)
        _, loss = engine(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += loss.detach().float()
    return total / grad_accum


def global_mean(value: torch.Tensor) -> float:
    """Mean over ranks (every rank gets the same float, so decisions on it agree)."""
    t = value.detach().float().clone().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(encoded: str) -> None:
    import numpy as np

    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).copy()))


class _Diverged(Exception):
    pass


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. config = {"run": RunConfig.to_dict(), "data_dir": prepared folder}.

    Returns (rank 0) the run summary, curve included, which `training.run.execute` turns into the row.
    """
    import ray.train
    from ray.train import Checkpoint

    from models import LoopedLM
    from training.loader import TokenLoader, bits_per_byte, load_meta, validation_batches
    from training.monitor import Scalars, device_peak_flops, mfu
    from training.run import storage_root

    cfg = RunConfig.from_dict(config["run"])
    data_dir = config["data_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = cfg.use_gpu
    threads = max(1, int(cfg.cpus_per_worker))
    configure_cpu(threads)
    if on_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    state: dict[str, Any] = {"step": 0, "curve": [], "losses": [], "restarts": 0, "train_seconds": 0.0,
                             "train_tokens_timed": 0, "val_loss": None, "val_bpb": None, "done": False,
                             "since_eval": []}
    checkpoint = ray.train.get_checkpoint()
    restore_dir = None
    if checkpoint is not None:
        restore_dir = tempfile.mkdtemp(prefix="looplaw-restore-")
        checkpoint.to_directory(restore_dir)
        with open(Path(restore_dir) / "state.json") as f:
            state = json.load(f)
        state["restarts"] += 1
        if state["done"]:  # the group restarted after the run had finished: nothing left to do
            shutil.rmtree(restore_dir, ignore_errors=True)
            return state["summary"]

    # Same seed on every rank: identical initial weights, and identical sampled r per step (ZeRO-3 needs every
    # rank to run the same modules in the same order).
    torch.manual_seed(cfg.seed)
    model = LoopedLM(cfg.model).to(device)
    engine = build_engine(model, cfg, on_gpu)
    loader = TokenLoader(data_dir, "train", cfg.model.seq_len, cfg.micro_batch, rank, world, seed=cfg.seed)
    val_batches = validation_batches(data_dir, cfg.model.seq_len, cfg.micro_batch,
                                     max_tokens=cfg.val_tokens, rank=rank, world_size=world)
    meta = load_meta(data_dir)
    if restore_dir is not None:
        engine.load_checkpoint(restore_dir, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        with open(Path(restore_dir) / f"loader_rank{rank}.json") as f:
            loader.load_state_dict(json.load(f))
        _set_rng_state(state["rng"])
        shutil.rmtree(restore_dir, ignore_errors=True)

    logdir = f"{storage_root(cfg)}/tensorboard/{cfg.run_id}" if rank == 0 else None
    scalars = Scalars(logdir)
    peak = device_peak_flops(on_gpu, threads)
    flops = cfg.flops_per_token
    total_steps = cfg.steps
    losses = deque(state["losses"], maxlen=SPIKE_WINDOW)
    since_eval: list[float] = state["since_eval"]  # train losses since the last eval (a curve point's mean)
    metrics: dict[str, Any] = {"lr": cfg.optim.lr * cfg.optim.lr_multiplier(state["step"], total_steps)}

    def report(done: bool, diverged: bool, with_checkpoint: bool) -> None:
        metrics.update(done=int(done), diverged=int(diverged))
        state["losses"] = list(losses)
        if not with_checkpoint:
            ray.train.report(dict(metrics))
            return
        tmp = tempfile.mkdtemp(prefix=f"looplaw-ckpt{rank}-")
        try:
            if not done:
                engine.save_checkpoint(tmp, tag=DS_TAG)
                with open(Path(tmp) / f"loader_rank{rank}.json", "w") as f:
                    json.dump(loader.state_dict(), f)
            if rank == 0:
                with open(Path(tmp) / "state.json", "w") as f:
                    json.dump({**state, "rng": _rng_state()}, f)
            ray.train.report(dict(metrics), checkpoint=Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def run_eval(step: int) -> None:
        val = evaluate(engine, val_batches, device)
        state["val_loss"], state["val_bpb"] = val, bits_per_byte(val, meta)
        train = sum(since_eval) / len(since_eval) if since_eval else math.nan
        since_eval.clear()  # in place: state["since_eval"] is the same list
        point = {"step": step, "tokens": step * cfg.batch_tokens, "train_loss": train, "val_loss": val,
                 "lr": metrics.get("lr", math.nan)}
        state["curve"].append(point)
        metrics.update(val_loss=val, val_bpb=state["val_bpb"])
        scalars.log(step, **{"val/loss": val, "val/bpb": state["val_bpb"]})

    if state["step"] == 0 and not state["curve"]:
        run_eval(0)  # the untrained loss anchors the curve

    diverged = False
    try:
        for step in range(state["step"], total_steps):
            multiplier = cfg.optim.lr_multiplier(step, total_steps)
            apply_lr(engine.optimizer, multiplier)
            t0 = time.perf_counter()
            local = train_step(engine, loader, cfg.grad_accum, device)
            loss = global_mean(local)
            grad_norm = _grad_norm(engine)
            if on_gpu:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["train_seconds"] += dt
            state["train_tokens_timed"] += cfg.batch_tokens
            tps = cfg.batch_tokens / dt
            metrics.update(step=step + 1, tokens=(step + 1) * cfg.batch_tokens, train_loss=loss,
                           lr=cfg.optim.lr * multiplier, grad_norm=math.nan if grad_norm is None else grad_norm,
                           tokens_per_second=tps, mfu=mfu(flops, tps, peak * world))
            metrics.setdefault("val_loss", math.nan)
            scalars.log(step + 1, **{"train/loss": loss, "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                                     "tokens_per_second": tps, "mfu": metrics["mfu"]})
            scalars.log_state_norms(step + 1, engine.module.last_state_norms)

            mean = sum(losses) / len(losses) if losses else math.nan
            if not math.isfinite(loss) or (len(losses) >= SPIKE_MIN_HISTORY and loss > cfg.spike_factor * mean):
                raise _Diverged(f"loss {loss:.4g} at step {step + 1} (running mean {mean:.4g})")
            if grad_norm is not None and not math.isfinite(grad_norm):
                # bf16/fp32 use no loss scaling, so a non-finite gradient is the model blowing up, not an overflow skip
                raise _Diverged(f"gradient norm {grad_norm} at step {step + 1} (loss {loss:.4g})")
            losses.append(loss)
            since_eval.append(loss)

            last = step + 1 == total_steps
            if (step + 1) % cfg.eval_every == 0 or last:
                run_eval(step + 1)
            if last:
                break
            if (step + 1) % cfg.checkpoint_every == 0:
                report(done=False, diverged=False, with_checkpoint=True)
            elif (step + 1) % cfg.eval_every == 0:
                report(done=False, diverged=False, with_checkpoint=False)
    except _Diverged as exc:
        diverged = True
        state["diverged_reason"] = str(exc)

    # Test-time depth (evaluation only): the finished model's held-out loss at each of cfg.depths.
    depths = [] if diverged else evaluate_depths(engine, val_batches, cfg.depths, device, meta)

    seconds = state["train_seconds"]
    tokens_per_second = state["train_tokens_timed"] / seconds if seconds > 0 else math.nan
    summary = {
        "status": "diverged" if diverged else "completed",
        "reason": state.get("diverged_reason"),
        "steps": state["step"],
        "tokens": state["step"] * cfg.batch_tokens,
        "train_loss": metrics.get("train_loss", math.nan),
        "val_loss": state["val_loss"] if not diverged else math.nan,
        "val_bpb": state["val_bpb"] if not diverged else math.nan,
        "tokens_per_second": tokens_per_second,
        "mfu": mfu(flops, tokens_per_second, peak * world),
        "restarts": state["restarts"],
        "train_seconds": seconds,
        "curve": state["curve"],
        "depths": depths,
    }
    state.update(done=True, summary=summary)
    report(done=True, diverged=diverged, with_checkpoint=True)
    scalars.close()
    return summary
