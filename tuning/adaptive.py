"""The adaptive sweep: a Ray Tune Searcher that trains, each time a slot frees, the cell that narrows phi most per FLOP.

The first `initial_runs` cells are picked at the prior law; from then on the law is refitted as runs finish and the
next cell is the candidate (tuning.grid.candidate_cells) with the largest expected drop of phi's variance per FLOP at
the current fit (analysis.planning.greedy_design). Running cells count as part of the design already: the Fisher
information depends on where runs are, not on what they will measure. The sweep stops when phi's 95% half-width at
the current fit is at most target_phi_halfwidth, or when no candidate fits in what is left of max_flops, and says
which. That half-width is `plan`'s prediction made at the fitted law with the noise the residuals show
(analysis.planning.fitted_precision): unlike a measured interval it does not jump with each run's noise, so the sweep
does not stop on a lucky draw (which would leave intervals that cover less than they claim). The fit's
profile-likelihood interval is reported beside it.

The results store is the state: a rerun reads the finished runs back, refits, and carries on from there, so a killed
driver loses only the trials in flight (and training resumes those from their checkpoints); no run is trained twice.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any

import pandas as pd
from ray import tune
from ray.tune.search import Searcher

from analysis import ScalingLaw, engine, fit_law
from analysis.planning import DesignPoints, fitted_precision, greedy_design
from training import results_store
from training.storage import filesystem
from tuning.grid import Cell, LRPlan, candidate_cells
from tuning.interrupt import InterruptStopper
from tuning.progress import Progress
from tuning.spec import SweepSpec
from tuning.trainable import cell_payload
from tuning.tune_setup import METRIC, _dirname, _trainable, _tune_run_config, concurrency, stored_status

TARGET = "target"
BUDGET = "max_flops"
STOP_REASONS = {TARGET: "target half-width reached", BUDGET: "FLOP budget spent (no candidate fits what is left)"}


def load_prior(spec: SweepSpec):
    prior = spec.adaptive.prior
    law = ScalingLaw.reference() if prior == "reference" else ScalingLaw.load(prior)
    if law.phi is None:
        raise ValueError(f"adaptive.prior: {prior!r} is a dense law (no phi); give a looped law, e.g. reference")
    return law


class AdaptivePlanner:
    """The sweep's design so far (finished runs from the store, running cells) and the law it is planned at."""

    def __init__(self, spec: SweepSpec, cells: list[Cell], rows: list[dict[str, Any]]):
        self.spec, self.cells = spec, cells
        self.settings = spec.adaptive
        self.candidates = DesignPoints.from_runs([c.run for c in cells], [c.label for c in cells])
        self.index = {c.run_id: i for i, c in enumerate(cells)}
        self.rows: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, int] = {}  # Tune trial id -> candidate index
        self.failed: set[int] = set()  # failed in this driver: not picked again before a rerun
        self.prior = self.law = load_prior(spec)
        self.fit = None
        self.fitted_runs = 0
        # phi's 95% half-width at the latest fit: the Fisher prediction at the fitted law with the residuals' noise
        # (what `plan` predicts, now measured); inf before a fit that identifies the law
        self.halfwidth = math.inf
        self.stopped: str | None = None
        for row in rows:
            self.rows[row["run_id"]] = row
        self._maybe_refit()

    @classmethod
    def from_store(cls, spec: SweepSpec, cells: list[Cell]) -> "AdaptivePlanner":
        rows = [r for r in results_store.read_runs(spec.storage).to_pylist()
                if r["variant"] == spec.baseline.name and r["status"] in ("completed", "diverged")]
        return cls(spec, cells, rows)

    # ---- the design ---------------------------------------------------------------------------------------------
    @property
    def completed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows.values() if r["status"] == "completed"]

    @property
    def spent_flops(self) -> float:
        return float(sum(r["compute"] for r in self.rows.values()))

    @property
    def committed_flops(self) -> float:
        return self.spent_flops + float(sum(self.candidates.flops[i] for i in self.pending.values()))

    @staticmethod
    def _points(rows: list[dict[str, Any]]):
        return DesignPoints.from_arrays(*([r[k] for r in rows] for k in ("n_once", "n_rec", "r", "tokens", "compute")))

    def next_cell(self) -> tuple[int, Cell] | None:
        """The affordable candidate with the largest drop of var(phi) per FLOP; None when none fits."""
        taken = {self.index[run_id] for run_id in self.rows if run_id in self.index}
        exclude = taken | set(self.pending.values()) | self.failed
        base = self._points(self.completed).concat(self.candidates.subset(sorted(self.pending.values())))
        picks = greedy_design(self.law, self.candidates, base=base, exclude=exclude, max_runs=1,
                              max_flops=self.settings.max_flops - self.committed_flops)
        return (picks[0], self.cells[picks[0]]) if picks else None

    # ---- results ------------------------------------------------------------------------------------------------
    def record(self, row: dict[str, Any] | None, index: int) -> None:
        if row is None or row["status"] == "failed":
            self.failed.add(index)
            return
        self.rows[row["run_id"]] = row
        self._maybe_refit()

    def _maybe_refit(self, force: bool = False) -> None:
        # Every finished run is refitted: a refit costs a second, a run hours, and the last runs are the dearest.
        done = self.completed
        n = len(done)
        if n < self.settings.initial_runs or (n == self.fitted_runs and not force):
            return
        try:
            fit = fit_law(pd.DataFrame(done), bootstrap=0, extrapolation=False, form="looped", init=self.fit,
                          n_starts=engine.DEFAULT_N_STARTS if force else 4, profile=force)
        except (ValueError, RuntimeError):
            return  # not identifiable yet: keep planning at the current law
        self.fit, self.fitted_runs = fit, n
        self.halfwidth = fitted_precision(fit, self._points(done), [r["val_loss"] for r in done]).halfwidth["phi"]
        if math.isfinite(self.halfwidth):
            self.law = fit  # a fit whose runs leave a coefficient unidentified (E -> 0, say) is no law to plan at
        if self.halfwidth <= self.settings.target_phi_halfwidth:
            if not force:  # a quick refit may sit in a poorer local optimum: stop only on the full multistart's word
                self._maybe_refit(force=True)
                return
            self.stopped = TARGET

    def report(self) -> dict[str, Any]:
        """Refit every finished run (full multistart) and say why the sweep stopped."""
        self._maybe_refit(force=True)
        if self.halfwidth <= self.settings.target_phi_halfwidth:
            self.stopped = TARGET
        elif self.next_cell() is None:
            self.stopped = BUDGET
        return {
            "stopped": self.stopped, "reason": STOP_REASONS.get(self.stopped, "not finished"),
            "runs": len(self.rows), "completed": len(self.completed), "flops": self.spent_flops,
            "max_flops": self.settings.max_flops, "target_phi_halfwidth": self.settings.target_phi_halfwidth,
            "phi": None if self.fit is None else self.fit.phi, "phi_halfwidth": self.halfwidth,
            "phi_profile": None if self.fit is None else list(self.fit.ci.get("phi_profile", ())),
        }


