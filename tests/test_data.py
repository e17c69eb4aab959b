"""Data pipeline: prepare (Ray Data) round trips, the default corpus, and the packing loader."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from training.corpus import default_corpus_texts, doc_key, split_text
from training.loader import TokenLoader, bits_per_byte, load_data_tokenizer, load_meta, validation_batches
from training.prepare import PrepareConfig, ensure_default_data, prepare
from training.prepare import main as prepare_main

REPO = Path(__file__).resolve().parents[1]

UNICODE_DOC = "naïve café — 東京 😀\r\nTabs\tand  double  spaces\n\n\n  leading spaces, trailing  \n"


def _read_docs(out: Path) -> dict[str, list[tuple[int, list[int]]]]:
    """doc key -> [(part, tokens)] over both splits."""
    docs = defaultdict(list)
    for split in ("train", "val"):
        t = pads.dataset(out / split, format="parquet").to_table(columns=["doc", "part", "tokens"])
        for d, p, toks in zip(t["doc"].to_pylist(), t["part"].to_pylist(), t["tokens"].to_pylist()):
            docs[d].append((p, toks))
    return docs


def _decoded(out: Path) -> dict[str, str]:
    tok = load_data_tokenizer(str(out))
    return {
        d: "".join(tok.decode(toks, skip_special_tokens=True) for _, toks in sorted(parts))
        for d, parts in _read_docs(out).items()
    }


def _check_rows(out: Path, meta: dict) -> None:
    for split in ("train", "val"):
        t = pads.dataset(out / split, format="parquet").to_table()
        assert t.schema.field("tokens").type == pa.list_(pa.int32())
        toks = t["tokens"].to_pylist()
        assert toks and all(x[0] == meta["bos_id"] and meta["bos_id"] not in x[1:] for x in toks)
        assert t["n_tokens"].to_pylist() == [len(x) for x in toks]
        assert meta[f"n_{split}_tokens"] == sum(len(x) for x in toks)
        assert meta[f"{split}_bytes"] == sum(t["n_bytes"].to_pylist())
    assert meta["val_bytes_per_token"] == pytest.approx(meta["val_bytes"] / meta["n_val_tokens"])


@pytest.fixture(scope="module")
def text_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_in")
    chapters = default_corpus_texts()
    texts = {"genesis.txt": chapters[0], "sub/john.md": chapters[1000], "unicode.txt": UNICODE_DOC}
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))  # bytes: keep \r\n exactly as written
    (root / ".hidden.txt").write_text("must be skipped")
    return root, list(texts.values())


@pytest.fixture(scope="module")
def text_prepared(ray_local, text_input, tmp_path_factory):
    src, _ = text_input
    out = tmp_path_factory.mktemp("text_out") / "data"
    rc = prepare_main([
        "--input", str(src), "--out", str(out), "--vocab-size", "300", "--val-fraction", "0.3",
        "--max-doc-chars", "300", "--rows-per-group", "2",
    ])
    assert rc == 0
    return out


def test_prepare_cli_text_files_round_trip(text_input, text_prepared):
    _, texts = text_input
    meta = load_meta(str(text_prepared))
    assert (text_prepared / "tokenizer.json").is_file()
    assert meta["vocab_size"] == 300 and meta["tokenizer"] == "trained"
    assert meta["n_val_docs"] > 0 and meta["n_train_docs"] > 0
    _check_rows(text_prepared, meta)
    decoded = _decoded(text_prepared)
    assert decoded == {doc_key(t): t for t in texts}  # every file, exactly, and nothing else (.hidden skipped)
    # Long files were split into several documents, none over the limit.
    parts = _read_docs(text_prepared)
    assert len(parts[doc_key(texts[0])]) > 1


def test_prepare_cli_parquet_and_arrow_round_trip_with_given_tokenizer(text_prepared, tmp_path):
    rows = default_corpus_texts()[100:106] + [UNICODE_DOC, None, ""]
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": list(range(5)), "body": rows[:5]}), src / "a.parquet")
    arrow_rows = pa.table({"body": rows[5:]})
    with pa.ipc.new_stream(src / "b.arrow", arrow_rows.schema) as w:  # the stream format HF datasets caches use
        w.write_table(arrow_rows)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    proc = subprocess.run(
        [sys.executable, "-m", "training.prepare", "--input", str(src), "--out", str(out), "--text-column", "body",
         "--tokenizer", str(text_prepared / "tokenizer.json"), "--val-fraction", "0.3", "--max-doc-chars", "2000"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = load_meta(str(out))
    assert meta["tokenizer"] == str(text_prepared / "tokenizer.json")
    assert (out / "tokenizer.json").read_text() == (text_prepared / "tokenizer.json").read_text()
    _check_rows(out, meta)
    assert _decoded(out) == {doc_key(t): t for t in rows if t}


def test_prepare_rejects_bad_input(ray_local, text_input, tmp_path):
    pq.write_table(pa.table({"body": ["some text"]}), tmp_path / "in.parquet")
    with pytest.raises(ValueError, match="text_column"):
        prepare(PrepareConfig(input=str(tmp_path / "in.parquet"), out=str(tmp_path / "o"), vocab_size=300))
    with pytest.raises(ValueError, match="vocab_size"):
        PrepareConfig(input="x", out="y", vocab_size=10)
    with pytest.raises(ValueError, match="val_fraction"):
        PrepareConfig(input="x", out="y", val_fraction=1.5)
    with pytest.raises(ValueError, match="input"):
        prepare(PrepareConfig(input=str(tmp_path / "missing"), out=str(tmp_path / "o2"), vocab_size=300))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ValueError, match="out"):
        prepare(PrepareConfig(input=str(text_input[0]), out=str(tmp_path / "busy"), vocab_size=300))
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # nothing half-written left behind


def test_split_text_is_lossless_and_bounded():
    text = default_corpus_texts()[0] + "x" * 700 + UNICODE_DOC
    pieces = split_text(text, 250)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= 250 for p in pieces)
    assert split_text(text, 0) == [text]


# ---------------------------------------------------------------- default corpus


def test_default_corpus_is_the_king_james_bible():
    texts = default_corpus_texts()
    assert len(texts) == 1189  # chapters
    assert texts[0].startswith("Genesis 1\n")
    assert "In the beginning God created the heaven and the earth." in texts[0]
    assert "The grace of our Lord Jesus Christ be with you all. Amen." in texts[-1]
    assert 4_000_000 < sum(map(len, texts)) < 4_500_000


@pytest.fixture(scope="module")
def kjv_dir(ray_local, tmp_path_factory):
    """Built by two concurrent callers: they must agree on one folder, built once."""
    root = tmp_path_factory.mktemp("kjv")
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_default_data(root, vocab_size=512))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == [Path(results[0]).name]
    return results[0]


def test_ensure_default_data_is_cached_by_content(kjv_dir):
    meta_file = Path(kjv_dir) / "meta.json"
    before = meta_file.stat().st_mtime_ns
    assert ensure_default_data(Path(kjv_dir).parent, vocab_size=512) == kjv_dir
    assert meta_file.stat().st_mtime_ns == before
    meta = load_meta(kjv_dir)
    assert meta["vocab_size"] == 512 and meta["bos_id"] == 0
    assert 0.03 < meta["n_val_tokens"] / (meta["n_val_tokens"] + meta["n_train_tokens"]) < 0.08
    _check_rows(Path(kjv_dir), meta)
    decoded = set(_decoded(Path(kjv_dir)).values())
    assert default_corpus_texts()[0] in decoded


# ---------------------------------------------------------------- loader


def _batches(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_loader_rows_are_bos_aligned_shifted_pairs(kjv_dir):
    loader = TokenLoader(kjv_dir, "train", seq_len=64, micro_batch=4, seed=0)
    for x, y in _batches(loader, 20):
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert bool((x[:, 0] == loader.bos_id).all())
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.max()) < load_meta(kjv_dir)["vocab_size"]


def test_loader_is_deterministic_per_seed(kjv_dir):
    a = _batches(TokenLoader(kjv_dir, seq_len=64, micro_batch=4, seed=3), 5)
    b = _batches(TokenLoader("file://" + kjv_dir, seq_len=64, micro_batch=4, seed=3), 5)  # a pyarrow.fs URI too
    c = _batches(TokenLoader(kjv_dir, seq_len=64, micro_batch=4, seed=4), 5)
    assert _same(a, b)
    assert not _same(a, c)


@pytest.mark.parametrize("which", ["kjv_document_sharding", "text_unit_sharding"])
def test_ranks_read_disjoint_slices(which, kjv_dir, text_prepared):
    data = kjv_dir if which.startswith("kjv") else str(text_prepared)
    world = 2
    loaders = [TokenLoader(data, seq_len=32, micro_batch=2, rank=r, world_size=world, seed=7) for r in range(world)]
    assert loaders[0].shard_by == which.split("_")[1]
    n_docs = load_meta(data)["n_train_docs"]
    for epoch in (0, 1):
        slices = [{(u, int(r)) for u, rows in ld._epoch_plan(epoch) for r in rows} for ld in loaders]
        assert not slices[0] & slices[1]
        assert len(slices[0]) + len(slices[1]) == n_docs
    assert not _same(_batches(loaders[0], 3), _batches(loaders[1], 3))


@pytest.mark.parametrize("which", ["kjv", "text"])
def test_state_dict_resume_gives_identical_next_batches(which, kjv_dir, text_prepared):
    data = kjv_dir if which == "kjv" else str(text_prepared)  # the small one wraps epochs during the test
    kw = dict(seq_len=48, micro_batch=3, rank=1, world_size=2, seed=11, buffer_size=16)
    original = TokenLoader(data, **kw)
    _batches(original, 7)
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
    expected = _batches(original, 12)
    resumed = TokenLoader(data, **kw)
    resumed.load_state_dict(state)
    assert _same(_batches(resumed, 12), expected)
    if which == "text":
        assert original.epoch >= 1
    fresh = TokenLoader(data, **kw)
    assert not _same(_batches(fresh, 12), expected)
    with pytest.raises(ValueError, match="world_size"):
        TokenLoader(data, **{**kw, "world_size": 3}).load_state_dict(state)


def test_validation_batches_are_fixed_and_held_out(kjv_dir):
    a = validation_batches(kjv_dir, seq_len=64, micro_batch=4, max_tokens=4 * 64 * 5, rank=0, world_size=1)
    b = validation_batches(kjv_dir, seq_len=64, micro_batch=4, max_tokens=4 * 64 * 5, rank=0, world_size=1)
    assert len(a) == 5 and _same(a, b)
    assert all(bool((x[:, 0] == 0).all()) for x, _ in a)
    r0 = validation_batches(kjv_dir, 64, 4, 4 * 64 * 6, rank=0, world_size=2)
    r1 = validation_batches(kjv_dir, 64, 4, 4 * 64 * 6, rank=1, world_size=2)
    assert len(r0) == len(r1) == 3 and not _same(r0, r1)
    # Held out: no validation row appears in the training split.
    train_docs = {tuple(t) for t in pads.dataset(Path(kjv_dir) / "train").to_table(columns=["tokens"])["tokens"].to_pylist()}
    val_row = a[0][0][0].tolist()
    assert not any(tuple(d[: len(val_row)]) == tuple(val_row) for d in train_docs)


def test_bits_per_byte(kjv_dir):
    meta = load_meta(kjv_dir)
    loss = 2.5
    expected = loss * meta["n_val_tokens"] / (math.log(2) * meta["val_bytes"])
    assert bits_per_byte(loss, meta) == pytest.approx(expected)
    assert bits_per_byte(loss, kjv_dir) == pytest.approx(expected)
