"""The results store: schema, atomic one-file-per-run writes, no duplicates, URI access."""
import datetime as dt
import math
import os

import pandas as pd
import pyarrow.dataset as ds
import pytest

from training import results_store as rs


def _row(run_id="d64-r2-abc", status="completed", val_loss=4.2, **extra):
    row = {"run_id": run_id, "sweep": "s", "variant": "base", "status": status, "d_model": 64, "size": None,
           "n_prelude": 1, "n_rec_layers": 4, "n_coda": 1, "r": 2, "bptt_k": 2, "injection": "concat",
           "n_once": 1000, "n_rec": 2000, "n_embed": 500, "flops_per_token": 1.5e6, "tokens": 4096,
           "compute": 1.5e6 * 4096, "val_loss": val_loss, "train_loss": 4.3, "steps": 4, "wall_seconds": 1.0,
           "tokens_per_second": 100.0, "mfu": 0.01, "seed": 0, "lr": 3e-3, "versions": {"torch": "x"},
           "started_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
           "finished_at": dt.datetime(2026, 1, 1, 0, 1, tzinfo=dt.timezone.utc)}
    row.update(extra)
    return row


CURVE = [{"step": 0, "tokens": 0, "train_loss": math.nan, "val_loss": 6.9, "lr": 3e-3},
         {"step": 4, "tokens": 4096, "train_loss": 4.3, "val_loss": 4.2, "lr": 3e-4}]


def test_write_read_roundtrip(tmp_path):
    store = str(tmp_path / "store")
    assert rs.read_runs(store).num_rows == 0
    assert not rs.has_run(store, "d64-r2-abc")
    rs.write_run(store, _row(), CURVE)
    assert rs.has_run(store, "d64-r2-abc")
    table = rs.read_runs(store)
    assert table.schema.equals(rs.RUN_SCHEMA)
    row = table.to_pylist()[0]
    assert row["val_loss"] == 4.2 and row["size"] is None and row["status"] == "completed"
    assert '"torch"' in row["versions"]
    # the contract in COMMON.md: plain pandas / pyarrow.dataset read the folder
    assert pd.read_parquet(f"{store}/runs").shape[0] == 1
    assert ds.dataset(f"{store}/runs").to_table().num_rows == 1
    curve = rs.read_curve(store, "d64-r2-abc").to_pylist()
    assert [p["step"] for p in curve] == [0, 4] and curve[1]["val_loss"] == 4.2
    assert rs.read_run(store, "d64-r2-abc")["tokens"] == 4096


def test_second_write_replaces_without_duplicate_or_leftovers(tmp_path):
    store = str(tmp_path)
    rs.write_run(store, _row(status="failed", val_loss=math.nan), [])
    rs.write_run(store, _row(val_loss=3.9), CURVE)
    rs.write_run(store, _row(run_id="d64-r1-def", val_loss=4.5), CURVE)
    runs = pd.read_parquet(f"{store}/runs")
    assert sorted(runs.run_id) == ["d64-r1-def", "d64-r2-abc"]
    assert runs.set_index("run_id").loc["d64-r2-abc", "val_loss"] == 3.9
    assert sorted(os.listdir(f"{store}/runs")) == ["d64-r1-def.parquet", "d64-r2-abc.parquet"]
    assert len(pd.read_parquet(f"{store}/curves")) == 4


def test_uri_store(tmp_path):
    store = f"file://{tmp_path}/uri-store"
    rs.write_run(store, _row(), CURVE)
    assert rs.has_run(store, "d64-r2-abc")
    assert rs.read_runs(store).num_rows == 1
    assert os.path.exists(tmp_path / "uri-store" / "runs" / "d64-r2-abc.parquet")


