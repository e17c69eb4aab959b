"""Run an iso-depth x compute sweep on Ray Tune, then fit the law.

    python tuning/sweep.py [--config SPEC] [--storage DIR]
    ray job submit --working-dir . -- python tuning/sweep.py --config SPEC

Stages: (1) the LR search (when the spec's LR rule is `tuned`): TPE over log-LR at one small cell, bad trials
pruned by the Optuna pruner through tuning.pruning; (2) the grid: one Tune trial per cell not yet in the results
store, LR transferred from the search (or, with `adaptive:` in the spec, tuning.adaptive's sweep: one cell at a
time where it narrows phi most per FLOP, until a target half-width or a FLOP budget); (3) the fit (analysis): law
JSON and plots in the store, and per variant whether test-time recurrences beyond the trained r help or hurt.
The console carries these stages' own lines; Ray's and Tune's messages go to STORE/logs/ (tuning.console).
Rerunning the same spec resumes: stored runs are skipped, interrupted ones relaunched (training resumes them from
their checkpoints), the Optuna study reopened. Ctrl-C (or `ray job stop`) stops it cleanly: it says how far it got
and how to resume, fits nothing from a partial grid unless --fit-partial, and exits 130 (a second Ctrl-C stops at
once; see tuning.interrupt). Attaches to RAY_ADDRESS when set, else starts a private local Ray (training.ray_session).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a plain script: make tuning/, training/, models/ importable
    sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402

import analysis  # noqa: E402
from analysis import plots  # noqa: E402
from analysis.depth import depth_curves, variant_verdicts  # noqa: E402
from models.injection import check_plugins  # noqa: E402
from training import results_store  # noqa: E402
from training.ray_session import ray_session  # noqa: E402
from training.storage import absolute, filesystem  # noqa: E402
from training.store_errors import StoreFailed, probe_store, store_failure  # noqa: E402
from training.store_lock import StoreLock, StoreLocked  # noqa: E402
from tuning import console  # noqa: E402
from tuning import progress as trial_progress  # noqa: E402
from tuning.adaptive import adaptive_stage  # noqa: E402
from tuning.interrupt import Interrupt, InterruptStopper, SweepInterrupted  # noqa: E402
from tuning.grid import (Cell, LRPlan, expand, lr_plan, round_lr, search_cell, search_storage, seed_noise_bases,  # noqa: E402
                         seed_noise_cells, trials, validate)
from tuning.plan import isoflop_optima  # noqa: E402
from tuning.progress import Progress  # noqa: E402
from tuning.pruning import (OptunaBridge, OptunaPruningScheduler, StudySearcher, finished_trials,  # noqa: E402
                            make_pruner, open_study, recover_interrupted)
from tuning.spec import SweepSpec  # noqa: E402
from tuning.trainable import cell_payload  # noqa: E402
from tuning.tune_setup import (METRIC, _dirname, _trainable, _tune_run_config, concurrency,  # noqa: E402
                               stored_status)

DEFAULT_CONFIG = REPO / "tuning" / "configs" / "laptop.yaml"


def absolute_storage(spec: SweepSpec) -> SweepSpec:
    """Trials run in other processes (other cwd): a local store must be an absolute path."""
    return spec.replace(storage=absolute(spec.storage))


# ---- Ray ----------------------------------------------------------------------------------------------------------
# ---- stage 1: LR search ---------------------------------------------------------------------------------------------
def lr_stage(spec: SweepSpec, out=sys.stdout, interrupt: Interrupt | None = None, connect=lambda: None) -> float:
    """Run the Optuna LR search to its trial budget (continuing the stored study) and return the best LR; `connect()`
    brings up Ray first when a trial is left to run. Raises SweepInterrupted when `interrupt` fires, leaving no
    trial of the study RUNNING."""
    s = spec.lr.search
    if "://" not in spec.storage:
        Path(spec.storage).mkdir(parents=True, exist_ok=True)
    if spec.optuna_storage.startswith("sqlite:///"):  # SQLite opens a file but never makes its folder
        Path(spec.optuna_storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(f"{spec.name}-lr", spec.optuna_storage, pruner=make_pruner(s.pruner, s.startup_trials,
                       dict(s.pruner_args)), seed=s.seed, startup_trials=s.startup_trials)
    resumed = recover_interrupted(study)
    if resumed:
        print(f"lr search: re-queued {len(resumed)} trial(s) interrupted by a previous driver", file=out, flush=True)
    for lr in s.enqueue:
        study.enqueue_trial({"lr": lr}, skip_if_exists=True)
    done = finished_trials(study)
    remaining = s.trials - done
    base = search_cell(spec)
    print(f"lr search: {done}/{s.trials} trials already in study {study.study_name!r} ({spec.optuna_storage}); "
          f"cell d_model={base.model.d_model} r={base.model.r} C={base.compute:.3g}, LR in [{s.low:g}, {s.high:g}], "
          f"pruner {s.pruner}", file=out, flush=True)
    if remaining > 0:
        connect()
        # Rounded as the grid's transferred LRs are, so the search cell at the best LR has the run id of its grid
        # cell and is reused rather than trained again.
        bridge = OptunaBridge(study, suggest=lambda t: {"lr": round_lr(t.suggest_float("lr", s.low, s.high,
                                                                                       log=True))},
                              metric=METRIC)
        progress = Progress("lr search", total=s.trials, skipped=done, out=out, stopped="pruned")
        tuner = tune.Tuner(
            _trainable(spec),
            param_space=cell_payload(base, r=base.model.r, label="lr"),
            tune_config=tune.TuneConfig(search_alg=StudySearcher(bridge), scheduler=OptunaPruningScheduler(bridge),
                                        metric=METRIC, mode="min", num_samples=remaining,
                                        max_concurrent_trials=concurrency(spec, s.concurrency),
                                        trial_dirname_creator=_dirname),
            run_config=_tune_run_config(spec, "lr", [progress], InterruptStopper(interrupt, bridge.abandon_live)),
        )
        tuner.fit()
        print(progress.summary(), file=out, flush=True)
        if interrupt is not None:
            interrupt.raise_if_requested(f"lr search {finished_trials(study)} of {s.trials} trials done, "
                                         "grid not started")
    summary_of_study(study, out)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"lr search: no trial of study {study.study_name!r} completed; widen lr.search.low/high, "
                           "raise lr.search.trials or check the trial logs")
    return round_lr(float(study.best_trial.params["lr"]))


def summary_of_study(study: Any, out=sys.stdout) -> None:
    study_trials = study.get_trials(deepcopy=False)
    by_state = {}
    for t in study_trials:
        by_state[t.state.name] = by_state.get(t.state.name, 0) + 1
    print(f"lr search study: {by_state}", file=out, flush=True)
    for t in sorted(study_trials, key=lambda t: t.number):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            last = t.value if t.state == TrialState.COMPLETE else (
                t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else math.nan)
            print(f"  #{t.number:<3} lr {t.params.get('lr', math.nan):.4g}  {t.state.name:<8} val_loss {last:.4f}",
                  file=out, flush=True)


# ---- stage 2: the grid ---------------------------------------------------------------------------------------------
def report_quarantined(store: str, out=sys.stdout) -> None:
    """Name the run files the store reader moved aside: their cells have no row, so the grid trains them again."""
    bad = results_store.quarantined(store)
    if bad:
        print(f"store: {len(bad)} unreadable run file(s) moved to runs/_quarantine/ (a cell without a readable row "
              f"is trained again): " + "; ".join(f"{q.file} ({q.reason[:120]})" for q in bad), file=out, flush=True)


def reuse_search_runs(spec: SweepSpec, cells: list[Cell], stored: dict[str, str], out=sys.stdout) -> int:
    """A grid cell identical to an LR-search run (same run id: the search cell at the best LR) is copied from the
    search store, relabelled, instead of being trained again."""
    search = search_storage(spec)
    copied = 0
    for c in cells:
        if stored.get(c.run_id) in ("completed", "diverged"):
            continue
        row = results_store.read_run(search, c.run_id)
        if row is None or row["status"] not in ("completed", "diverged"):
            continue
        row.update(sweep=c.run.sweep, variant=c.run.variant, name=c.run.name,
                   config=json.dumps(c.run.to_dict(), sort_keys=True))
        depths = results_store.read_depths(search, c.run_id).to_pylist()
        if depths:
            results_store.write_depths(spec.storage, c.run_id, depths)
        results_store.write_run(spec.storage, row, results_store.read_curve(search, c.run_id).to_pylist())
        stored[c.run_id] = row["status"]
        copied += 1
    if copied:
        print(f"grid: {copied} cell(s) taken from the LR search's identical runs", file=out, flush=True)
    return copied


def grid_stage(spec: SweepSpec, cells: list[Cell], out=sys.stdout, interrupt: Interrupt | None = None,
               trainable=None, connect=lambda: None) -> dict[str, int]:
    """Train every cell not yet in the store (`connect()` brings up Ray first when there is one); returns the cells'
    counts by stored status ("missing": no row). Raises SweepInterrupted when `interrupt` fires."""
    stored = stored_status(spec.storage)
    report_quarantined(spec.storage, out)
    if spec.lr.rule == "tuned":
        reuse_search_runs(spec, cells, stored, out)
    todo = [c for c in cells if stored.get(c.run_id) not in ("completed", "diverged")]
    skipped = len(cells) - len(todo)
    runs = trials(cells, {c.run_id for c in cells if c not in todo})
    print(f"grid: {len(cells)} cells, {skipped} already in the store, {len(todo)} to run in {len(runs)} trials",
          file=out, flush=True)
    if todo:
        connect()
        progress = Progress("grid", total=len(cells), skipped=skipped, out=out)
        tuner = tune.Tuner(
            _trainable(spec, trainable),
            param_space={"cell": tune.grid_search([cell_payload(run, r=c.r, label=c.label) for run, c in runs])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency(spec), trial_dirname_creator=_dirname),
            run_config=_tune_run_config(spec, "grid", [progress], InterruptStopper(interrupt)),
        )
        tuner.fit()
        print(progress.summary(), file=out, flush=True)
    stored = stored_status(spec.storage)
    counts: dict[str, int] = {}
    for c in cells:
        status = stored.get(c.run_id, "missing")
        counts[status] = counts.get(status, 0) + 1
    if interrupt is not None:
        done = counts.get("completed", 0) + counts.get("diverged", 0)
        interrupt.raise_if_requested(f"{done} of {len(cells)} runs stored, {len(cells) - done} left")
    return counts


# ---- stage 3: the fit ----------------------------------------------------------------------------------------------
def fit_stage(spec: SweepSpec, out=sys.stdout) -> Any:
    """Fit the baseline law (and phi probes for the other variants) with analysis; write law JSON and plots next to
    the results. Skipped with a message when the runs cannot identify the law."""
    local = "://" not in spec.storage
    folder = Path(spec.storage) if local else Path(tempfile.mkdtemp(prefix=f"law-{os.getpid()}-"))
    try:
        return _fit_into(spec, folder, local, out)
    finally:  # also on an interrupt (tuning.interrupt raises inside the fit) or an error: no temp folder left
        if not local:
            shutil.rmtree(folder, ignore_errors=True)


def _fit_into(spec: SweepSpec, folder: Path, local: bool, out) -> Any:
    base = spec.baseline.name
    try:
        law = analysis.fit_law(spec.storage, bootstrap=spec.fit.bootstrap, seed=spec.fit.seed, variant=base)
    except ValueError as exc:
        print(f"fit: skipped ({exc})", file=out, flush=True)
        return None
    print(f"fit ({base}, {law.n_runs} runs):\n{law.summary()}", file=out, flush=True)
    law.save(folder / "law.json")
    report_isoflop_optima(spec, law, out)
    for v in spec.variants:
        if v.name == base or law.phi is None:
            continue
        try:
            probe = analysis.fit_probe(spec.storage, baseline=law, variant=v.name, bootstrap=spec.fit.bootstrap,
                                       seed=spec.fit.seed)
        except ValueError as exc:
            print(f"fit probe {v.name}: skipped ({exc})", file=out, flush=True)
            continue
        lo_hi = probe.ci.get("phi")
        ci = f" (95% CI {lo_hi[0]:.3f}-{lo_hi[1]:.3f})" if lo_hi else ""
        print(f"fit probe {v.name}: phi = {probe.phi:.3f}{ci} on {probe.n_runs} runs", file=out, flush=True)
        loops = probe.meta.get("loops") or {}
        if probe.meta.get("loops_line"):
            print(f"fit probe {v.name}: {probe.meta['loops_line']}", file=out, flush=True)
        if loops.get("warning"):
            print(f"fit probe {v.name}: WARNING: {loops['warning']}", file=out, flush=True)
        probe.save(folder / f"law_{v.name}.json")
        # The probe holds the baseline's coefficients exact; the joint fit states delta phi with the baseline's own
        # uncertainty in its intervals (analysis.compare).
        try:
            joint = analysis.compare(spec.storage, v.name, baseline=base, bootstrap=spec.fit.bootstrap,
                                     seed=spec.fit.seed)
        except ValueError as exc:
            print(f"compare {v.name}: skipped ({exc})", file=out, flush=True)
            continue
        print(f"compare {v.name}: {joint.line()}", file=out, flush=True)
        for warning in joint.warnings:
            print(f"compare {v.name}: WARNING: {warning}", file=out, flush=True)
        joint.save(folder / f"compare_{v.name}.json")
    _plots(spec, law, folder / "plots", out)
    if not local:
        _upload(folder, spec.storage)
    print(f"fit: law written to {spec.storage.rstrip('/')}/law.json, plots in {spec.storage.rstrip('/')}/plots/",
          file=out, flush=True)
    return law


def seed_noise_stage(spec: SweepSpec, cells: list[Cell], out=sys.stdout) -> dict[str, Any] | None:
    """The final loss of each seed-noise cell under its seeds, and the pooled spread (the sd the idle-loop check
    and the fit's residuals are read against), when the spec asks for it."""
    if not spec.seed_noise:
        return None
    per_cell, ss, dof = [], 0.0, 0
    extra = seed_noise_cells(spec, cells)
    for base in seed_noise_bases(spec, cells):
        runs = [base] + [c for c in extra if (c.compute, c.width, c.r) == (base.compute, base.width, base.r)]
        rows = [results_store.read_run(spec.storage, c.run_id) for c in runs]
        losses = {c.run.seed: row["val_loss"] for c, row in zip(runs, rows)
                  if row is not None and row["status"] == "completed"}
        if len(losses) < 2:
            print(f"seed noise: {len(losses)} of {len(runs)} seeds of {base.label} stored; nothing to compare",
                  file=out, flush=True)
            continue
        values = list(losses.values())
        sd = statistics.stdev(values)
        ss, dof = ss + sd ** 2 * (len(values) - 1), dof + len(values) - 1
        listed = ", ".join(f"{v:.4f} (seed {k})" for k, v in losses.items())
        print(f"seed noise at {base.label}: val_loss {listed}; sd {sd:.4f} nats = {sd / statistics.fmean(values):.2%}"
              " of the loss", file=out, flush=True)
        per_cell.append({"cell": base.label, "losses": losses, "sd": sd})
    if not dof:
        return None
    pooled = math.sqrt(ss / dof)
    print(f"seed noise: pooled sd {pooled:.4f} nats over {len(per_cell)} cell(s), {dof} degrees of freedom",
          file=out, flush=True)
    return {"cells": per_cell, "sd": pooled, "dof": dof}


def report_isoflop_optima(spec: SweepSpec, law: Any, out=sys.stdout) -> list[dict[str, Any]]:
    """The law's compute-optimal width at each budget (per r): the grid pins the parameter term only where it
    brackets that width."""
    optima = isoflop_optima(spec, law)
    by_budget: dict[float, list[dict]] = {}
    for o in optima:
        by_budget.setdefault(o["budget"], []).append(o)
    for budget, rows in by_budget.items():
        widths = " ".join(f"r={o['r']}:{o['width']}" for o in rows)
        print(f"  compute-optimal width at C={budget:.3g} (law): {widths}  (grid {rows[0]['grid']})", file=out,
              flush=True)
    outside = [o for o in optima if not o["interior"]]
    if outside:
        where = ", ".join(f"C={o['budget']:.3g} r={o['r']} (width {o['width']})" for o in outside)
        print(f"  WARNING: the law's compute-optimal width is at the edge of the grid's widths at {where}: move "
              "that budget's widths toward it so its IsoFLOP curve has an interior minimum", file=out, flush=True)
    return optima


def depth_stage(spec: SweepSpec, out=sys.stdout) -> list[dict[str, Any]]:
    """Per variant: do test-time recurrences beyond the trained r help or hurt on average (analysis.depth)?"""
    try:
        verdicts = variant_verdicts(depth_curves(spec.storage, bootstrap=0))
    except ValueError as exc:
        print(f"test-time depth: skipped ({exc})", file=out, flush=True)
        return []
    for v in verdicts:
        print(f"test-time depth {v['variant'] or '-'}: extra recurrences {v['verdict']} on average (loss "
              f"{-v['mean_gain']:+.4f} nats from trained r to the largest evaluated r; {v['n_help']}/{v['n_runs']} "
              f"runs improve); `python -m analysis depth {spec.storage}` for the table", file=out, flush=True)
    return verdicts


def _plots(spec: SweepSpec, law: Any, folder: Path, out) -> None:
    paths = plots.plot_all(analysis.load_runs(spec.storage, variant=spec.baseline.name), law, folder)
    print(f"fit: {len(paths)} plots: {', '.join(Path(p).name for p in paths)}", file=out, flush=True)


def _upload(folder: Path, uri: str) -> None:
    fs, root = filesystem(uri)
    pafs.copy_files(str(folder), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    shutil.rmtree(folder, ignore_errors=True)


# ---- driver ----------------------------------------------------------------------------------------------------
EXIT_LOCKED = 75  # EX_TEMPFAIL: another driver writes this store; wait, or take over a dead one
EXIT_STORE = 74  # EX_IOERR: the store could not be written (full, read-only, permission, lost mount)


def run_sweep(spec: SweepSpec, *, num_cpus: int | None = None, fit: bool = True, fit_partial: bool = False,
              worker_logs: bool = False, out=sys.stdout, trainable=None, takeover: bool = False,
              wait: bool = False, command: str | None = None) -> dict[str, Any]:
    """Validate, take the store's writer lock, connect, run the stages; returns {best_lr, plan, cells, counts, law,
    depth} (and `adaptive`, the stop report of an adaptive sweep). On SIGINT / SIGTERM it prints how far it got and
    raises SweepInterrupted, after fitting the partial grid only if `fit_partial`. `trainable` replaces the cell
    trainable (tests: a planted law instead of training).

    One writer per store (training.store_lock): another live sweep on the same store raises StoreLocked before
    anything is written (`wait`: wait for it; `takeover`: take its lock anyway). A store that fails (full, read-only,
    lost) raises StoreFailed naming it and the error."""
    spec = absolute_storage(spec)
    cells = validate(spec)  # every cell's RunConfig: a bad spec fails here, before Ray starts
    lock = StoreLock(spec.storage, command=command)
    try:
        lock.acquire(takeover=takeover, wait=wait, on_wait=lambda h: print(
            f"store lock: {spec.storage} is in use by {h.describe()}; waiting for it", file=out, flush=True))
    except OSError as exc:  # the store cannot even hold its lock (read-only, permission, lost mount)
        raise store_failure(spec.storage, exc) or exc from exc
    try:
        if lock.took_over is not None:
            print(f"store lock: took over {spec.storage} from {lock.took_over.describe()}: "
                  f"{lock.took_over_reason}", file=out, flush=True)
        return _run_locked(spec, cells, lock, num_cpus=num_cpus, fit=fit, fit_partial=fit_partial,
                           worker_logs=worker_logs, out=out, trainable=trainable)
    except (SweepInterrupted, KeyboardInterrupt):
        raise
    except Exception as exc:
        failed = store_failure(spec.storage, exc)
        if failed is None:
            raise
        raise failed from exc
    finally:
        lock.release()


def _run_locked(spec: SweepSpec, cells: list[Cell], lock: Any, *, num_cpus, fit, fit_partial, worker_logs, out,
                trainable) -> dict[str, Any]:
    print(f"sweep {spec.name!r}: {len(cells)} cells ({len(spec.budgets)} budgets, r {list(spec.r)}, variants "
          f"{[v.name for v in spec.variants]}), LR {spec.lr.rule}, store {spec.storage}", file=out, flush=True)
    store_errors: list[OSError] = []
    # One handler for every stage, SIGINT ignored at start or not (tuning.interrupt says how); Ray's and Tune's own
    # messages in the store's log file (tuning.console).
    with Interrupt(out) as interrupt, console.routed(spec.storage, out):
        lock.on_lost = lambda why: interrupt.request(f"{why}; this driver stops writing")

        def on_store_error(store: str, error: OSError) -> None:
            """A trial failed on the store (tuning.progress): stop scheduling more, end with the store's error."""
            if not store_errors:
                store_errors.append(error)
                interrupt.request(f"the store failed ({error.strerror or error}); stopping the stage")

        def check_store(stage: str) -> None:
            """The store failing under a stage that carried on (a trial's error, a heartbeat): stop with its error."""
            error = (store_errors or [None])[0] or lock.error or probe_store(spec.storage)
            if error is not None:
                raise StoreFailed(spec.storage, error)
            if lock.lost:
                interrupt.raise_if_requested(f"{stage}: store lock lost ({lock.lost})")

        trial_progress.store_error_hook = on_store_error
        try:
            # Ray comes up when a stage has a trial to run: a rerun of a finished sweep refits without starting it.
            with contextlib.ExitStack() as ray_up:
                started: list[bool] = []

                def connect() -> None:
                    if not started:
                        ray_up.enter_context(ray_session(num_cpus=num_cpus, dashboard=True,
                                                         log_to_driver=worker_logs))
                        interrupt.reinstall()
                        started.append(True)

                best = lr_stage(spec, out, interrupt, connect) if spec.lr.rule == "tuned" else None
                plan: LRPlan = lr_plan(spec, best)
                if best is not None:
                    print(f"lr: best {best:.4g} at d_model={plan.d_ref}; grid LR = best * (d_ref/d)^"
                          f"{spec.lr.transfer.width_exponent:g}", file=out, flush=True)
                cells = expand(spec, plan)
                if spec.adaptive is not None:
                    counts, adaptive = adaptive_stage(spec, plan, out, interrupt, trainable, connect)
                else:
                    counts, adaptive = grid_stage(spec, cells, out, interrupt, trainable, connect), None
                if counts.get("missing", 0) or counts.get("failed", 0):
                    check_store("grid")
        except SweepInterrupted as exc:
            trial_progress.store_error_hook = None
            if store_errors:  # stopped because the store failed: say that, not "interrupted"
                raise StoreFailed(spec.storage, store_errors[0]) from exc
            print(f"interrupted: {exc.progress}; rerun the same command to resume", file=out, flush=True)
            if fit_partial:
                fit_stage(spec, out)
            raise
        finally:
            trial_progress.store_error_hook = None
        print(f"grid result: {counts}", file=out, flush=True)
        done = counts.get("completed", 0) + counts.get("diverged", 0)
        try:
            with interrupt.immediate(f"{done} of {sum(counts.values())} runs stored, the fit not finished "
                                     "(a rerun trains nothing stored and fits again)"):
                noise = seed_noise_stage(spec, cells, out)
                law = fit_stage(spec, out) if fit else None
                depth = depth_stage(spec, out) if fit else []
        except SweepInterrupted as exc:
            print(f"interrupted: {exc.progress}; rerun the same command to resume", file=out, flush=True)
            raise
    result = {"best_lr": best, "plan": plan, "cells": cells, "counts": counts, "law": law, "depth": depth,
              "seed_noise": noise}
    return result if adaptive is None else {**result, "adaptive": adaptive}


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python tuning/sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep spec YAML (default: laptop.yaml)")
    parser.add_argument("--storage", default=None, help="override the spec's storage (folder or pyarrow.fs URI)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--no-fit", action="store_true", help="skip the law fit at the end")
    parser.add_argument("--fit-partial", action="store_true",
                        help="fit the runs stored so far even when the sweep is interrupted (default: no fit)")
    parser.add_argument("--worker-logs", action="store_true",
                        help="stream the Ray workers' output (every Train report) to the console")
    lock = parser.add_mutually_exclusive_group()
    lock.add_argument("--wait", action="store_true",
                      help="when another sweep writes the same store, wait for it to finish (default: refuse)")
    lock.add_argument("--takeover", action="store_true",
                      help="take the store's writer lock from its holder: only after checking that it is gone")
    args = parser.parse_args(argv)
    try:
        spec = SweepSpec.from_yaml(args.config, storage=args.storage)
        check_plugins(cell.run.model for cell in validate(absolute_storage(spec)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["python tuning/sweep.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        result = run_sweep(spec, num_cpus=args.num_cpus, fit=not args.no_fit, fit_partial=args.fit_partial,
                           worker_logs=args.worker_logs, takeover=args.takeover, wait=args.wait, command=command)
    except StoreLocked as exc:
        print(f"error: {exc}; wait for it to finish (or rerun with --wait), or, if that process is gone (check the "
              f"host), rerun with --takeover", file=sys.stderr, flush=True)
        return EXIT_LOCKED
    except StoreFailed as exc:
        print(f"error: {exc}; nothing half-written is kept: fix the store (free space, permissions, mount) and "
              "rerun the same command to resume", file=sys.stderr, flush=True)
        return EXIT_STORE
    except SweepInterrupted as exc:
        return exc.exit_code
    except KeyboardInterrupt:  # before the lock, or while waiting for it: nothing of the sweep is lost
        print("interrupted; rerun the same command to resume", flush=True)
        return 130
    wall = time.perf_counter() - t0
    missing = result["counts"].get("missing", 0) + result["counts"].get("failed", 0)
    print(f"sweep wall time: {wall:.1f} s", flush=True)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
