"""Console progress of a sweep stage: trials done / running / left and the best loss per r, then a summary."""
from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from typing import Any, TextIO

from ray.tune import Callback


def _fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


class Progress(Callback):
    """Prints one line when a trial starts or ends and at most every `every` seconds on results.

    `total` counts the cells of the stage, `skipped` those already in the results store (not launched).
    Each trial's config carries `r` and `label` (see tuning.sweep), its results `val_loss` / `train_loss`.
    """

    def __init__(self, stage: str, total: int, skipped: int = 0, every: float = 30.0, out: TextIO | None = None,
                 stopped: str = "stopped"):
        self.stage, self.total, self.skipped, self.every = stage, total, skipped, every
        self.stopped = stopped  # what a trial ended by the scheduler is called (the LR stage: pruned)
        self._out = out
        self.running: set[str] = set()
        self.status: dict[str, str] = {}  # trial id -> completed | diverged | failed | pruned | error
        self.best: dict[int, float] = {}
        self.latest: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self._last_print = 0.0

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks with the experiment; a console stream does not pickle (nor need to)."""
        return {**self.__dict__, "_out": None}

    @staticmethod
    def _cell(trial: Any) -> dict:
        config = trial.config or {}
        return config.get("cell", config)

    def _r(self, trial: Any) -> int | None:
        return self._cell(trial).get("r")

    def _label(self, trial: Any) -> str:
        label = self._cell(trial).get("label", trial.trial_id)
        lr = (trial.config or {}).get("lr")
        return f"{label} lr={lr:.4g}" if isinstance(lr, float) else label

    def _note_loss(self, trial: Any, result: dict, final: bool) -> None:
        loss = result.get("val_loss")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            return
        self.latest[trial.trial_id] = loss
        r = self._r(trial)
        if final and r is not None and result.get("status", "completed") == "completed":
            self.best[r] = min(self.best.get(r, math.inf), loss)

    def line(self) -> str:
        done = self.skipped + len(self.status)
        left = max(0, self.total - done - len(self.running))
        best = " ".join(f"r={r}:{_fmt(v)}" for r, v in sorted(self.best.items())) or "-"
        return (f"[{self.stage} {time.perf_counter() - self.t0:6.0f}s] done {done}/{self.total} "
                f"(skipped {self.skipped}), running {len(self.running)}, left {left} | best val_loss {best}")

    def _print(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last_print >= self.every:
            self._last_print = now
            print(self.line(), file=self.out, flush=True)

    # ---- Tune callback hooks ------------------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._print(force=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._note_loss(trial, result, final=bool(result.get("final")))
        if result.get("final"):
            self.status[trial.trial_id] = result.get("status", "completed")
        self._print()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        if trial.trial_id not in self.status:
            self.status[trial.trial_id] = self.stopped  # ended by the scheduler before its final result
        print(f"  {self.stage}: {self._label(trial)} {self.status[trial.trial_id]} "
              f"val_loss {_fmt(self.latest.get(trial.trial_id))}", file=self.out, flush=True)
        self._print(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.status[trial.trial_id] = "error"
        print(f"  {self.stage}: {self._label(trial)} ERROR (see the trial's log)", file=self.out, flush=True)
        self._print(force=True)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for s in self.status.values():
            out[s] += 1
        return dict(out)

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items())) or "none launched"
        best = " ".join(f"r={r}:{_fmt(v)}" for r, v in sorted(self.best.items())) or "-"
        return (f"{self.stage}: {self.total} cells, {self.skipped} already stored, launched: {counts}; "
                f"best val_loss {best}; {time.perf_counter() - self.t0:.0f}s")
