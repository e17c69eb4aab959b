"""Do the loops work? The idle-loop check that goes with every reported phi.

A looped run whose held-out loss at one recurrence equals its loss at the trained r has not learned to use its
loop: fitting r^phi to such runs prices shallow networks, not recurrence. Per looped run the check reads the loop
gain, L(r'=1) - L(trained r) on the run's own validation tokens (the row's `loss_r1`, or the run's depth table in
stores written before that column), and calls a run idle when its gain is below `IDLE_SD_MULTIPLE` seed standard
deviations: a loop worth less than the run-to-run noise cannot be what the fit's r axis resolves.

The seed noise is measured, not assumed: the pooled sd of runs that differ only in their seed (the sweep's
`seed_noise` cells beside their baseline cell); where a store has none, the fit's residual sd stands in (and is
printed beside the replicate figure when both exist, so one checks the other).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from training import results_store

IDLE_SD_MULTIPLE = 2.0  # gain below 2 seed sd: the loop is indistinguishable from noise
MIN_REPLICATE_DOF = 3  # e.g. 3 seeds of 2 cells (4 dof); fewer and the fit's residuals may stand in
FALLBACK_NOISE_SD = 0.01  # nats; only when neither replicates nor a fit measure the noise (said in the report)
# Fields that make two rows the same experiment apart from the seed (the seed-noise variant re-runs a baseline cell).
REPLICATE_KEYS = ("d_model", "r", "n_prelude", "n_rec_layers", "n_coda", "injection", "bptt_k", "hc_lanes",
                  "head_dim", "seq_len", "vocab_size", "tokens", "lr", "batch_tokens")


@dataclass(frozen=True)
class SeedNoise:
    """Run-to-run spread of the final loss (nats)."""

    sd: float
    source: str  # "replicates" | "residuals" | "assumed"
    n_groups: int = 0  # cells with two or more seeds
    n_runs: int = 0
    replicate_sd: float = math.nan
    residual_sd: float = math.nan

    def describe(self) -> str:
        parts = []
        if math.isfinite(self.replicate_sd):
            parts.append(f"{self.replicate_sd:.4f} nats from {self.n_runs} runs of {self.n_groups} cell(s) that differ "
                         "only in their seed")
        if math.isfinite(self.residual_sd):
            parts.append(f"fit residual sd {self.residual_sd:.4f}")
        if self.source == "residuals" and math.isfinite(self.replicate_sd):
            parts.append("the larger is used: the replicates have too few degrees of freedom")
        if self.source == "assumed":
            parts.append(f"not measured: {self.sd:g} nats assumed (add seed_noise cells to the spec)")
        return "seed sd " + "; ".join(parts)


def replicate_noise(frame: pd.DataFrame) -> tuple[float, int, int]:
    """Pooled sd of the final loss over groups of completed runs that differ only in their seed:
    (sd, groups, runs); NaN when no group has two seeds."""
    f = frame[frame["status"] == "completed"] if "status" in frame else frame
    keys = [k for k in REPLICATE_KEYS if k in f]
    if "seed" not in f or not keys or f.empty:
        return math.nan, 0, 0
    ss, dof, groups, runs = 0.0, 0, 0, 0
    for _, g in f.groupby(keys, sort=False, dropna=False):  # a column null in both rows still matches
        losses = g.drop_duplicates("seed")["val_loss"].to_numpy(dtype=float)
        losses = losses[np.isfinite(losses)]
        if len(losses) >= 2:
            ss += float(((losses - losses.mean()) ** 2).sum())
            dof += len(losses) - 1
            groups += 1
            runs += len(losses)
    return (math.sqrt(ss / dof) if dof else math.nan), groups, runs


def seed_noise(store_frame: pd.DataFrame | None, residual_sd: float = math.nan) -> SeedNoise:
    """The replicates' pooled sd when they have MIN_REPLICATE_DOF degrees of freedom; with fewer (one seed pair
    says little: pairs of one cell were seen 0.009 and 0.05 apart), the larger of it and the fit's residual sd."""
    sd, groups, runs = replicate_noise(store_frame) if store_frame is not None else (math.nan, 0, 0)
    if math.isfinite(sd) and sd > 0:
        if runs - groups < MIN_REPLICATE_DOF and math.isfinite(residual_sd) and residual_sd > sd:
            return SeedNoise(residual_sd, "residuals", groups, runs, sd, residual_sd)
        return SeedNoise(sd, "replicates", groups, runs, sd, residual_sd)
    if math.isfinite(residual_sd) and residual_sd > 0:
        return SeedNoise(residual_sd, "residuals", residual_sd=residual_sd)
    return SeedNoise(FALLBACK_NOISE_SD, "assumed")


