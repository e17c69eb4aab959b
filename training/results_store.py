"""The results store: one Parquet file per finished run, plus its loss curve. The only thing analysis reads.

Layout under STORE (a local folder or any pyarrow.fs URI such as s3://bucket/prefix):
    STORE/runs/<run_id>.parquet     one row, schema RUN_SCHEMA
    STORE/curves/<run_id>.parquet   the loss curve, schema CURVE_SCHEMA
    STORE/depths/<run_id>.parquet   held-out loss at each test-time depth (looped runs only), schema DEPTH_SCHEMA
    STORE/evals/<run_id>.parquet    downstream task metrics at test-time depths (analysis eval), schema EVAL_SCHEMA
    STORE/weights/<run_id>.pt       the run's final weights (training.weights)
    STORE/runs/_quarantine/         run files that could not be read, moved aside (see read_runs)
Files are written to a dot-prefixed temp name and renamed, so readers (pyarrow.dataset and pandas skip names
starting with '.' or '_') never see half a file, and the file name is the run id, so writing a run twice
replaces its row instead of duplicating it. The curve and depth table are written before the row: a row implies
them.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from training.storage import atomic_write, filesystem

log = logging.getLogger(__name__)

STATUSES = ("completed", "diverged", "failed")

_TS = pa.timestamp("us", tz="UTC")

RUN_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False, metadata={"doc": "content hash of the training config"}),
    pa.field("sweep", pa.string(), metadata={"doc": "sweep name ('' for a single run)"}),
    pa.field("variant", pa.string(), metadata={"doc": "variant label within the sweep"}),
    pa.field("name", pa.string()),
    pa.field("status", pa.string(), nullable=False, metadata={"doc": "completed | diverged | failed"}),
    # model
    pa.field("d_model", pa.int64()),
    pa.field("size", pa.int64(), metadata={"doc": "reference size s, null outside the reference family"}),
    pa.field("n_prelude", pa.int64()),
    pa.field("n_rec_layers", pa.int64()),
    pa.field("n_coda", pa.int64()),
    pa.field("r", pa.int64()),
    pa.field("bptt_k", pa.int64(), metadata={"doc": "recurrences with a backward pass (= r for full backprop)"}),
    pa.field("injection", pa.string()),
    pa.field("hc_lanes", pa.int64()),
    pa.field("n_heads", pa.int64()),
    pa.field("head_dim", pa.int64()),
    pa.field("seq_len", pa.int64()),
    pa.field("vocab_size", pa.int64()),
    pa.field("effective_depth", pa.int64()),
    # accounting (models.accounting; embeddings excluded from n_once / n_rec)
    pa.field("n_once", pa.int64()),
    pa.field("n_rec", pa.int64()),
    pa.field("n_embed", pa.int64()),
    pa.field("flops_per_token", pa.float64(), metadata={"doc": "training FLOPs per token (fwd+bwd)"}),
    pa.field("tokens", pa.int64(), metadata={"doc": "tokens trained (steps * batch_tokens)"}),
    pa.field("compute", pa.float64(), metadata={"doc": "flops_per_token * tokens"}),
    pa.field("budget_compute", pa.float64(), metadata={"doc": "FLOP budget asked for (null for a token budget)"}),
    # outcome
    pa.field("val_loss", pa.float64(), metadata={"doc": "final held-out loss, nats per token (NaN unless completed)"}),
    pa.field("val_bpb", pa.float64(), metadata={"doc": "final held-out bits per byte"}),
    pa.field("train_loss", pa.float64()),
    pa.field("steps", pa.int64()),
    pa.field("wall_seconds", pa.float64(), metadata={"doc": "the run's wall time from the caller: worker-group "
                                                           "start to result (a branch: its cooldown and eval)"}),
    pa.field("train_seconds", pa.float64(), metadata={"doc": "optimizer steps, cooldown branches included"}),
    pa.field("setup_seconds", pa.float64(), metadata={"doc": "building model, engine and loader (and restores)"}),
    pa.field("eval_seconds", pa.float64(), metadata={"doc": "held-out evaluation: periodic, branch, depth"}),
    pa.field("checkpoint_seconds", pa.float64(), metadata={"doc": "checkpoint saves and branch snapshots"}),
    pa.field("tokens_per_second", pa.float64()),
    pa.field("mfu", pa.float64()),
    pa.field("restarts", pa.int64(), metadata={"doc": "worker-group restarts resumed from a checkpoint"}),
    # recipe
    pa.field("seed", pa.int64()),
    pa.field("lr", pa.float64(), metadata={"doc": "peak LR of the weight matrices"}),
    pa.field("batch_tokens", pa.int64()),
    pa.field("zero_stage", pa.int64()),
    pa.field("num_workers", pa.int64()),
    pa.field("config", pa.string(), metadata={"doc": "RunConfig.to_dict() as JSON"}),
    pa.field("versions", pa.string(), metadata={"doc": "library versions as JSON"}),
    pa.field("error", pa.string(), metadata={"doc": "why a failed run failed"}),
    pa.field("started_at", _TS),
    pa.field("finished_at", _TS),
    # multi-horizon runs (wsd cooldown branches)
    pa.field("parent_run_id", pa.string(), metadata={"doc": "the run a cooldown branch split off (null otherwise)"}),
    # does the loop work (looped runs; analysis.loops): the same validation tokens at one recurrence, and the loop's
    # statistics on one validation batch at the end of training
    pa.field("loss_r1", pa.float64(), metadata={"doc": "held-out loss at one recurrence (loop gain = loss_r1 - val_loss)"}),
    pa.field("e_rms", pa.float64(), metadata={"doc": "RMS of the prelude output e that each recurrence injects"}),
    pa.field("state_rms", pa.float64(), metadata={"doc": "RMS of the recurrent state after the last recurrence"}),
    pa.field("state_change", pa.float64(),
             metadata={"doc": "mean over recurrences 2..r of RMS(s_i - s_(i-1)) / RMS(s_(i-1))"}),
    pa.field("compute_spent", pa.float64(),
             metadata={"doc": "FLOPs this row's training actually cost: a branch its cooldown, its parent every "
                              "step it trained (branches included)"}),
])

CURVE_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int64()),
    pa.field("tokens", pa.int64()),
    pa.field("train_loss", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("lr", pa.float64()),
])

DEPTH_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("eval_r", pa.int64(), metadata={"doc": "recurrences run at evaluation"}),
    pa.field("trained_r", pa.int64(), metadata={"doc": "recurrences the model was trained with"}),
    pa.field("val_loss", pa.float64(), metadata={"doc": "held-out loss, nats per token, same tokens as the run's"}),
    pa.field("val_bpb", pa.float64(), metadata={"doc": "held-out bits per byte"}),
    pa.field("seconds", pa.float64(), metadata={"doc": "wall time of this depth's evaluation (rank 0)"}),
])

EVAL_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("request", pa.string(), nullable=False,
             metadata={"doc": "the task name asked for (a group's subtasks carry the group's name)"}),
    pa.field("task", pa.string(), nullable=False, metadata={"doc": "lm-eval task (or group) the metric is of"}),
    pa.field("metric", pa.string(), nullable=False, metadata={"doc": "e.g. acc, acc_norm; ',<filter>' appended "
                                                                     "for a filter other than lm-eval's 'none'"}),
    pa.field("value", pa.float64()),
    pa.field("stderr", pa.float64(), metadata={"doc": "lm-eval's standard error (NaN where it gives none)"}),
    pa.field("depth", pa.int64(), nullable=False, metadata={"doc": "recurrences at evaluation (test-time r)"}),
    pa.field("trained_r", pa.int64()),
    pa.field("num_fewshot", pa.int64()),
    pa.field("limit", pa.int64(), metadata={"doc": "examples per task asked for (null: all)"}),
    pa.field("n_samples", pa.int64(), metadata={"doc": "examples evaluated"}),
    pa.field("chance", pa.float64(), metadata={"doc": "mean 1/choices of a multiple-choice task, else NaN"}),
    pa.field("task_version", pa.string()),
    pa.field("task_hash", pa.string(), metadata={"doc": "hash of every example's document, prompt and target, "
                                                        "as lm-eval's EvaluationTracker computes it"}),
    pa.field("lm_eval_version", pa.string()),
    pa.field("seconds", pa.float64(), metadata={"doc": "wall time of the evaluation call at this depth"}),
    pa.field("evaluated_at", _TS),
])
# A stored row answers a request at a depth under these settings; a new row with the same key is never written.
EVAL_KEY = ("request", "task", "metric", "depth", "num_fewshot", "limit")

# Columns a row must carry; the rest default to null.
REQUIRED = ("run_id", "status", "d_model", "r", "n_once", "n_rec", "flops_per_token", "tokens", "compute", "val_loss")


def _atomic_write(fs: pafs.FileSystem, folder: str, name: str, table: pa.Table) -> None:
    atomic_write(fs, folder, name, lambda tmp: pq.write_table(table, tmp, filesystem=fs))


def _check_run_id(run_id: Any) -> str:
    if not isinstance(run_id, str) or not run_id or "/" in run_id or run_id.startswith((".", "_")):
        raise ValueError(f"run_id: {run_id!r} is not usable as a file name; use the RunConfig.run_id hash")
    return run_id


def run_table(row: Mapping[str, Any]) -> pa.Table:
    """One row as a table of RUN_SCHEMA; unknown or missing columns raise, naming the column."""
    unknown = sorted(set(row) - set(RUN_SCHEMA.names))
    if unknown:
        raise ValueError(f"row: unknown column(s) {unknown}; the schema is training.results_store.RUN_SCHEMA")
    missing = [c for c in REQUIRED if row.get(c) is None]
    if missing:
        raise ValueError(f"row: missing required column(s) {missing}")
    if row["status"] not in STATUSES:
        raise ValueError(f"row.status: {row['status']!r} is not one of {STATUSES}")
    values = dict(row)
    for key in ("config", "versions"):
        if values.get(key) is not None and not isinstance(values[key], str):
            values[key] = json.dumps(values[key], sort_keys=True, default=str)
    return pa.Table.from_pylist([{name: values.get(name) for name in RUN_SCHEMA.names}], schema=RUN_SCHEMA)


def curve_table(run_id: str, curve: Iterable[Mapping[str, Any]]) -> pa.Table:
    rows = [{"run_id": run_id, **{k: point.get(k) for k in CURVE_SCHEMA.names[1:]}} for point in curve]
    return pa.Table.from_pylist(rows, schema=CURVE_SCHEMA)


def write_run(store: str | os.PathLike, row: Mapping[str, Any], curve: Iterable[Mapping[str, Any]] = ()) -> None:
    """Write (or replace) the run's curve then its row, each atomically."""
    run_id = _check_run_id(row.get("run_id"))
    table = run_table(row)  # validate before touching storage
    fs, root = filesystem(store)
    _atomic_write(fs, f"{root}/curves", f"{run_id}.parquet", curve_table(run_id, curve))
    _atomic_write(fs, f"{root}/runs", f"{run_id}.parquet", table)


