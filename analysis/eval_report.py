"""The downstream evals of a store as a table: one line per (task, run), the chosen metric at each test-time depth,
beside what the law prices the run at (effective parameters N_once + r^phi * N_rec at its trained r).

Needs neither lm-eval nor torch: it reads STORE/evals/ and STORE/runs/ only.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd

from training import results_store

from .law import ScalingLaw

RUN_COLUMNS = ["run_id", "name", "variant", "d_model", "r", "n_once", "n_rec", "compute", "tokens", "val_loss"]


def load_evals(store: str | os.PathLike, *, tasks: tuple[str, ...] | None = None,
               run_ids: list[str] | None = None, num_fewshot: int | None = None, limit: int | None = None,
               law: ScalingLaw | None = None) -> pd.DataFrame:
    """The stored eval rows (of `tasks` as requested, of `run_ids`, made with `num_fewshot` and `limit`, None being
    each task's own and all examples) joined with their runs' columns, plus `n_eff`: N_once + trained_r^phi * N_rec
    under `law`, or the unique parameters N_once + N_rec without one."""
    evals = results_store.read_evals(store).to_pandas()
    runs = results_store.read_runs(store).to_pandas()[RUN_COLUMNS]
    points = evals.merge(runs, on="run_id", how="inner")
    for column, value in (("num_fewshot", num_fewshot), ("limit", limit)):
        points = points[points[column].isna()] if value is None else points[points[column] == value]
    if tasks is not None:
        points = points[points["request"].isin(tasks)]
    if run_ids is not None:
        points = points[points["run_id"].isin(run_ids)]
    points = points.copy()
    points["variant"] = points["variant"].fillna("").astype(str)
    phi = None if law is None else law.phi  # a dense law (phi None) counts every unique parameter once
    weight = 1.0 if phi is None else np.power(points["r"].to_numpy(float), phi)
    points["n_eff"] = points["n_once"] + weight * points["n_rec"]
    return points.reset_index(drop=True)


def metric_of(points: pd.DataFrame, task: str, metric: str) -> str:
    """`metric` when the task has it, else the first metric it has (a generation task has no acc)."""
    have = sorted(points.loc[points["task"] == task, "metric"].unique())
    if metric in have or not have:
        return metric
    return have[0]


def eval_table(points: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """One row per (task, run): its labels, n_eff, validation loss, the metric at its trained depth and at every
    evaluated depth (columns r'=<depth>), the mean standard error, and chance."""
    rows: list[dict[str, Any]] = []
    for task, per_task in points.groupby("task", sort=True):
        name = metric_of(points, task, metric)
        chosen = per_task[per_task["metric"] == name]
        for run_id, g in chosen.groupby("run_id", sort=False):
            first = g.iloc[0]
            by_depth = g.drop_duplicates("depth").set_index("depth")
            row = {"task": task, "metric": name, "run_id": run_id, "variant": first["variant"],
                   "compute": first["compute"], "d_model": int(first["d_model"]), "r": int(first["r"]),
                   "n_eff": first["n_eff"], "val_loss": first["val_loss"],
                   "at_trained_r": by_depth["value"].get(int(first["r"]), math.nan),
                   "stderr": float(g["stderr"].mean()), "chance": float(g["chance"].mean())}
            row.update({f"r'={d}": v for d, v in by_depth["value"].sort_index().items()})
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    depth_columns = sorted((c for c in table.columns if c.startswith("r'=")), key=lambda c: int(c[3:]))
    front = [c for c in table.columns if not c.startswith("r'=")]
    # Runs of one budget differ in their exact FLOPs (whole steps): two significant digits group them.
    budget = table["compute"].map(lambda c: float(f"{c:.2g}"))
    order = table.assign(_budget=budget).sort_values(["task", "variant", "_budget", "d_model", "r"]).index
    return table.loc[order, front + depth_columns].reset_index(drop=True)


def format_eval_table(table: pd.DataFrame, *, law_note: str) -> str:
    """The table as text, one block per task."""
    if table.empty:
        return "no stored evals for these runs and tasks"
    blocks = []
    for task, t in table.groupby("task", sort=True):
        depth_columns = [c for c in t.columns if c.startswith("r'=") and t[c].notna().any()]
        shown = pd.DataFrame({
            "run": t["run_id"],
            "variant": t["variant"].replace("", "-"),
            "C": t["compute"].map("{:.3g}".format),
            "d": t["d_model"],
            "r": t["r"],
            "N_eff": t["n_eff"].map("{:.3g}".format),
            "val loss": t["val_loss"].map("{:.3f}".format),
            **{c: t[c].map(lambda v: "-" if pd.isna(v) else f"{v:.3f}") for c in depth_columns},
        })
        metric = t["metric"].iloc[0]
        chance = t["chance"].mean()
        head = (f"{task}: {metric} at each test-time r' (typical stderr {t['stderr'].mean():.3f}"
                + (f", chance {chance:.3f}" if math.isfinite(chance) else "") + f"; {law_note})")
        blocks.append(head + "\n" + shown.to_string(index=False))
    return "\n\n".join(blocks)
