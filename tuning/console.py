"""What a person reads while a sweep runs: the sweep's own lines (stage headers, progress, the report), real errors,
and the workers' output when asked for (`--worker-logs`). Ray's and Ray Tune's own messages go to a log file under
the store, STORE/logs/sweep-<UTC time>.log, whose path the sweep prints once.

Routed, with public switches only:
- the "ray" loggers (Ray configures them with a stderr handler when `ray` is imported): "Started a local Ray
  instance", the token-authentication notice, Tune's and Train's info and warnings. The console keeps their errors,
  except those the sweep reports itself in one line (a trial's error with its cause: tuning.progress; a failing
  store: training.store_errors), whose tracebacks go to the file only;
- Tune's own output: `RunConfig(verbose=0)` silences the legacy output engine, but Ray 2.60's new engine prints its
  "Configuration for experiment" table, "View detailed results here" and a final "Trial status" table at any
  verbosity (ray/tune/experimental/output.py), so the sweep sets RAY_AIR_NEW_OUTPUT=0 while it runs;
- lines Ray's driver prints itself rather than logs (ray._private.worker.print_to_stdstream, for messages the raylet
  pushes to every driver), matched by ROUTED_LINES: the raylet's "N PYTHON worker processes have been started ...
  4x the maximum expected startup concurrency", which fractional CPU requests (trial_cpus 0.1) set off on every
  small machine and which says nothing about the sweep (ray-project/ray#3644). Every other line passes.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator, TextIO

import ray  # noqa: F401  (Ray sets up its "ray" logger on import; routed() replaces that set-up, so it comes first)

from training.storage import filesystem, is_uri

LOG_FOLDER = "logs"
ENV = {"RAY_AIR_NEW_OUTPUT": "0"}  # Tune's legacy output engine, which verbose=0 silences (see above)
ROUTED_LINES = (
    re.compile(r"^\(raylet[^)]*\) WARNING: \d+ \w+ worker processes have been started .*startup concurrency"),
)
# Loggers whose errors the sweep reports in one line of its own; their tracebacks go to the log file only.
REPORTED_BY_SWEEP = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state",
                     "ray.train._internal.syncer")
RAY_PACKAGE = os.path.dirname(ray.__file__) + os.sep
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_name(now: dt.datetime | None = None) -> str:
    return f"sweep-{(now or dt.datetime.now(dt.timezone.utc)).strftime('%Y%m%d-%H%M%S')}.log"


class _LogFile(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        """A full or lost store ends the sweep in one line of its own (training.store_errors), not in a traceback
        per message that could not be written here."""


class _NotReportedBySweep(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name == n or record.name.startswith(n + ".") for n in REPORTED_BY_SWEEP)


class _LineRouter:
    """Stands in for sys.stdout / sys.stderr: whole lines matching ROUTED_LINES go to `log`, the rest to `stream`.
    Text is held only until its line ends (or a flush), so nothing else is delayed. Everything else (fileno, isatty,
    encoding, buffer, ...) is the real stream's."""

    def __init__(self, stream: TextIO, log: logging.Logger):
        self._stream, self._log = stream, log
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            while "\n" in self._pending:
                line, self._pending = self._pending.split("\n", 1)
                self._route(line + "\n")
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def _route(self, text: str) -> None:
        plain = _ANSI.sub("", text).rstrip("\n")
        if any(p.search(plain) for p in ROUTED_LINES):
            self._log.info(plain)
        else:
            self._stream.write(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._route(self._pending)
                self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def routed(store: str, out: TextIO = sys.stdout) -> Iterator[str]:
    """Route Ray's and Tune's messages to a new log file under `store` for the duration of the block; prints its path
    to `out` once and yields it. A store given as a URI gets the file when the block ends (it is written to a local
    temporary folder meanwhile, the path yielded, and that folder removed)."""
    local = not is_uri(store)
    name = log_name()
    folder = Path(store) / LOG_FOLDER if local else Path(tempfile.mkdtemp(prefix="looplaw-log-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    handler = _LogFile(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR)
    console.addFilter(_NotReportedBySweep())
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    ray_logger = logging.getLogger("ray")
    saved = ray_logger.handlers[:], ray_logger.level, ray_logger.propagate
    ray_logger.handlers = [handler, console]
    ray_logger.setLevel(logging.INFO)
    ray_logger.propagate = False
    lines = logging.getLogger("looplaw.console")  # the printed lines this module routes
    lines_saved = lines.handlers[:], lines.propagate
    lines.handlers, lines.propagate = [handler], False
    lines.setLevel(logging.INFO)
    env_saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LineRouter(sys.stdout, lines), _LineRouter(sys.stderr, lines)
    show_warning = warnings.showwarning

    def route_ray_warnings(message, category, filename, lineno, file=None, line=None):
        """Python warnings raised inside Ray's own code (deprecations of its internals) go to the log."""
        if str(filename).startswith(RAY_PACKAGE):
            logging.getLogger("ray.warnings").warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno)
        else:
            show_warning(message, category, filename, lineno, file, line)

    warnings.showwarning = route_ray_warnings
    where = path if local else f"{store.rstrip('/')}/{LOG_FOLDER}/{name} (written at the end; meanwhile {path})"
    print(f"log: Ray's and Tune's own messages go to {where}", file=out, flush=True)
    try:
        yield str(path)
    finally:
        warnings.showwarning = show_warning
        for router in (sys.stdout, sys.stderr):
            if isinstance(router, _LineRouter):
                router.flush()
        sys.stdout, sys.stderr = streams
        for key, value in env_saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        ray_logger.handlers, ray_logger.propagate = saved[0], saved[2]
        ray_logger.setLevel(saved[1])
        lines.handlers, lines.propagate = lines_saved
        handler.close()
        if not local:
            with contextlib.suppress(OSError):
                _upload(path, store, name)
            shutil.rmtree(folder, ignore_errors=True)


def _upload(path: Path, store: str, name: str) -> None:
    fs, root = filesystem(store)
    fs.create_dir(f"{root.rstrip('/')}/{LOG_FOLDER}", recursive=True)
    with fs.open_output_stream(f"{root.rstrip('/')}/{LOG_FOLDER}/{name}") as f:
        f.write(path.read_bytes())