def depth_table(run_id: str, depths: Iterable[Mapping[str, Any]]) -> pa.Table:
    rows = [{"run_id": run_id, **{k: point.get(k) for k in DEPTH_SCHEMA.names[1:]}} for point in depths]
    bad = [row["eval_r"] for row in rows if not isinstance(row["eval_r"], int) or row["eval_r"] < 1]
    if bad:
        raise ValueError(f"depths.eval_r: {bad} are not recurrence counts; every eval_r must be an integer >= 1")
    return pa.Table.from_pylist(rows, schema=DEPTH_SCHEMA)


def write_depths(store: str | os.PathLike, run_id: str, depths: Iterable[Mapping[str, Any]]) -> None:
    """Write (or replace) the run's test-time depth table atomically; write it before the run's row."""
    table = depth_table(_check_run_id(run_id), depths)
    fs, root = filesystem(store)
    _atomic_write(fs, f"{root}/depths", f"{run_id}.parquet", table)


def _read_per_run(store: str | os.PathLike, folder: str, schema: pa.Schema, run_id: str | None) -> pa.Table:
    """Every run's rows of a per-run folder (one run's with `run_id`); an empty table of `schema` when there are none."""
    fs, root = filesystem(store)
    path = f"{root}/{folder}" if run_id is None else f"{root}/{folder}/{_check_run_id(run_id)}.parquet"
    if fs.get_file_info(path).type not in (pafs.FileType.Directory, pafs.FileType.File):
        return schema.empty_table()
    return ds.dataset(path, filesystem=fs, format="parquet", schema=schema).to_table()


