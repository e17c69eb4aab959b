"""A prepared data folder of random tokens (the layout `python -m training.prepare` writes), so benchmarks run the
real loader and packing without a tokenizer or a corpus."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_synthetic_prepared(out: str | Path, vocab_size: int, train_tokens: int, val_tokens: int,
                             doc_tokens: int = 1500, seed: int = 0) -> str:
    """Documents of ~`doc_tokens` random ids (a BOS id 0 first) in out/train and out/val, plus meta.json."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    stats = {}
    for split, total in (("train", train_tokens), ("val", val_tokens)):
        (out / split).mkdir(parents=True, exist_ok=True)
        lengths = rng.integers(doc_tokens // 2, doc_tokens * 3 // 2, size=max(2, total // doc_tokens))
        docs = [np.concatenate(([0], rng.integers(1, vocab_size, size=n - 1))).astype(np.int32) for n in lengths]
        table = pa.table({"tokens": pa.array(docs, type=pa.list_(pa.int32())),
                          "n_tokens": pa.array(lengths, type=pa.int64()),
                          "n_bytes": pa.array(lengths * 4, type=pa.int64())})
        pq.write_table(table, out / split / "part-0.parquet", row_group_size=64)
        stats[split] = (int(lengths.sum()), len(docs))
    meta = {"format_version": 1, "vocab_size": vocab_size, "bos_id": 0, "n_train_tokens": stats["train"][0],
            "n_val_tokens": stats["val"][0], "n_train_docs": stats["train"][1], "n_val_docs": stats["val"][1],
            "val_bytes_per_token": 4.0, "source": "synthetic", "tokenizer": "none"}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return str(out)