class AdaptiveSearcher(Searcher):
    """Tune asks for a trial whenever a slot frees; the planner answers with its next cell, or FINISHED."""

    def __init__(self, planner: AdaptivePlanner, metric: str = "val_loss", mode: str = "min"):
        super().__init__(metric=metric, mode=mode)
        self.planner = planner

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        planner = self.planner
        if planner.stopped:
            return Searcher.FINISHED
        pick = planner.next_cell()
        if pick is None:
            if planner.pending:
                return None  # what the running cells measure may still reach the target
            planner.stopped = BUDGET
            return Searcher.FINISHED
        index, cell = pick
        planner.pending[trial_id] = index
        return {"cell": cell_payload(cell.run, r=cell.r, label=cell.label)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        index = self.planner.pending.pop(trial_id, None)
        if index is not None:
            self.planner.record(results_store.read_run(self.planner.spec.storage, self.planner.cells[index].run_id),
                                index)

    # The results store is the state: a rerun rebuilds the planner from it, not from Tune's experiment checkpoint.
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


def adaptive_stage(spec: SweepSpec, plan: LRPlan, out=sys.stdout, interrupt=None,
                   trainable=None, connect=lambda: None) -> tuple[dict[str, int], dict]:
    """Run the adaptive sweep to its stop (`connect()` brings up Ray first when it has not stopped already); returns
    (run counts by status, the stop report). Raises SweepInterrupted when `interrupt` (tuning.interrupt) fires: the
    store keeps what finished, and a rerun carries on."""
    cells = candidate_cells(spec, plan)
    planner = AdaptivePlanner.from_store(spec, cells)
    a = spec.adaptive
    print(f"adaptive: {len(cells)} candidate cells; {len(planner.rows)} runs already in the store "
          f"({planner.spent_flops:.3g} FLOPs); stop at phi +-{a.target_phi_halfwidth:g} (95%, at the current fit) or "
          f"{a.max_flops:.3g} FLOPs; first {a.initial_runs} runs planned at the {a.prior} law", file=out, flush=True)
    if not planner.stopped:
        connect()
        progress = Progress("adaptive", total=len(cells), skipped=len(planner.rows), out=out)
        tuner = tune.Tuner(
            _trainable(spec, trainable),
            # reuse_actors: a trial only drives its cell's TorchTrainer; keeping its actor saves a process per cell
            tune_config=tune.TuneConfig(search_alg=AdaptiveSearcher(planner, METRIC), metric=METRIC, mode="min",
                                        num_samples=-1, max_concurrent_trials=concurrency(spec), reuse_actors=True,
                                        trial_dirname_creator=_dirname),
            run_config=_tune_run_config(spec, "adaptive", [progress], InterruptStopper(interrupt)),
        )
        tuner.fit()
        print(progress.summary(), file=out, flush=True)
        if interrupt is not None:
            interrupt.raise_if_requested(f"{len(stored_status(spec.storage))} runs stored; the adaptive sweep "
                                         "carries on from them")
    final = AdaptivePlanner.from_store(spec, cells)  # the store, not Tune's copy of the searcher, is the record
    report = final.report()
    phi = "no fit yet" if report["phi"] is None else f"phi {report['phi']:.4g} +- {report['phi_halfwidth']:.3g}"
    if report["phi_profile"]:
        phi += " (profile-likelihood 95% CI [{:.4g}, {:.4g}])".format(*report["phi_profile"])
    print(f"adaptive: stopped: {report['reason']}; {report['completed']} runs, {report['flops']:.3g} FLOPs "
          f"({report['flops'] / a.max_flops:.0%} of max_flops), {phi}; target +-{a.target_phi_halfwidth:g}",
          file=out, flush=True)
    _save_report(spec.storage, report)
    counts: dict[str, int] = {}
    for row in final.rows.values():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts, report


def _save_report(storage: str, report: dict) -> None:
    fs, root = filesystem(storage)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root.rstrip('/')}/adaptive.json") as f:
        f.write(json.dumps(report, indent=1).encode())
