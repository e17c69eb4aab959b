"""The one place a storage location becomes a filesystem: a local path, or any pyarrow.fs URI (s3://, gs://, file://).

Torch-free and Ray-free: the results store, the data loader, the sweep driver and analysis all open locations here.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Callable

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in os.fspath(location)


def absolute(location: str | os.PathLike) -> str:
    """A URI as given; a local path made absolute, since Ray workers and trials run in other working directories."""
    location = os.fspath(location)
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    location = os.fspath(location)
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), absolute(location)


def storage_root(cfg: Any) -> str:
    """Where a run keeps its results, Ray Train checkpoints and TensorBoard logs: its config's `storage`, absolute."""
    return absolute(cfg.storage)


def atomic_write(fs: pafs.FileSystem, folder: str, name: str, write: Callable[[str], None]) -> None:
    """`write(path)` to a dot-prefixed temp name in `folder`, then rename it to `name`: readers (pyarrow.dataset and
    pandas skip names starting with '.') never see half a file, and a failed write leaves nothing behind."""
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
    try:
        write(tmp)
        fs.move(tmp, f"{folder}/{name}")
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise
