"""Downstream accuracy of a store's runs at test-time depths, through lm-evaluation-harness (`python -m analysis eval`).

Every selected completed run is evaluated on the asked-for tasks at each depth, one Ray task per run (one GPU each
on a cluster with GPUs, else one CPU and one thread: a forward with two threads ran 35x slower than with one on
this 2-core machine while other jobs loaded it). Each run's rows go to STORE/evals/<run_id>.parquet
after each depth, and a (task, depth) already there under the same few-shot and limit settings is not evaluated
again, so an interrupted evaluation resumes and nothing stored is replaced. Dense runs (r = 1) have no loop: they
are evaluated at r' = 1 only, as training's depth tables do.
"""
from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import lm_eval
import pandas as pd
import ray
import torch
from lm_eval.tasks import TaskManager
from lm_eval.utils import hash_string

from analysis.eval_tasks import LOCAL_TASKS, TASKS_DIR
from analysis.lm_model import LooplawLM
from training import results_store
from training.ray_session import ray_session
from training.storage import absolute
from training.weights import has_weights


def _names(field_name: str, values: Iterable[Any]) -> tuple[str, ...]:
    names = tuple(str(v).strip() for v in values)
    if not names or any(not n for n in names):
        raise ValueError(f"{field_name}: {list(values)!r} holds an empty name; give a comma-separated list of names")
    return names


@dataclass(frozen=True)
class EvalSpec:
    """What `python -m analysis eval` evaluates; checked here, before any task list is built or Ray starts."""

    store: str
    tasks: tuple[str, ...]
    depths: tuple[int, ...] | None = None  # None: each run at its trained r
    runs: tuple[str, ...] | None = None  # run ids; None: every completed run (of `variant`)
    variant: str | None = None
    include_path: tuple[str, ...] = ()  # folders of the user's own task YAMLs
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 32
    skip_missing: bool = False  # leave out runs without stored weights instead of refusing

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", absolute(self.store))  # Ray workers run in other working directories
        object.__setattr__(self, "tasks", _names("tasks", self.tasks))
        if self.depths is not None:
            bad = [d for d in self.depths if isinstance(d, bool) or not isinstance(d, int) or d < 1]
            if bad or not self.depths:
                raise ValueError(f"depths: {bad or list(self.depths)} are not recurrence counts; give integers >= 1, "
                                 "e.g. --depths 1,2,4,8")
            object.__setattr__(self, "depths", tuple(sorted(set(self.depths))))
        if self.runs is not None:
            object.__setattr__(self, "runs", _names("runs", self.runs))
        for name in ("num_fewshot", "limit", "batch_size"):
            value, low = getattr(self, name), 0 if name == "num_fewshot" else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name}: {value!r} must be an integer >= {low}")
        missing = [p for p in self.include_path if not os.path.isdir(p)]
        if missing:
            raise ValueError(f"include_path: {missing} are not folders; pass folders of lm-eval task YAMLs")
        object.__setattr__(self, "include_path", tuple(os.path.abspath(p) for p in self.include_path))


# ---- tasks -----------------------------------------------------------------------------------------------------
_MANAGERS: dict[tuple, TaskManager] = {}


def task_manager(include_path: tuple[str, ...], defaults: bool) -> TaskManager:
    """lm-eval's task index over the shipped local tasks and `include_path` (with lm-eval's own tasks when
    `defaults`), once per process: indexing lm-eval's ~15k task YAMLs takes seconds (6.7 s measured here)."""
    key = (include_path, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=[str(TASKS_DIR), *include_path], include_defaults=defaults)
    return _MANAGERS[key]


def resolve_tasks(tasks: tuple[str, ...], include_path: tuple[str, ...]) -> bool:
    """Whether the tasks need lm-eval's own task index (False when every one is local); an unknown name is an error
    naming it."""
    if all(t in task_manager(include_path, False).all_tasks for t in tasks):
        return False
    known = task_manager(include_path, True).all_tasks
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"tasks: {unknown} are not lm-eval tasks, groups or tags; the local ones are "
                         f"{list(LOCAL_TASKS)}, `lm-eval ls tasks` lists lm-eval's own (which download their data "
                         "from the Hugging Face Hub), and --include-path DIR adds a folder of your own task YAMLs")
    return True


# ---- which runs, which work ------------------------------------------------------------------------------------
def select_runs(store: str, runs: tuple[str, ...] | None = None, variant: str | None = None) -> pd.DataFrame:
    """The completed runs to evaluate (the named ones, or every one of `variant`, or every one)."""
    table = results_store.read_runs(store).to_pandas()
    if table.empty:
        raise ValueError(f"STORE: {store!r} has no runs (STORE/runs/*.parquet); point it at a results store")
    table["variant"] = table["variant"].fillna("").astype(str)
    if runs is not None:
        unknown = sorted(set(runs) - set(table["run_id"]))
        if unknown:
            raise ValueError(f"runs: {unknown} are not in the store {store}")
        table = table[table["run_id"].isin(runs)]
        unfinished = table[table["status"] != "completed"]
        if len(unfinished):
            raise ValueError("runs: " + ", ".join(f"{r.run_id} is {r.status}" for r in unfinished.itertuples())
                             + "; only completed runs have final weights")
    if variant is not None:
        present = sorted(table["variant"].unique())
        if variant not in present:
            raise ValueError(f"variant: {variant!r} has no runs; variants present: {present}")
        table = table[table["variant"] == variant]
    table = table[table["status"] == "completed"]
    if table.empty:
        raise ValueError(f"STORE: {store!r} has no completed runs to evaluate")
    return table.sort_values(["variant", "compute", "d_model", "r", "run_id"]).reset_index(drop=True)


def run_depths(trained_r: int, depths: tuple[int, ...] | None) -> tuple[int, ...]:
    """The test-time depths of a run: the asked-for ones (its trained r when none), r' = 1 alone for a dense run."""
    if trained_r == 1:
        return (1,)
    return depths or (trained_r,)


def pending(spec: EvalSpec, run_id: str, trained_r: int) -> dict[int, list[str]]:
    """depth -> the tasks still to evaluate there (those without a stored row under the same settings)."""
    stored = results_store.read_evals(spec.store, run_id).select(["request", "depth", "num_fewshot", "limit"])
    done = {(row["request"], row["depth"]) for row in stored.to_pylist()
            if row["num_fewshot"] == spec.num_fewshot and row["limit"] == spec.limit}
    work = {d: [t for t in spec.tasks if (t, d) not in done] for d in run_depths(trained_r, spec.depths)}
    return {d: tasks for d, tasks in work.items() if tasks}


# ---- one run (a Ray task) ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunJob:
    store: str
    run_id: str
    trained_r: int
    work: dict[int, list[str]]  # depth -> tasks
    include_path: tuple[str, ...]
    defaults: bool
    num_fewshot: int | None
    limit: int | None
    batch_size: int
    threads: int = 1


def _covered(request: str, group_subtasks: dict[str, list[str]]) -> set[str]:
    """A requested name and every task or group under it."""
    names, todo = set(), [request]
    while todo:
        name = todo.pop()
        if name not in names:
            names.add(name)
            todo.extend(group_subtasks.get(name, []))
    return names


def _task_hash(samples: list[dict]) -> str:
    """lm-eval's own task hash (its EvaluationTracker's): every example's document, prompt and target."""
    return hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples))


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a standard error it did not compute
        return float("nan")


def result_rows(results: dict, requests: list[str], job: RunJob, depth: int, seconds: float) -> list[dict]:
    """The store's rows of one simple_evaluate call: one per (request, task, metric)."""
    samples = results.get("samples", {})
    groups = results.get("group_subtasks", {})
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for request in requests:
        for task in sorted(_covered(request, groups) & set(results["results"])):
            entry = results["results"][task]
            task_samples = samples.get(task)
            mc = results.get("configs", {}).get(task, {}).get("output_type") == "multiple_choice"
            common = {
                "request": request, "task": task, "depth": depth, "trained_r": job.trained_r,
                "num_fewshot": job.num_fewshot, "limit": job.limit,
                "n_samples": (results.get("n-samples", {}).get(task) or {}).get("effective"),
                "chance": (sum(1 / len(s["arguments"]) for s in task_samples) / len(task_samples)
                           if mc and task_samples else float("nan")),
                "task_version": str(results.get("versions", {}).get(task)),
                "task_hash": _task_hash(task_samples) if task_samples else None,
                "lm_eval_version": lm_eval.__version__, "seconds": seconds, "evaluated_at": now,
            }
            for key, value in entry.items():
                metric, _, filt = key.partition(",")
                if not filt or metric.endswith("_stderr") or isinstance(value, str):
                    continue
                rows.append({**common, "metric": metric if filt == "none" else key, "value": _number(value),
                             "stderr": _number(entry.get(f"{metric}_stderr,{filt}"))})
    return rows


def evaluate_run(job: RunJob) -> dict[str, Any]:
    """Load the run's weights once, evaluate its pending tasks at each depth, store each depth's rows as it ends."""
    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        torch.set_num_threads(job.threads)
    lm = LooplawLM(run=job.run_id, store=job.store, batch_size=job.batch_size)
    manager = task_manager(job.include_path, job.defaults)
    added = 0
    for depth, tasks in sorted(job.work.items()):
        lm.r = depth
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                          num_fewshot=job.num_fewshot, limit=job.limit)
        rows = result_rows(results, list(tasks), job, depth, time.perf_counter() - start)
        added += results_store.add_evals(job.store, job.run_id, rows)
    return {"run_id": job.run_id, "rows": added, "seconds": time.perf_counter() - t0}


# ---- the whole store ---------------------------------------------------------------------------------------------
@dataclass
class EvalOutcome:
    evaluated: list[dict] = field(default_factory=list)  # evaluate_run's summaries
    up_to_date: list[str] = field(default_factory=list)  # runs with nothing left to evaluate
    no_weights: list[str] = field(default_factory=list)  # left out (skip_missing)
    failed: dict[str, str] = field(default_factory=dict)  # run id -> why
    run_ids: list[str] = field(default_factory=list)  # every selected run
    seconds: float = 0.0


def _missing_weights(store: str, run_ids: list[str]) -> FileNotFoundError:
    shown = ", ".join(run_ids[:8]) + (f" and {len(run_ids) - 8} more" if len(run_ids) > 8 else "")
    return FileNotFoundError(
        f"runs without final weights (STORE/weights/<run_id>.pt): {shown}. Training stores them at the end of every "
        "completed run since the weights/ folder was added; runs stored before have only intermediate Ray Train "
        "checkpoints. Train them again, or pass --skip-missing (or --runs) to evaluate the others")


def evaluate_store(spec: EvalSpec, echo: Callable[[str], None] = print) -> EvalOutcome:
    """Evaluate every selected run's pending (task, depth) pairs; one Ray task per run on the Ray that
    training.ray_session finds or starts."""
    t0 = time.perf_counter()
    defaults = resolve_tasks(spec.tasks, spec.include_path)
    runs = select_runs(spec.store, spec.runs, spec.variant)
    outcome = EvalOutcome(run_ids=runs["run_id"].tolist())
    jobs = []
    for row in runs.itertuples():
        work = pending(spec, row.run_id, int(row.r))
        if not work:
            outcome.up_to_date.append(row.run_id)
        elif not has_weights(spec.store, row.run_id):
            outcome.no_weights.append(row.run_id)
        else:
            jobs.append(RunJob(spec.store, row.run_id, int(row.r), work, spec.include_path, defaults,
                               spec.num_fewshot, spec.limit, spec.batch_size))
    if outcome.no_weights and not spec.skip_missing:
        raise _missing_weights(spec.store, outcome.no_weights)
    if jobs:
        with ray_session(log_to_driver=False, logging_level="WARNING"):
            gpu = ray.cluster_resources().get("GPU", 0) >= 1
            remote = ray.remote(evaluate_run).options(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)
            refs = {remote.remote(job): job for job in jobs}
            echo(f"evaluating {len(jobs)} runs on {'GPU' if gpu else 'CPU'} "
                 f"({len(outcome.up_to_date)} up to date, {len(outcome.no_weights)} without weights left out)")
            while refs:
                [ref], _ = ray.wait(list(refs), num_returns=1)
                job = refs.pop(ref)
                try:
                    summary = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    outcome.failed[job.run_id] = str(exc).strip().splitlines()[-1][:500]
                    echo(f"run {job.run_id}: failed: {outcome.failed[job.run_id]}")
                    continue
                outcome.evaluated.append(summary)
                echo(f"run {job.run_id}: {summary['rows']} rows in {summary['seconds']:.0f} s "
                     f"({len(outcome.evaluated) + len(outcome.failed)}/{len(jobs)})")
    outcome.seconds = time.perf_counter() - t0
    return outcome
