"""Optuna inside Ray Tune, pruning included.

Ray's OptunaSearch asks and tells its own study but hard-codes a no-op pruner, so it cannot stop bad trials. The
bridge here keeps one real Optuna study (in Optuna storage, so it survives the driver) and plugs into Tune twice:
- `StudySearcher` (a Tune Searcher) asks the study for each new trial's parameters and tells it the final value;
- `OptunaPruningScheduler` (a Tune FIFOScheduler) feeds every intermediate result to the Optuna trial
  (`trial.report(value, step)`), asks the study's pruner (`trial.should_prune()`), and on a yes tells the study
  PRUNED and returns STOP so Tune ends the trial.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

INTERRUPTED = "interrupted"  # study user attr: numbers of the trials whose driver died while they ran


def make_pruner(kind: str, startup_trials: int, args: Mapping[str, Any] | None = None) -> optuna.pruners.BasePruner:
    """median | hyperband | wilcoxon | none, with the spec's keyword overrides."""
    args = dict(args or {})
    if kind == "median":
        args.setdefault("n_startup_trials", startup_trials)
        return optuna.pruners.MedianPruner(**args)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(**args)
    if kind == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(**args)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"lr.search.pruner: unknown pruner {kind!r}; use median, hyperband, wilcoxon or none")


def open_study(name: str, storage: str, *, pruner: optuna.pruners.BasePruner, seed: int,
               startup_trials: int) -> optuna.Study:
    """Create or reopen the study. TPE over the log-LR; `multivariate` is moot with one parameter."""
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    return optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler,
                               pruner=pruner, load_if_exists=True)


def recover_interrupted(study: optuna.Study) -> list[dict[str, Any]]:
    """Trials left RUNNING by a driver that died: tell the study they FAILed (their numbers kept in the study's
    INTERRUPTED user attr, so they do not count against the budget) and enqueue their parameters again, so the rerun
    continues the same runs (whose training resumes from its checkpoints) instead of new ones."""
    interrupted = list(study.user_attrs.get(INTERRUPTED, []))
    params = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        interrupted.append(t.number)
        study.enqueue_trial(t.params, skip_if_exists=False)
        params.append(t.params)
    if params:
        study.set_user_attr(INTERRUPTED, interrupted)
    return params


def finished_trials(study: optuna.Study) -> int:
    """Trials that count against the search budget: completed, pruned, and failed for a reason of their own."""
    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        # A per-trial INTERRUPTED tag is how studies written before the study-level list marked one.
        elif t.state == TrialState.FAIL and t.number not in interrupted and not t.user_attrs.get(INTERRUPTED):
            n += 1
    return n


class OptunaBridge:
    """Tune trial id <-> live Optuna trial, shared by the searcher and the scheduler."""

    def __init__(self, study: optuna.Study, suggest: Callable[[optuna.Trial], dict[str, Any]], metric: str,
                 step_key: str = "step", value_of: Callable[[Mapping[str, Any]], float | None] | None = None):
        self.study = study
        self.suggest = suggest
        self.metric = metric
        self.step_key = step_key
        self.value_of = value_of or (lambda result: result.get(metric))
        self.live: dict[str, optuna.Trial] = {}
        self.last_step: dict[str, int] = {}
        self.worst: dict[str, float] = {}  # highest finite value a trial reported (its value if it diverges)
        self.pruned: list[int] = []

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its searcher and scheduler into the experiment folder. The live study (a DB connection) and
        its Optuna trials do not pickle and need not: the study's state is in Optuna storage, and a rerun of the
        sweep reopens it (tuning.sweep.lr_stage), so only the plain fields travel."""
        state = dict(self.__dict__)
        state["study"] = None
        state["live"] = {}
        return state

    def ask(self, trial_id: str) -> dict[str, Any]:
        ot = self.study.ask()
        self.live[trial_id] = ot
        params = self.suggest(ot)
        ot.set_user_attr("tune_trial_id", trial_id)
        return params

    def report(self, trial_id: str, result: Mapping[str, Any]) -> bool:
        """Feed one intermediate value; True when the study's pruner says stop."""
        ot = self.live.get(trial_id)
        if ot is None:
            return False
        value, step = self.value_of(result), result.get(self.step_key)
        if value is None or step is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        step = int(step)
        if self.last_step.get(trial_id, -1) >= step:  # one value per step; a resumed run re-reports nothing new
            return False
        self.last_step[trial_id] = step
        self.worst[trial_id] = max(self.worst.get(trial_id, -math.inf), float(value))
        ot.report(float(value), step)
        if not ot.should_prune():
            return False
        self.study.tell(ot, state=TrialState.PRUNED)
        self.pruned.append(ot.number)
        self.live.pop(trial_id, None)
        return True

    def abandon_live(self) -> None:
        """The sweep was interrupted: every trial still running is told FAIL (tagged interrupted, so it does not
        count against the search budget) and its parameters are queued again, so the rerun continues the same runs
        from their checkpoints. Leaves no trial RUNNING in the study."""
        for ot in self.live.values():
            ot.set_user_attr(INTERRUPTED, True)
            self.study.tell(ot, state=TrialState.FAIL)
            self.study.enqueue_trial(ot.params, skip_if_exists=False)
        self.live.clear()

    def finish(self, trial_id: str, result: Mapping[str, Any] | None, error: bool) -> None:
        """Tell the study how a trial ended (nothing to do for one already told PRUNED)."""
        ot = self.live.pop(trial_id, None)
        if ot is None:
            return
        value = None if (error or not result) else self.value_of(result)
        diverged = bool(result and result.get("diverged"))
        if diverged and trial_id in self.worst:
            # A diverged LR is a bad LR, not a missing point: TPE learns more from a poor value than from FAIL.
            self.study.tell(ot, self.worst[trial_id])
        elif value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.study.tell(ot, state=TrialState.FAIL)
        else:
            self.study.tell(ot, float(value))


class StudySearcher(Searcher):
    """A Tune Searcher that asks the bridge's Optuna study for each trial's parameters."""

    def __init__(self, bridge: OptunaBridge, mode: str = "min"):
        super().__init__(metric=bridge.metric, mode=mode)
        self.bridge = bridge

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        return self.bridge.ask(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.bridge.finish(trial_id, result, error)

    # The study is the state: it lives in Optuna storage, not in Tune's experiment checkpoint.
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass

    def save_to_dir(self, *args: Any, **kwargs: Any) -> None:
        pass

    def restore_from_dir(self, *args: Any, **kwargs: Any) -> None:
        pass


class OptunaPruningScheduler(FIFOScheduler):
    """FIFO scheduling; each result goes to the Optuna trial and the study's pruner decides whether it stops."""

    def __init__(self, bridge: OptunaBridge):
        super().__init__()
        self.bridge = bridge

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if self.bridge.report(trial.trial_id, result):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"Optuna pruning ({type(self.bridge.study.pruner).__name__}); {len(self.bridge.pruned)} pruned"

