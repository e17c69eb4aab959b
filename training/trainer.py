"""The training step and loop of one run on one worker: a small Trainer around a DeepSpeed engine.

Every rank runs the same sequence of collectives (steps, metric flushes, evals, checkpoints), so every decision
that ends or branches the loop (divergence, eval points) is taken on values all-reduced across ranks.

GPU-grade step: bf16 (DeepSpeed's engine), torch.compile (whole model at fixed r, per block when r is sampled so
no r recompiles), the next batch packed on a thread and copied from pinned memory, the loss without full fp32
logits (models.loss), and nothing brought to the host except every `log_every` steps.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import shutil
import socket
import tempfile
import time
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from models import LoopedLM
from training.config import RunConfig
from training.depth_eval import evaluate, evaluate_depths
from training.loader import TokenLoader, bits_per_byte, load_data_tokenizer, load_meta, validation_batches
from training.monitor import device_peak_flops, mfu
from training.optim import apply_lr, build_engine
from training.prefetch import BatchPrefetcher
from training.weights import write_weights

SPIKE_WINDOW = 20  # logged windows in the running mean the spike guard compares against
SPIKE_MIN_HISTORY = 5  # no spike verdict before this many windows: early losses fall fast
DS_TAG = "ds"
SUMMARY_FILE = "summary.json"  # a finished run's final checkpoint holds only its summary


def configure_cpu(threads: int) -> None:
    """Threads per worker (fractional Ray CPUs still need one), and denormals flushed to zero: tiny weights and
    Adam moments otherwise hit the slow denormal path, measured 1.5-3x slower steps on CPU."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def compile_model(model: torch.nn.Module, sampled_r: bool) -> None:
    """Compile in place (state-dict keys unchanged): the whole forward when r is fixed; each block when r is
    sampled, as the study's `compile_blocks`, so a new r reuses the compiled blocks instead of recompiling.

    The model's `forward` is compiled rather than the module call, so the engine's forward hooks (DeepSpeed's
    prologue) stay outside the graph."""
    if sampled_r:
        for block in (*model.prelude, *model.rec_block, *model.coda):
            block.compile(fullgraph=True)
    else:
        model.forward = torch.compile(model.forward, fullgraph=True)


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs; saved in DeepSpeed's client_state."""

    step: int = 0
    curve: list = field(default_factory=list)  # one point per eval: step, tokens, train/val loss, lr
    window_losses: list = field(default_factory=list)  # recent logged train losses (spike guard)
    since_eval: list = field(default_factory=list)  # logged train losses since the last eval
    restarts: int = 0
    train_seconds: float = 0.0  # optimizer steps, cooldown branches' included (the compile window excluded)
    train_tokens_timed: int = 0
    # Where the rest of the worker's time goes (rank 0's clock; summed over restarts): building model, engine and
    # loader (and restoring), evaluation (periodic, branch, depth), checkpoint saves (branch snapshots included).
    setup_seconds: float = 0.0
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    val_loss: float | None = None
    val_bpb: float | None = None
    rng: str = ""  # torch CPU generator state (r sampling), base64
    loaders: list = field(default_factory=list)  # every rank's loader position, by rank
    branches: list = field(default_factory=list)  # finished wsd cooldown branches: steps, losses, compute spent

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# TrainState fields that describe the run's history, not its position: a branch's rewind leaves them alone.
_ACCOUNTING = ("restarts", "train_seconds", "train_tokens_timed", "setup_seconds", "eval_seconds", "checkpoint_seconds")


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(encoded: str) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).copy()))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (every rank gets the same values, so decisions on them agree)."""
    if _distributed():
        dist.all_reduce(t)
    return t


class Diverged(Exception):
    pass


class Trainer:
    """Builds the model, engine, loader and validation batches of `cfg` for this rank; `fit` trains to the budget.

    `report(metrics, checkpoint_dir_or_None, done)` hands metrics (and a checkpoint folder) to whoever runs the loop
    (Ray Train in training.loop; nothing in the bench). With `weights_store`, the final weights of the run and of each
    cooldown branch go to that results store (training.weights) for downstream evaluation.
    """

    def __init__(self, cfg: RunConfig, data_dir: str, rank: int = 0, world: int = 1,
                 device: torch.device | None = None, scalars: Any = None, weights_store: str | None = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.weights_store = weights_store
        # The tokenizer travels with the weights, so a store is evaluable without the prepared data folder.
        self.tokenizer_json = load_data_tokenizer(data_dir).to_str() if weights_store and rank == 0 else None
        self.device = device or torch.device("cpu")
        self.on_gpu = self.device.type == "cuda"
        self.scalars = scalars
        # Same seed on every rank: identical initial weights, and identical sampled r per step (ZeRO-3 needs every
        # rank to run the same modules in the same order).
        torch.manual_seed(cfg.seed)
        model = LoopedLM(cfg.model).to(self.device)
        model.track_state_norms = False  # read at eval time instead: per-step norms would sync the host
        # ZeRO-3 gathers parameters in hooks around every submodule, which must stay outside a compiled graph.
        self.compiled = cfg.compile_enabled(self.on_gpu) and cfg.zero_stage < 3
        if self.compiled:
            compile_model(model, sampled_r=cfg.model.sample_r_mean is not None)
        self.engine = build_engine(model, cfg, self.on_gpu)
        if cfg.zero_stage == 3:
            # ZeRO-3 gathers a module's parameters around its own forward. The lean loss reads lm_head.weight outside
            # lm_head's, and an injection's contract methods are not its forward (models.injection): both are
            # gathered for the model's forward instead.
            for p in (model.lm_head.weight, *model.injection.parameters()):
                deepspeed.zero.register_external_parameter(model, p)
        self.loader = TokenLoader(data_dir, "train", cfg.model.seq_len, cfg.micro_batch, rank, world, seed=cfg.seed)
        self.batches = None  # the prefetcher, started once the loader position is final (after a restore)
        self.val_batches = validation_batches(data_dir, cfg.model.seq_len, cfg.micro_batch,
                                              max_tokens=cfg.val_tokens, rank=rank, world_size=world)
        self.meta = load_meta(data_dir)
        self.peak = device_peak_flops(self.on_gpu, max(1, int(cfg.cpus_per_worker)))
        self.state = TrainState()

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """DeepSpeed shards of this rank plus the TrainState (with every rank's loader position) as client_state."""
        loader_state = self.batches.state_dict() if self.batches is not None else self.loader.state_dict()
        loaders = [None] * self.world
        if _distributed():
            dist.all_gather_object(loaders, loader_state)
        else:
            loaders = [loader_state]
        self.state.loaders, self.state.rng = loaders, _rng_state()
        self.engine.save_checkpoint(folder, tag=DS_TAG, client_state={"train_state": self.state.to_dict()})

    @staticmethod
    def checkpoint_files(folder: str) -> list[Path]:
        """The DeepSpeed files of a checkpoint folder (sorted), the ones `restore` reads."""
        tag = Path(folder) / DS_TAG
        return sorted(p for p in tag.iterdir() if p.is_file()) if tag.is_dir() else []

    def restore(self, folder: str) -> None:
        _, client = self.engine.load_checkpoint(folder, tag=DS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        loaded = TrainState.from_dict(client["train_state"])
        vars(self.state).update(vars(loaded))  # in place: the running loop holds this object
        self.state.restarts += 1
        self.loader.load_state_dict(self.state.loaders[self.rank])
        _set_rng_state(self.state.rng)

    def save_weights(self, run_id: str, step: int) -> None:
        """The model's weights as they are now, as `run_id`'s final weights (nothing without a weights store). Every
        rank joins the gather (ZeRO-3 partitions the parameters; for other stages it gathers nothing); rank 0
        writes."""
        if self.weights_store is None:
            return
        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if self.rank == 0:
                write_weights(self.weights_store, run_id, module.state_dict(), self.cfg.model, self.tokenizer_json,
                              step)

    # ---- one step --------------------------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimizer step over the accumulation micro-batches; this rank's mean loss as a device tensor (no
        host sync)."""
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.grad_accum):
            x, y = next(self.batches)
            _, loss = self.engine(x, y)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            total += loss.detach().float()
        return total / self.cfg.grad_accum

    def start_batches(self) -> None:
        if self.batches is None:
            self.batches = BatchPrefetcher(self.loader, self.device)

    def evaluate(self) -> float:
        """Mean held-out loss (nats/token) over every rank's batches; every rank runs the same number of forwards."""
        return evaluate(self.engine, self.val_batches, self.device)

    def evaluate_depths(self) -> list[dict[str, Any]]:
        """Held-out loss at each of the run's test-time depths (cfg.depths), eagerly: a whole-forward graph is
        specialised to the trained r and would recompile for every other one."""
        module = self.engine.module
        module.__dict__.pop("forward", None)  # drop the compiled forward; compiled blocks serve any r
        return evaluate_depths(self.engine, self.val_batches, self.cfg.depths, self.device, self.meta)

    @torch.no_grad()
    def loop_stats(self) -> dict[str, Any]:
        """e's RMS, the state's RMS after each recurrence and its relative change, on one validation batch (eager:
        the compiled graph does not collect them)."""
        module = self.engine.module
        module.track_state_norms, training = True, module.training
        module.eval()
        x, y = self.val_batches[0]
        # Uncompiled: the class's forward when the compiled one is installed (no ZeRO-3 then), else the module call,
        # whose hooks let ZeRO-3 gather the parameters.
        forward = (lambda *a: type(module).forward(module, *a)) if self.compiled else module
        forward(x.to(self.device), y.to(self.device))
        module.track_state_norms = False
        module.train(training)
        return module.last_loop_stats

    def loop_check(self, depths: list[dict[str, Any]] = ()) -> dict[str, Any]:
        """Does the trained loop do anything: held-out loss at one recurrence (from the depth table when it has it)
        beside the loop's statistics (e's RMS, the state's RMS and change per recurrence)."""
        at_one = [d["val_loss"] for d in depths if d["eval_r"] == 1]
        loss_r1 = at_one[0] if at_one else evaluate(self.engine, self.val_batches, self.device, r=1)
        return {"loss_r1": loss_r1, **self.loop_stats()}

    # ---- multi-horizon (wsd cooldown branches) --------------------------------------------------------------
    def _branches_starting_at(self, step: int) -> list[int]:
        done = {b["steps"] for b in self.state.branches}
        return [h for h in self.cfg.horizon_steps[:-1]
                if h not in done and self.cfg.optim.cooldown_start(h) == step]

    def run_branch(self, horizon: int) -> dict[str, Any]:
        """Cool down from the current stable-phase state to `horizon` steps, evaluate, then put weights, optimizer,
        data position and RNG back as they were, so the main run goes on exactly as if no branch had run."""
        cfg, start = self.cfg, self.state.step
        # Same on a node's ranks (rank 0's host and pid, broadcast), unique to this worker group: two groups training
        # the same run on one node never share it; training.loop removes those of dead groups.
        snapshot = Path(tempfile.gettempdir()) / f"{BRANCH_PREFIX}{cfg.run_id}-{horizon}-{branch_owner()}"
        t0 = time.perf_counter()
        self.save(str(snapshot))
        t1 = time.perf_counter()
        total = torch.zeros(2, device=self.device)
        for step in range(start, horizon):
            apply_lr(self.engine.optimizer, cfg.optim.lr_multiplier(step, horizon))
            total[0] += self.train_step()
            total[1] += 1
        train_loss = float(global_sum(total)[0]) / (self.world * (horizon - start))
        t2 = time.perf_counter()
        val = self.evaluate() if math.isfinite(train_loss) else math.nan
        loop = self.loop_check() if math.isfinite(val) and cfg.model.r > 1 else None
        t3 = time.perf_counter()
        if math.isfinite(val):  # the branch's row is a model of its own: its weights are these
            self.save_weights(cfg.branch_at(horizon).run_id, horizon)
        t4 = time.perf_counter()
        self.state.checkpoint_seconds += (t1 - t0) + (t4 - t3)
        self.state.train_seconds += t2 - t1
        self.state.train_tokens_timed += (horizon - start) * cfg.batch_tokens
        self.state.eval_seconds += t3 - t2
        result = {"steps": horizon, "tokens": horizon * cfg.batch_tokens, "cooldown_steps": horizon - start,
                  "train_loss": train_loss, "val_loss": val,
                  "val_bpb": bits_per_byte(val, self.meta) if math.isfinite(val) else math.nan,
                  "status": "completed" if math.isfinite(val) else "diverged", "loop": loop,
                  "seconds": t4 - t0, "train_seconds": t2 - t1, "eval_seconds": t3 - t2,
                  "checkpoint_seconds": (t1 - t0) + (t4 - t3)}
        self.batches.close()
        self.batches = None
        kept = {name: getattr(self.state, name) for name in _ACCOUNTING}
        t1 = time.perf_counter()
        self.restore(str(snapshot))
        vars(self.state).update(kept)  # the snapshot rewinds the run, not the clocks or the restart count
        self.state.checkpoint_seconds += time.perf_counter() - t1
        self.start_batches()
        if _distributed():
            dist.barrier()  # every rank has read the snapshot
        if self.rank == 0:
            shutil.rmtree(snapshot, ignore_errors=True)
        return result

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self, report: Callable[[dict, bool, dict | None], None]) -> dict[str, Any]:
        """Train from `self.state` to the budget and return the run summary.

        `report(metrics, checkpoint, summary)` is called at every eval (checkpoint False), every `checkpoint_every`
        steps (checkpoint True: the caller saves with `self.save`) and once at the end with the summary."""
        cfg, state = self.cfg, self.state
        total_steps, world = cfg.steps, self.world
        flops = cfg.flops_per_token
        losses = deque(state.window_losses, maxlen=SPIKE_WINDOW)
        metrics: dict[str, Any] = {"lr": cfg.optim.lr * cfg.optim.lr_multiplier(state.step, total_steps),
                                   "val_loss": math.nan, "done": 0, "diverged": 0}
        self.start_batches()

        def log(name_values: dict) -> None:
            if self.scalars is not None:
                self.scalars.log(state.step, **name_values)

        def run_eval() -> None:
            t0 = time.perf_counter()
            val = self.evaluate()
            state.val_loss, state.val_bpb = val, bits_per_byte(val, self.meta)
            train = sum(state.since_eval) / len(state.since_eval) if state.since_eval else math.nan
            state.since_eval.clear()
            state.curve.append({"step": state.step, "tokens": state.step * cfg.batch_tokens, "train_loss": train,
                                "val_loss": val, "lr": metrics["lr"]})
            metrics.update(val_loss=val, val_bpb=state.val_bpb)
            log({"val/loss": val, "val/bpb": state.val_bpb})
            if self.scalars is not None and cfg.model.r > 1:
                self.scalars.log_loop_stats(state.step, self.loop_stats())
            state.eval_seconds += time.perf_counter() - t0

        if state.step == 0 and not state.curve:
            run_eval()  # the untrained loss anchors the curve

        pending = torch.zeros(2, device=self.device)  # (sum of step losses, steps) since the last flush
        window_start = time.perf_counter()
        # The first window after a start holds torch.compile's compilation: not a step time. Kept aside in case it
        # is the only window.
        skip_first = self.compiled
        first_window: tuple[float, int] | None = None

        def flush() -> float:
            """Bring the window's mean loss to the host (the one sync point), time the window, guard divergence."""
            nonlocal pending, window_start, first_window
            steps_in_window = int(pending[1].item())  # host sync
            loss = float(global_sum(pending.clone())[0]) / (world * steps_in_window)
            elapsed = time.perf_counter() - window_start
            raw_norm = self.engine.get_global_grad_norm()
            grad_norm = math.nan if raw_norm is None else float(raw_norm)
            if skip_first and first_window is None:
                first_window = (elapsed, steps_in_window * cfg.batch_tokens)
            else:
                state.train_seconds += elapsed
                state.train_tokens_timed += steps_in_window * cfg.batch_tokens
            tps = steps_in_window * cfg.batch_tokens / elapsed
            metrics.update(step=state.step, tokens=state.step * cfg.batch_tokens, train_loss=loss,
                           grad_norm=grad_norm, tokens_per_second=tps, mfu=mfu(flops, tps, self.peak * world))
            log({"train/loss": loss, "lr": metrics["lr"], "grad_norm": grad_norm, "tokens_per_second": tps,
                 "mfu": metrics["mfu"]})
            mean = sum(losses) / len(losses) if losses else math.nan
            if not math.isfinite(loss) or (len(losses) >= SPIKE_MIN_HISTORY and loss > cfg.spike_factor * mean):
                raise Diverged(f"loss {loss:.4g} at step {state.step} (running mean {mean:.4g})")
            if raw_norm is not None and not math.isfinite(grad_norm):
                # bf16/fp32 use no loss scaling, so a non-finite gradient is the model blowing up, not an overflow skip
                raise Diverged(f"gradient norm {grad_norm} at step {state.step} (loss {loss:.4g})")
            losses.append(loss)
            state.since_eval.append(loss)
            state.window_losses = list(losses)
            pending = torch.zeros(2, device=self.device)
            return loss

        diverged_reason = None
        try:
            for step in range(state.step, total_steps):
                for horizon in self._branches_starting_at(step):
                    branch = self.run_branch(horizon)  # restores self.state in place: append afterwards
                    state.branches.append(branch)
                    window_start = time.perf_counter()
                multiplier = cfg.optim.lr_multiplier(step, total_steps)
                apply_lr(self.engine.optimizer, multiplier)
                metrics["lr"] = cfg.optim.lr * multiplier
                pending[0] += self.train_step()
                pending[1] += 1
                state.step = step + 1
                last = state.step == total_steps
                do_eval = state.step % cfg.eval_every == 0 or last
                do_checkpoint = not last and state.step % cfg.checkpoint_every == 0
                if do_eval or do_checkpoint or state.step % cfg.log_every == 0:
                    flush()
                    if do_eval:
                        run_eval()
                    if do_eval or do_checkpoint:
                        t0 = time.perf_counter()
                        report(dict(metrics), do_checkpoint, None)
                        if do_checkpoint:
                            state.checkpoint_seconds += time.perf_counter() - t0
                    window_start = time.perf_counter()  # eval and checkpoint time is not training time
        except Diverged as exc:
            diverged_reason = str(exc)
        finally:
            self.batches.close()

        diverged = diverged_reason is not None
        # Test-time depth (evaluation only): the finished model's held-out loss at each of cfg.depths.
        t0 = time.perf_counter()
        depths = [] if diverged else self.evaluate_depths()
        loop = None if diverged or cfg.model.r == 1 else self.loop_check(depths)
        state.eval_seconds += time.perf_counter() - t0
        if not diverged:
            t0 = time.perf_counter()
            self.save_weights(cfg.run_id, state.step)
            state.checkpoint_seconds += time.perf_counter() - t0
        if state.train_seconds == 0 and first_window is not None:
            state.train_seconds, state.train_tokens_timed = first_window
        seconds = state.train_seconds
        tokens_per_second = state.train_tokens_timed / seconds if seconds > 0 else math.nan
        summary = {
            "status": "diverged" if diverged else "completed",
            "reason": diverged_reason,
            "steps": state.step,
            "tokens": state.step * cfg.batch_tokens,
            "train_loss": metrics.get("train_loss", math.nan),
            "val_loss": math.nan if diverged else state.val_loss,
            "val_bpb": math.nan if diverged else state.val_bpb,
            "tokens_per_second": tokens_per_second,
            "mfu": mfu(flops, tokens_per_second, self.peak * world),
            "restarts": state.restarts,
            "train_seconds": seconds,
            "setup_seconds": state.setup_seconds,
            "eval_seconds": state.eval_seconds,
            "checkpoint_seconds": state.checkpoint_seconds,
            "curve": state.curve,
            "depths": depths,
            "loop": loop,
            "branches": state.branches,
            "steps_trained": state.step + sum(b["cooldown_steps"] for b in state.branches),
        }
        metrics.update(done=1, diverged=int(diverged))
        report(dict(metrics), True, summary)
        return summary


