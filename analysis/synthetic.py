"""Synthetic sweeps drawn from a known law, shaped like the reference grid, for tests and benchmarks.

The grid mirrors arXiv 2604.21106: 6 budgets (4.64e17 .. 2.15e19 FLOPs) x 4-5 reference sizes around
each budget's optimum x r in {1, 2, 4, 8} = 116 runs, with exact parameter and FLOP counts from
models.accounting; losses are the law's predictions times log-normal noise.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .law import ScalingLaw

REFERENCE_BUDGETS = (4.64e17, 1e18, 2.15e18, 4.64e18, 1e19, 2.15e19)
# Sizes s (width d = ceil(64 s / 128) * 128) per budget, bracketing each budget's compute optimum.
REFERENCE_SIZES = (
    (6, 8, 10, 12),
    (8, 10, 12, 14, 16),
    (10, 12, 14, 16, 18),
    (14, 16, 18, 20, 22),
    (18, 20, 22, 24, 26),
    (26, 28, 30, 32, 34),
)
# A denser grid for recovery tests: 7-8 sizes per budget spanning ~2.5x in width around the optimum.
WIDE_SIZES = tuple(tuple(range(max(4, s[0] - 6), s[0] + 10, 2)) for s in REFERENCE_SIZES)
BATCH_TOKENS = 2 ** 19


def synthetic_sweep(law: ScalingLaw, *, budgets=REFERENCE_BUDGETS, sizes=REFERENCE_SIZES, r_values=(1, 2, 4, 8),
                    noise: float = 0.01, seed: int = 0, variant: str = "baseline", bptt_k: int | None = None,
                    injection: str = "concat", sweep: str = "synthetic", replicates: int = 1) -> pd.DataFrame:
    """One row per run in the results-store schema; val_loss = law * exp(noise * N(0, 1)).

    replicates: independent noisy copies of every grid point (like re-running each config with a
    new seed); a 1%-noise sweep pins phi to about +-0.03 only with several hundred runs.
    """
    from models import LoopedConfig
    from models.accounting import flops_per_token, param_counts, training_compute

    if len(sizes) != len(budgets):
        raise ValueError(f"sizes needs one tuple per budget ({len(budgets)}), got {len(sizes)}")
    rng = np.random.default_rng(seed)
    rows = []
    for rep, budget, budget_sizes in ((k, b, s) for k in range(replicates) for b, s in zip(budgets, sizes)):
        for s in budget_sizes:
            for r in r_values:
                k = None if bptt_k is None else min(bptt_k, r)
                cfg = LoopedConfig.reference(s, r, bptt_k=k, injection=injection)
                pc = param_counts(cfg)
                f = flops_per_token(cfg)
                steps = max(1, int(round(budget / (f * BATCH_TOKENS))))
                tokens = steps * BATCH_TOKENS  # integer steps: compute lands near, not on, the target
                loss = float(law.predict(pc.n_once, pc.n_rec, r, tokens)) * float(np.exp(noise * rng.standard_normal()))
                rows.append({
                    "run_id": f"{sweep}-{variant}-c{budget:.3g}-s{s}-r{r}" + (f"-x{rep}" if replicates > 1 else ""),
                    "sweep": sweep, "variant": variant, "status": "completed",
                    "d_model": cfg.d_model, "size": s, "n_prelude": cfg.n_prelude, "n_rec_layers": cfg.n_rec_layers,
                    "n_coda": cfg.n_coda, "r": r, "bptt_k": cfg.backprop_recurrences, "injection": cfg.injection,
                    "n_once": pc.n_once, "n_rec": pc.n_rec, "n_embed": pc.n_embed, "flops_per_token": f,
                    "tokens": tokens, "compute": training_compute(cfg, tokens), "val_loss": loss, "train_loss": loss, "steps": steps,
                    "wall_seconds": 0.0, "tokens_per_second": 0.0, "mfu": 0.0, "seed": seed, "lr": 3e-3,
                    "versions": json.dumps({"synthetic": law.coefficients}),
                    "started_at": pd.Timestamp("2026-01-01", tz="UTC"), "finished_at": pd.Timestamp("2026-01-01", tz="UTC"),
                })
    return pd.DataFrame(rows)


def planted_row(law: ScalingLaw, run: Any, *, noise: float = 0.01, seed: int = 0) -> dict[str, Any]:
    """The results-store row a training RunConfig gets if its loss is the law's prediction times log-normal noise.

    The noise is seeded by the run id, so the same cell always measures the same loss: a sweep's search, stopping,
    resume and store can be tested on real Ray Tune without training (see tests/test_adaptive_sweep.py).
    """
    from models.accounting import param_counts, training_compute

    counts = param_counts(run.model)
    tokens, f = run.train_tokens, run.flops_per_token
    rng = np.random.default_rng(int(hashlib.sha256(f"{seed}:{run.run_id}".encode()).hexdigest()[:12], 16))
    loss = float(law.predict(counts.n_once, counts.n_rec, run.model.r, tokens))
    loss *= float(np.exp(noise * rng.standard_normal()))
    return {
        "run_id": run.run_id, "sweep": run.sweep, "variant": run.variant, "name": run.name, "status": "completed",
        "d_model": run.model.d_model, "size": run.size, "r": run.model.r, "n_once": counts.n_once,
        "n_rec": counts.n_rec, "n_embed": counts.n_embed, "flops_per_token": f, "tokens": tokens,
        "compute": training_compute(run.model, tokens), "budget_compute": run.compute, "val_loss": loss, "train_loss": loss, "steps": run.steps,
        "seed": run.seed, "lr": run.optim.lr, "batch_tokens": run.batch_tokens,
        "config": json.dumps(run.to_dict(), sort_keys=True), "versions": json.dumps({"synthetic": law.coefficients}),
        "finished_at": dt.datetime.now(dt.timezone.utc),
    }


def write_store(frame: pd.DataFrame, store: str | Path) -> Path:
    """Write rows as a results store folder: STORE/runs/<run_id>.parquet, one file per run."""
    runs = Path(store) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for _, row in frame.iterrows():
        table = pa.Table.from_pandas(row.to_frame().T.infer_objects(), preserve_index=False)
        pq.write_table(table, runs / f"{row['run_id']}.parquet")
    return Path(store)
