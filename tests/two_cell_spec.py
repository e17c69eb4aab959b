"""The smallest real sweep the end-to-end tests drive: two cells of 10 steps (r in {1, 2} at one budget, d=32)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def two_cell_spec(name: str, store: Path, lr: dict[str, Any]) -> dict:
    return {
        "name": name,
        "storage": str(store),
        "model": {"family": "tiny", "vocab_size": 1024, "seq_len": 64, "head_dim": 16},
        "budgets": [{"compute": 6.0e9, "widths": [32]}],
        "r": [1, 2],
        "recipe": {"batch_tokens": 512, "micro_batch": 8, "eval_every": 4, "val_tokens": 1024,
                   "checkpoint_every": 4, "max_failures": 1},
        "lr": lr,
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "zero_stage": 0, "trial_cpus": 0.1},
        "concurrency": 1,
        "fit": {"bootstrap": 0},
    }