BRANCH_PREFIX = "looplaw-branch-"
_BRANCH_OWNER: str | None = None


def branch_owner() -> str:
    """`<host>-<pid>` of rank 0, the same on every rank (a collective the first time: every rank calls it at the
    same step)."""
    global _BRANCH_OWNER
    if _BRANCH_OWNER is None:
        owner = [f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"]
        if _distributed():
            dist.broadcast_object_list(owner, src=0)
        _BRANCH_OWNER = owner[0]
    return _BRANCH_OWNER


def verify_file(path: Path) -> str | None:
    """Why a checkpoint file cannot be loaded (truncated, corrupted), or None when it reads whole. torch.save's
    files are zip archives: every member is read and its CRC checked, nothing unpickled (cheap in memory)."""
    try:
        if path.stat().st_size == 0:
            return f"{path.name}: empty file"
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            return None if bad is None else f"{path.name}: member {bad} fails its CRC check"
        if path.suffix == ".pt":  # a legacy (non-zip) torch file: load it to know
            torch.load(path, map_location="cpu", weights_only=False)
        return None
    except Exception as exc:  # BadZipFile, OSError, EOFError, an unpickling error
        return f"{path.name}: {type(exc).__name__}: {exc}"[:300]


def write_summary(folder: str, summary: dict[str, Any]) -> None:
    with open(Path(folder) / SUMMARY_FILE, "w") as f:
        json.dump(summary, f)


def read_summary(folder: str) -> dict[str, Any] | None:
    path = Path(folder) / SUMMARY_FILE
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)