@pytest.mark.parametrize("change, message", [
    ({"status": "exploded"}, "row.status"),
    ({"bogus_column": 1}, "bogus_column"),
    ({"val_loss": None}, "val_loss"),
    ({"run_id": "../escape"}, "run_id"),
])
def test_bad_rows_are_refused_before_writing(tmp_path, change, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        rs.write_run(str(tmp_path), _row(**change), CURVE)
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_unreadable_run_files_are_quarantined_and_the_rest_read(tmp_path):
    store = str(tmp_path / "store")
    for run_id in ("d64-r1-aaa", "d64-r2-bbb", "d64-r4-ccc"):
        rs.write_run(store, _row(run_id=run_id), CURVE)
    runs = tmp_path / "store" / "runs"
    _truncate(runs / "d64-r2-bbb.parquet")
    (runs / "notes.parquet").write_text("not a parquet file")

    table = rs.read_runs(store)
    assert sorted(table.column("run_id").to_pylist()) == ["d64-r1-aaa", "d64-r4-ccc"]
    assert sorted(os.listdir(runs)) == ["_quarantine", "d64-r1-aaa.parquet", "d64-r4-ccc.parquet"]
    bad = {q.file: q for q in rs.quarantined(store)}
    assert set(bad) == {"d64-r2-bbb.parquet", "notes.parquet"}
    for q in bad.values():  # moved, never deleted, with the reader's reason
        assert os.path.dirname(q.moved_to) == str(runs / "_quarantine") and os.path.isfile(q.moved_to)
        assert "not a readable Parquet run file" in q.reason
    assert os.path.getsize(bad["d64-r2-bbb.parquet"].moved_to) > 0
    assert pd.read_parquet(runs).shape[0] == 2  # plain readers skip the _quarantine folder

    # Reading one run quarantines its file the same way: the run counts as not stored.
    _truncate(runs / "d64-r4-ccc.parquet")
    assert rs.read_run(store, "d64-r4-ccc") is None and not rs.has_run(store, "d64-r4-ccc")
    assert len(rs.quarantined(store)) == 3
    rs.write_run(store, _row(run_id="d64-r4-ccc"), CURVE)  # trained again: a new row beside the kept copy
    assert rs.read_runs(store).num_rows == 2 and len(rs.quarantined(store)) == 3


def test_a_parquet_file_without_a_run_row_is_quarantined(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = tmp_path / "store"
    rs.write_run(str(store), _row(), CURVE)
    pq.write_table(pa.table({"other": [1, 2]}), store / "runs" / "foreign.parquet")
    assert rs.read_runs(str(store)).column("run_id").to_pylist() == ["d64-r2-abc"]
    (q,) = rs.quarantined(str(store))
    assert q.file == "foreign.parquet" and "no run row" in q.reason


def test_eval_rows_are_added_and_never_written_over(tmp_path):
    store = f"file://{tmp_path}/store"  # a pyarrow.fs URI, as on a cluster
    row = {"request": "kjv_cloze", "task": "kjv_cloze", "metric": "acc", "value": 0.3, "stderr": 0.02, "depth": 2,
           "num_fewshot": None, "limit": None}
    assert rs.add_evals(store, "d64-r2-abc", [row, {**row, "metric": "acc_norm"}]) == 2
    again = [{**row, "value": 0.9}, {**row, "depth": 4}, {**row, "depth": 4, "limit": 10}]
    assert rs.add_evals(store, "d64-r2-abc", again) == 2  # the stored (depth 2, acc) row stays as it was
    table = rs.read_evals(store, "d64-r2-abc").to_pandas()
    assert rs.read_evals(store).schema.equals(rs.EVAL_SCHEMA) and len(table) == 4
    assert table.loc[(table["depth"] == 2) & (table["metric"] == "acc"), "value"].tolist() == [0.3]
    assert rs.read_evals(store, "d64-r2-xyz").num_rows == 0
    with pytest.raises(ValueError, match=r"^evals.depth: \[0\]"):
        rs.add_evals(store, "d64-r2-abc", [{**row, "depth": 0}])
    assert not [p for p in os.listdir(tmp_path / "store" / "evals") if p.startswith(".")]  # no temp files left
