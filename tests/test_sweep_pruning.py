"""The Optuna pruning bridge on a real local Ray Tune with plain function trainables (no training stack)."""
from __future__ import annotations


import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from tuning.pruning import (INTERRUPTED, OptunaBridge, OptunaPruningScheduler, StudySearcher, finished_trials,
                            make_pruner, open_study, recover_interrupted)

STEPS = 12


def regression(config):
    """Gradient descent on a fixed least-squares problem: the LR alone decides how fast the loss falls."""
    from ray import tune

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8))
    y = x @ rng.normal(size=8)
    w = np.zeros(8)
    for step in range(1, STEPS + 1):
        w -= config["lr"] * x.T @ (x @ w - y) / len(y)
        tune.report({"val_loss": float(np.mean((x @ w - y) ** 2)), "step": step})


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_pruner_choices():
    assert isinstance(make_pruner("median", 3), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("hyperband", 3, {"min_resource": 2}), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("wilcoxon", 3), optuna.pruners.WilcoxonPruner)
    with pytest.raises(ValueError, match="lr.search.pruner"):
        make_pruner("sometimes", 3)


def test_bridge_prunes_slow_trials_in_the_stored_study(ray_local, tmp_path):
    from ray import tune

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = open_study("bridge", storage, pruner=make_pruner("median", 2), seed=0, startup_trials=2)
    # Two good LRs first (the median's reference), then two far too small: their losses lag at every step.
    for lr in (0.3, 0.2, 1e-4, 3e-4):
        study.enqueue_trial({"lr": lr})
    bridge = OptunaBridge(study, suggest=lambda t: {"lr": t.suggest_float("lr", 1e-5, 1.0, log=True)},
                          metric="val_loss")
    tuner = tune.Tuner(
        tune.with_resources(regression, {"CPU": 0.5}),
        tune_config=tune.TuneConfig(search_alg=StudySearcher(bridge), scheduler=OptunaPruningScheduler(bridge),
                                    metric="val_loss", mode="min", num_samples=4, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="bridge", verbose=0),
    )
    results = tuner.fit()
    assert len(results) == 4 and not results.errors

    reloaded = optuna.load_study(study_name="bridge", storage=storage)  # the study lives in storage, not in Tune
    by_lr = {t.params["lr"]: t for t in reloaded.trials}
    assert by_lr[0.3].state == by_lr[0.2].state == TrialState.COMPLETE
    assert len(by_lr[0.3].intermediate_values) == STEPS
    for lr in (1e-4, 3e-4):
        assert by_lr[lr].state == TrialState.PRUNED
        assert len(by_lr[lr].intermediate_values) < STEPS  # stopped early by Tune on the pruner's word
    assert sorted(bridge.pruned) == sorted(by_lr[lr].number for lr in (1e-4, 3e-4))
    assert reloaded.best_trial.params["lr"] in (0.3, 0.2)
    assert by_lr[0.3].value == pytest.approx(by_lr[0.3].intermediate_values[STEPS])


def test_interrupted_trials_are_requeued(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = open_study("resume", storage, pruner=make_pruner("none", 0), seed=0, startup_trials=1)
    done = study.ask()
    done.suggest_float("lr", 1e-4, 1e-1, log=True)
    study.tell(done, 1.0)
    dead = study.ask()  # a driver asked, then died while the trial ran
    lr = dead.suggest_float("lr", 1e-4, 1e-1, log=True)
    assert finished_trials(study) == 1

    again = open_study("resume", storage, pruner=make_pruner("none", 0), seed=0, startup_trials=1)
    assert recover_interrupted(again) == [{"lr": lr}]
    old = again.trials[dead.number]
    assert old.state == TrialState.FAIL and again.user_attrs[INTERRUPTED] == [dead.number]
    assert finished_trials(again) == 1  # an interrupted trial does not use up the search budget
    nxt = again.ask()
    assert nxt.suggest_float("lr", 1e-4, 1e-1, log=True) == lr  # the same run continues
    assert recover_interrupted(again) == [{"lr": lr}]  # nxt is RUNNING again: a second crash is handled too
    assert again.user_attrs[INTERRUPTED] == [dead.number, nxt.number] and finished_trials(again) == 1