def loop_gains(frame: pd.DataFrame, depths: pd.DataFrame | None) -> pd.Series:
    """Per row: L(r'=1) - L(trained r), from the row's loss_r1 or else its depth table (NaN where neither has it;
    r = 1 rows have no loop and get NaN)."""
    gain = pd.Series(np.nan, index=frame.index, dtype=float)
    if "loss_r1" in frame:
        gain = (frame["loss_r1"].astype(float) - frame["val_loss"].astype(float)).where(frame["loss_r1"].notna())
    if depths is not None and not depths.empty and "run_id" in frame:
        at = depths.pivot_table(index="run_id", columns="eval_r", values="val_loss", aggfunc="first")
        trained = depths.groupby("run_id")["trained_r"].first()
        from_table = {}
        for run_id in at.index:
            row = at.loc[run_id]
            r = int(trained[run_id])
            if 1 in row.index and r in row.index and np.isfinite(row[1]) and np.isfinite(row[r]):
                from_table[run_id] = float(row[1] - row[r])
        filled = frame["run_id"].map(from_table)
        gain = gain.where(gain.notna(), filled)
    looped = frame["r"].astype(int) > 1
    return gain.where(looped)


@dataclass
class LoopCheck:
    """The verdict on one set of fitted runs (one variant)."""

    runs: pd.DataFrame  # looped runs: label, r, d_model, compute, loop_gain, e_state_ratio, state_change, idle
    noise: SeedNoise
    threshold: float
    variant: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def measured(self) -> pd.DataFrame:
        return self.runs[self.runs["loop_gain"].notna()]

    @property
    def idle(self) -> list[str]:
        return self.measured[self.measured["idle"]]["label"].tolist()

    @property
    def warning(self) -> str | None:
        m = self.measured
        if m.empty or not self.idle:
            return None
        names = ", ".join(f"{row.label} (gain {row.loop_gain:+.4f})" for row in m[m["idle"]].itertuples())
        share = len(self.idle) / len(m)
        meaning = ("phi here prices shallow networks, not recurrence: do not read it as what a loop is worth"
                   if share >= 0.5 else "these runs pull phi toward what a shallower network is worth")
        working = self.working_budgets()
        if working:
            meaning += (f"; at {', '.join(f'C={c:.3g}' for c in working)} every looped run uses its loops: "
                        f"only there does the r axis measure recurrence")
        return (f"{len(self.idle)} of {len(m)} looped runs leave their loops idle (loss at one recurrence within "
                f"{self.threshold:.4f} nats = {IDLE_SD_MULTIPLE:g} seed sd of the trained r's; {self.by_budget()}): "
                f"{names}; {meaning}")

    def _budgets(self) -> list[tuple[float, pd.DataFrame]]:
        """The measured looped runs per budget, smallest first; none when no run knows its budget."""
        m = self.measured
        if m["compute"].isna().all():
            return []
        return [(float(c), g) for c, g in m.groupby("compute", sort=True)]

    def working_budgets(self) -> list[float]:
        """The budgets at which no looped run is idle, smallest first."""
        return [c for c, g in self._budgets() if not g["idle"].any()]

    def by_budget(self) -> str:
        """Idle / measured looped runs per budget: loops often switch on only in the longer runs."""
        parts = [f"C={c:.3g}: {int(g['idle'].sum())}/{len(g)} idle" for c, g in self._budgets()]
        return ", ".join(parts) if parts else "budgets unknown"

    def line(self) -> str:
        m = self.measured
        if m.empty:
            return "loops: no looped run with a loss at one recurrence (no depth table, no loss_r1): not checked"
        working = len(m) - len(self.idle)
        gains = m["loop_gain"]
        text = (f"loops: {working}/{len(m)} looped runs use their loops (gain from r'=1 to the trained r "
                f"{gains.min():+.4f} to {gains.max():+.4f} nats; {self.by_budget()}; threshold {self.threshold:.4f} = "
                f"{IDLE_SD_MULTIPLE:g} x {self.noise.describe()})")
        unmeasured = len(self.runs) - len(m)
        if unmeasured:
            text += f"; {unmeasured} looped run(s) without a loss at one recurrence"
        return text

    def to_dict(self) -> dict[str, Any]:
        m = self.measured
        return {
            "variant": self.variant, "n_looped": int(len(self.runs)), "n_measured": int(len(m)),
            "n_working": int(len(m) - len(self.idle)), "idle": self.idle, "threshold": self.threshold,
            "seed_sd": self.noise.sd, "seed_sd_source": self.noise.source, "replicate_sd": self.noise.replicate_sd,
            "residual_sd": self.noise.residual_sd, "replicate_groups": self.noise.n_groups,
            "gains": {row.label: row.loop_gain for row in m.itertuples()},
            "by_budget": self.by_budget(),
            "warning": self.warning,
        }


