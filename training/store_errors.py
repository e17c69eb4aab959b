"""The store failing (full disk, permission, read-only or lost mount): found behind whatever wraps it, and said in
one line that names the location and the operating system's error.

Ray Tune hides a trial's OSError on a full disk: it pickles the trial's exception into the trial's folder in the
store, which fails half-way, and later reads that empty file back (`EOFError: Ran out of input`). `store_failure`
sees through that by writing a probe file to the store.
"""
from __future__ import annotations

import errno
import os
import uuid

from training.storage import filesystem

PROBE_BYTES = 256 * 1024  # more than a page or a filesystem block, so a store that is nearly full fails it too


class StoreFailed(Exception):
    """Writing (or reading) the store failed; `str()` is the one line to print."""

    def __init__(self, store: str, cause: BaseException):
        self.store, self.cause = store, cause
        super().__init__(f"store {store}: {describe_os_error(cause)}")


def describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{errno.errorcode.get(exc.errno, exc.errno)} {exc.strerror or exc}{where}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def os_error_in(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc`: itself, one in its cause / context chain, or a Ray task error's remote cause.
    FileNotFoundError does not count (a missing optional file is handled where it is read)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for candidate in (exc, getattr(exc, "cause", None)):  # ray.exceptions.RayTaskError(cause=...)
            if isinstance(candidate, OSError) and not isinstance(candidate, FileNotFoundError):
                return candidate
        exc = exc.__cause__ or exc.__context__
    return None


def probe_store(store: str) -> OSError | None:
    """Write, read back and delete a uniquely named file at the store's root: the store's error, or None."""
    try:
        fs, root = filesystem(store)
        fs.create_dir(root, recursive=True)
        path = f"{root.rstrip('/')}/.probe-{os.getpid()}-{uuid.uuid4().hex}"
        payload = os.urandom(PROBE_BYTES)
        try:
            with fs.open_output_stream(path) as f:
                f.write(payload)
            with fs.open_input_stream(path) as f:
                if f.read() != payload:
                    return OSError(errno.EIO, "the store returned other bytes than were written", path)
        finally:
            try:
                fs.delete_file(path)
            except OSError:
                pass
    except OSError as exc:
        return exc
    return None


def _unreadable_error_file(exc: BaseException) -> bool:
    """Ray Tune reading back an error file it could not write: EOFError / an unpickling error, anywhere in the chain."""
    import pickle

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (EOFError, pickle.UnpicklingError)) or "Ran out of input" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def store_failure(store: str, exc: BaseException) -> StoreFailed | None:
    """`exc` as the store's failure (StoreFailed), or None when it is something else."""
    cause = os_error_in(exc)
    if cause is None and _unreadable_error_file(exc):
        cause = probe_store(store)
        if cause is None:  # the space freed since (failed writes are deleted): say what is known
            cause = OSError(errno.EIO, "Ray Tune could not write a trial's error file to the store and read back "
                                       "an empty one (a full or failing store)")
    return StoreFailed(store, cause) if cause is not None else None