def read_depths(store: str | os.PathLike, run_id: str | None = None) -> pa.Table:
    """Every run's depth rows (one run's with `run_id`); an empty DEPTH_SCHEMA table when there are none."""
    return _read_per_run(store, "depths", DEPTH_SCHEMA, run_id)


def has_run(store: str | os.PathLike, run_id: str) -> bool:
    fs, root = filesystem(store)
    return fs.get_file_info(f"{root}/runs/{_check_run_id(run_id)}.parquet").type == pafs.FileType.File


QUARANTINE = "_quarantine"  # under runs/; the leading '_' hides it from pyarrow.dataset and pandas


@dataclass(frozen=True)
class Quarantined:
    """A run file that could not be read, and where it was moved."""

    file: str  # its name under runs/
    moved_to: str  # its path now, under runs/_quarantine/
    reason: str


def _quarantine(fs: pafs.FileSystem, path: str, reason: str) -> None:
    """Move an unreadable run file aside, never deleting it, with a note saying why; its run counts as not stored."""
    folder, name = path.rsplit("/", 1)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest = f"{folder}/{QUARANTINE}/{name[:-len('.parquet')]}.{stamp}.parquet"
    fs.create_dir(f"{folder}/{QUARANTINE}", recursive=True)
    try:
        fs.move(path, dest)
    except FileNotFoundError:  # another reader moved it first
        return
    with fs.open_output_stream(f"{dest}.json") as f:
        f.write(json.dumps({"file": name, "reason": reason}).encode())
    log.warning("results store: run file %s is unreadable (%s); moved to %s, its run counts as not stored",
                path, reason, dest)


