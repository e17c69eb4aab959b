"""Stopping a sweep from outside: Ctrl-C (SIGINT) or `ray job stop` (SIGTERM, then SIGKILL after the head's
RAY_JOB_STOP_WAIT_TIME_S, 3 s by default).

The first signal asks the running stage to stop: Tune's stopper (`InterruptStopper`, a public Tune Stopper) ends
the experiment, Tune stops its trials and saves its state, and the sweep raises `SweepInterrupted`, which the
driver turns into one line saying how far it got and exit code 128 + signal (130 for Ctrl-C). A second signal exits
at once. Either way a rerun of the same command resumes: stored runs are skipped, interrupted ones continue from
their checkpoints.

Tune's own SIGINT handler is turned off while ours is installed: it tells its caller nothing, advises
`Tuner.restore(...)` (not how a sweep resumes) and ignores SIGTERM.

One handler covers every stage (LR search, grid, seed noise, fit, plots): in the Tune stages the first signal is
recorded and Tune stops at its next step; in the stages without a Tune loop (`immediate()`: the fit, the plots) it
raises SweepInterrupted where the driver is, so they stop at once and their `finally` blocks clean up.

A sweep started with SIGINT ignored (a background job of a non-interactive shell, `nohup`): SIGINT stays ignored in
every stage, as POSIX asks of a background job (the terminal's Ctrl-C is not meant for it), and the driver says so
once at the start; SIGTERM (`kill PID`, `ray job stop`) stops it as above in every stage. Before this, such a sweep
caught SIGINT in the grid (our handler replaced the ignore) but ignored it in the fit and plots.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

from ray import tune

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SweepInterrupted(Exception):
    """The sweep stopped early on a signal; `progress` says how far it got."""

    def __init__(self, signum: int, progress: str):
        super().__init__(progress)
        self.signum = signum
        self.progress = progress

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interrupt:
    """While entered: the first SIGINT / SIGTERM is recorded (`requested`), the second exits at once."""

    def __init__(self, out=sys.stderr):
        self.out = out
        self.signum: int | None = None
        self.reason: str | None = None  # set by `request` (not a signal): why the sweep stops
        self.sigint_ignored = False  # SIGINT was ignored when the sweep started: it stays ignored
        self._previous: dict[int, Any] = {}
        self._tune_handler: str | None = None
        self._immediate: str | None = None  # inside `immediate()`: the progress a signal reports

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def raise_if_requested(self, progress: str) -> None:
        if self.signum is not None:
            raise SweepInterrupted(self.signum, progress)

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may handle signals; a sweep run from a thread is stopped by its caller
        self._tune_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # also when SIGINT is ignored: Tune's would un-ignore it
        self.sigint_ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        if self.sigint_ignored:
            print(f"SIGINT is ignored (the sweep was started with it ignored, e.g. in the background): Ctrl-C does "
                  f"not stop it; `kill {os.getpid()}` (SIGTERM) does, in every stage", file=self.out, flush=True)
        for sig in SIGNALS:
            if sig == signal.SIGINT and self.sigint_ignored:
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def reinstall(self) -> None:
        """Take the signals back after `ray.init`: connecting a driver installs Ray's native SIGTERM handler, which
        ends the process at once ("*** SIGTERM received ***") instead of letting the sweep stop and say how far it
        got (`ray job stop` sends SIGTERM)."""
        for sig in self._previous:
            signal.signal(sig, self._handle)

    def __exit__(self, *exc: Any) -> None:
        if not self._previous:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._tune_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._tune_handler

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            # No cleanup to wait for: the private Ray's guard reaps it, and a rerun re-queues what was cut short.
            print(f"{signal.Signals(signum).name} again: stopping now; rerun the same command to resume",
                  file=self.out, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        if self._immediate is not None:
            print(f"{signal.Signals(signum).name}: stopping the sweep now", file=self.out, flush=True)
            raise SweepInterrupted(signum, self._immediate)
        print(f"{signal.Signals(signum).name}: stopping the sweep after Ray Tune saves its state "
              "(send it again to stop at once)", file=self.out, flush=True)

    def request(self, reason: str) -> None:
        """Stop the sweep as SIGTERM would, from inside (e.g. its store lock was taken over); `reason` is printed.
        Safe from any thread: it only records (and the Tune stopper or the next check acts on it)."""
        if self.signum is None:
            self.reason = reason
            self.signum = signal.SIGTERM
            print(f"stopping the sweep: {reason}", file=self.out, flush=True)

    @contextlib.contextmanager
    def immediate(self, progress: str) -> Iterator[None]:
        """A stage without a Tune loop to stop it (the fit, the plots): a signal inside the block raises
        SweepInterrupted(progress) at once, and one recorded before it raises on entry."""
        self.raise_if_requested(progress)
        self._immediate = progress
        try:
            yield
        finally:
            self._immediate = None


class InterruptStopper(tune.Stopper):
    """Ends a Tune experiment once the interrupt is requested; `on_stop` runs first, once, in Tune's loop (where
    it is safe to touch the searcher's state, unlike in a signal handler)."""

    def __init__(self, interrupt: Interrupt, on_stop: Callable[[], None] | None = None):
        self.interrupt = interrupt
        self.on_stop = on_stop

    def __getstate__(self) -> dict:
        """Tune pickles its run config with the experiment; signal handlers do not pickle (nor need to)."""
        return {"interrupt": None, "on_stop": None}

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        if self.interrupt is None or not self.interrupt.requested:
            return False
        if self.on_stop is not None:
            on_stop, self.on_stop = self.on_stop, None
            on_stop()
        return True
