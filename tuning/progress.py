"""Console progress of a sweep stage: trials done / running / left and the best loss per r, then a summary.

Every run that did not end well says why on its console line: a failed run its row's error and where to look, a
trial error its cause (the store's OSError when the store failed, also where Ray Tune could only read back an empty
error file), a run resumed from an older checkpoint (or from scratch) which checkpoints it set aside and why.
"""
from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from typing import Any, Callable, TextIO

from ray.tune import Callback


def _fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


# Called (in the driver) with (store, OSError) when a trial's error is the store failing; the sweep driver sets it
# to stop the sweep with one line (tuning.sweep.run_sweep). Module state: Tune pickles its callbacks, not this.
store_error_hook: Callable[[str, OSError], None] | None = None

REASON_CHARS = 300  # of a failure's reason on its console line; the whole of it is in the row's `error`


def _one_line(text: str | None, limit: int = REASON_CHARS) -> str:
    """The most telling line of an error text: the last line naming an exception (Ray's traceback chains end with
    the cause), else the first line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return "no reason recorded"
    named = [line for line in lines if ("Error" in line or "Exception" in line) and not line.startswith("File ")]
    line = named[-1] if named else lines[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _store_errno(exc: OSError | None, store: str) -> bool:
    """Is this OSError the store's: a path under it, or (no path given, as pyarrow's) an errno of a failing disk?"""
    import errno

    if exc is None:
        return False
    if exc.filename:
        return str(exc.filename).startswith(store.rstrip("/"))
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ESTALE, errno.EACCES, errno.EPERM)


def trial_exception(trial: Any) -> tuple[BaseException | None, BaseException | None]:
    """(the trial's exception, the error met reading it back): Tune pickles it to the trial's folder, which on a
    full disk is an empty file (EOFError on reading)."""
    from ray import cloudpickle

    path = getattr(trial, "pickled_error_file", None)
    try:
        if path:
            with open(path, "rb") as f:
                return cloudpickle.load(f), None
        return trial.get_pickled_error(), None
    except FileNotFoundError:
        return None, None
    except Exception as exc:  # EOFError: Ran out of input, an unpickling error
        return None, exc


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
        if result.get("checkpoint_note"):  # training.loop: a resume set checkpoints aside
            print(f"  {self.stage}: {self._label(trial)}: {result['checkpoint_note']}", file=self.out, flush=True)
        self._note_loss(trial, result, final=bool(result.get("final")))
        if result.get("final"):
            self.status[trial.trial_id] = result.get("status", "completed")
        self._print()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        if trial.trial_id not in self.status:
            self.status[trial.trial_id] = self.stopped  # ended by the scheduler before its final result
        status = self.status[trial.trial_id]
        why = f": {self.failure(trial)}" if status == "failed" else ""
        print(f"  {self.stage}: {self._label(trial)} {status} val_loss {_fmt(self.latest.get(trial.trial_id))}{why}",
              file=self.out, flush=True)
        self._print(force=True)

    def failure(self, trial: Any) -> str:
        """A failed run's reason (its row's `error`) and where its row and Train logs are."""
        cell = self._cell(trial)
        run_id, store = cell.get("run_id"), (cell.get("run") or {}).get("storage")
        if not run_id or not store:
            return "no run id in the trial's config"
        try:
            from training import results_store

            row = results_store.read_run(store, run_id)
            reason = _one_line(row.get("error") if row else "no row stored")
        except Exception as exc:  # the store itself failing: that is the reason
            reason = f"the store could not be read ({type(exc).__name__}: {exc})"[:REASON_CHARS]
        root = store.rstrip("/")
        return (f"{reason} (row {root}/runs/{run_id}.parquet, its `error` in full; Train logs and checkpoints "
                f"{root}/ray/{run_id}/; rerun the sweep to retry it)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.status[trial.trial_id] = "error"
        print(f"  {self.stage}: {self._label(trial)} ERROR: {self.error_cause(trial)}", file=self.out, flush=True)
        self._print(force=True)

    def error_cause(self, trial: Any) -> str:
        """The trial error's cause in one line, and where its traceback is. An OSError (or an error file that
        reads back empty) is checked against the store: a failing store is reported to `store_error_hook`."""
        from training.store_errors import describe_os_error, os_error_in, probe_store

        exc, unreadable = trial_exception(trial)
        where = getattr(trial, "error_file", None) or getattr(trial, "path", None) or "the trial's folder"
        store = (self._cell(trial).get("run") or {}).get("storage")
        cause = os_error_in(exc)
        if store and (cause is not None or unreadable is not None):
            failing = probe_store(store) or (cause if _store_errno(cause, store) else None)
            if failing is not None:
                if store_error_hook is not None:
                    store_error_hook(store, failing)
                return f"store {store}: {describe_os_error(failing)} (traceback in {where})"
        if unreadable is not None:
            return (f"its error could not be read back ({type(unreadable).__name__}: {unreadable}); "
                    f"see {where}")
        text = _one_line(str(exc)) if exc is not None else "no error recorded"
        return f"{text} (traceback in {where})"

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