def _read_row_file(fs: pafs.FileSystem, path: str) -> pa.Table | None:
    """One run file as a RUN_SCHEMA table, or None after quarantining a file that holds no readable row."""
    try:
        table = pq.read_table(path, filesystem=fs, schema=RUN_SCHEMA)
    except pa.ArrowException as exc:
        if isinstance(exc, OSError):  # the storage failed, not the file: never move a good file for that
            raise
        _quarantine(fs, path, f"not a readable Parquet run file: {exc}")
        return None
    if table.num_rows == 0 or table["run_id"].null_count or table["status"].null_count:
        _quarantine(fs, path, "no run row (run_id and status missing)")
        return None
    return table


def _run_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        return []
    return sorted(f.path for f in fs.get_file_info(pafs.FileSelector(folder))
                  if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")
                  and not f.base_name.startswith((".", "_")))


def read_runs(store: str | os.PathLike) -> pa.Table:
    """Every readable run row (an empty RUN_SCHEMA table for an empty store).

    A file that holds no readable row (truncated, not Parquet, no run_id) is moved to runs/_quarantine/ (see
    `quarantined`) and the other runs are read: one bad file costs its run, which a sweep then trains again.
    """
    fs, root = filesystem(store)
    tables = [t for t in (_read_row_file(fs, p) for p in _run_files(fs, f"{root}/runs")) if t is not None]
    return pa.concat_tables(tables) if tables else RUN_SCHEMA.empty_table()


def read_run(store: str | os.PathLike, run_id: str) -> dict[str, Any] | None:
    """The run's row as a dict, or None when the store has none (or its file was unreadable, now quarantined)."""
    if not has_run(store, run_id):
        return None
    fs, root = filesystem(store)
    table = _read_row_file(fs, f"{root}/runs/{run_id}.parquet")
    return None if table is None else table.to_pylist()[0]


def quarantined(store: str | os.PathLike) -> list[Quarantined]:
    """Every run file moved to runs/_quarantine/, oldest first: move one back to runs/ once it is repaired."""
    fs, root = filesystem(store)
    out = []
    for path in _run_files(fs, f"{root}/runs/{QUARANTINE}"):
        note = {"file": path.rsplit("/", 1)[1], "reason": "no note"}
        if fs.get_file_info(f"{path}.json").type == pafs.FileType.File:
            with fs.open_input_stream(f"{path}.json") as f:
                note.update(json.loads(f.read()))
        out.append(Quarantined(file=note["file"], moved_to=path, reason=note["reason"]))
    return sorted(out, key=lambda q: q.moved_to.rsplit(".", 2)[-2])


def read_curve(store: str | os.PathLike, run_id: str) -> pa.Table:
    fs, root = filesystem(store)
    path = f"{root}/curves/{_check_run_id(run_id)}.parquet"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return CURVE_SCHEMA.empty_table()
    return pq.read_table(path, filesystem=fs, schema=CURVE_SCHEMA)


def finite_or_nan(value: Any) -> float:
    """Metric values as floats; None (never measured) becomes NaN so the column stays float64."""
    if value is None:
        return math.nan
    return float(value)


def read_evals(store: str | os.PathLike, run_id: str | None = None) -> pa.Table:
    """Every run's downstream eval rows (one run's with `run_id`); an empty EVAL_SCHEMA table when there are none."""
    return _read_per_run(store, "evals", EVAL_SCHEMA, run_id)


def _eval_key(row: Mapping[str, Any]) -> tuple:
    return tuple(row.get(k) for k in EVAL_KEY)


def add_evals(store: str | os.PathLike, run_id: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Add eval rows to the run's file atomically, keeping every stored row as it is: a row whose key (EVAL_KEY) is
    stored already is dropped, never written over. Returns how many rows were added. One writer per run at a time
    (analysis eval evaluates each run in one task)."""
    new = [{"run_id": _check_run_id(run_id), **{k: row.get(k) for k in EVAL_SCHEMA.names[1:]}} for row in rows]
    bad = [row["depth"] for row in new if not isinstance(row["depth"], int) or row["depth"] < 1]
    if bad:
        raise ValueError(f"evals.depth: {bad} are not recurrence counts; every depth must be an integer >= 1")
    stored = read_evals(store, run_id)
    seen = {_eval_key(row) for row in stored.select(list(EVAL_KEY)).to_pylist()}
    fresh = []
    for row in new:
        if _eval_key(row) not in seen:
            seen.add(_eval_key(row))
            fresh.append(row)
    if fresh:
        table = pa.concat_tables([stored, pa.Table.from_pylist(fresh, schema=EVAL_SCHEMA)])
        fs, root = filesystem(store)
        _atomic_write(fs, f"{root}/evals", f"{run_id}.parquet", table)
    return len(fresh)