def check_loops(frame: pd.DataFrame, *, store_frame: pd.DataFrame | None = None, depths: pd.DataFrame | None = None,
                residual_sd: float = math.nan, variant: str | None = None) -> LoopCheck:
    """The idle-loop check of the runs in `frame` (the fitted rows); `store_frame` is the whole store (for
    seed replicates outside the fitted variant), `depths` its depth tables."""
    noise = seed_noise(store_frame if store_frame is not None else frame, residual_sd)
    threshold = IDLE_SD_MULTIPLE * noise.sd
    looped = frame[frame["r"].astype(int) > 1]
    gains = loop_gains(looped, depths) if not looped.empty else pd.Series(dtype=float)
    label = looped["name"] if "name" in looped else looped.get("run", looped.index.to_series())
    label = label.fillna("").astype(str)
    if "run_id" in looped:
        label = label.where(label != "", looped["run_id"])

    def column(name: str) -> pd.Series:
        return looped[name].astype(float) if name in looped else pd.Series(np.nan, index=looped.index)

    compute = looped["budget_compute"] if "budget_compute" in looped else looped.get("compute")
    if compute is not None:
        compute = compute.where(compute.notna(), looped.get("compute"))
        # a cooldown branch carries its parent's name: the budget tells them apart
        label = label.where(~label.duplicated(keep=False), label + compute.map(lambda c: f" @C={c:.3g}"))
    ratio = column("e_rms") / column("state_rms")
    runs = pd.DataFrame({"label": label, "r": looped["r"].astype(int),
                         "d_model": looped["d_model"] if "d_model" in looped else np.nan,
                         "compute": compute if compute is not None else np.nan,
                         "loop_gain": gains, "e_state_ratio": ratio, "state_change": column("state_change")})
    runs["idle"] = runs["loop_gain"] < threshold
    return LoopCheck(runs=runs.reset_index(drop=True), noise=noise, threshold=threshold, variant=variant)


def check_store(store: Any, frame: pd.DataFrame, residual_sd: float = math.nan,
                variant: str | None = None) -> LoopCheck:
    """check_loops with the store's own rows (seed replicates) and depth tables."""
    store_frame = results_store.read_runs(store).to_pandas()
    depths = results_store.read_depths(store).to_pandas()
    return check_loops(frame, store_frame=store_frame, depths=depths, residual_sd=residual_sd, variant=variant)


def residuals_by_r(frame: pd.DataFrame, predicted: np.ndarray) -> dict[int, float]:
    """Mean (measured - predicted) loss per r, nats: a law that fits every r has these near zero."""
    res = frame["val_loss"].to_numpy(dtype=float) - np.asarray(predicted, dtype=float)
    r = frame["r"].astype(int).to_numpy()
    return {int(v): float(res[r == v].mean()) for v in sorted(set(r.tolist()))}
