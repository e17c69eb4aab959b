"""Sweep spec validation and grid expansion (no Ray): the shipped configs, variants, the LR rule, bad specs."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from models.accounting import param_counts
from tuning.grid import evaluate, expand, lr_plan, search_cell, validate
from tuning.spec import SweepSpec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tuning" / "configs"


def small_spec(**changes) -> dict:
    spec = {
        "name": "unit",
        "storage": "/tmp/looplaw-unit-never-written",
        "model": {"family": "tiny", "vocab_size": 1024, "seq_len": 64, "head_dim": 16},
        "budgets": [{"compute": 2.0e10, "widths": [32]}, {"compute": 4.0e10, "widths": [32, 64]}],
        "r": [1, 2, 4],
        "recipe": {"batch_tokens": 512, "micro_batch": 8, "eval_every": 5, "val_tokens": 2048},
        "lr": {"rule": "fixed", "value": 4.0e-3},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "zero_stage": 0},
    }
    spec.update(changes)
    return spec


STUDY_SIZES = {4.64e17: [6, 8, 10, 12], 1e18: [6, 8, 10, 12, 14], 2.15e18: [8, 10, 12, 14, 16],
               4.64e18: [10, 12, 14, 16, 18, 20], 1e19: [12, 16, 18, 20, 24], 2.15e19: [18, 24, 28, 34]}


def test_reference_config_is_the_study_grid_and_recipe():
    spec = SweepSpec.from_yaml(CONFIGS / "reference.yaml")
    cells = validate(spec)
    assert len(cells) == 116 and len({c.run_id for c in cells}) == 116
    assert {b.compute: list(b.widths) for b in spec.budgets} == STUDY_SIZES
    assert {c.r for c in cells} == {1, 2, 4, 8}
    for c in cells:
        m, run = c.run.model, c.run
        assert m.n_prelude + m.r * m.n_rec_layers + m.n_coda == 20  # iso-depth
        assert m.d_model == math.ceil(64 * c.width / 128) * 128 and m.head_dim == 128
        assert run.batch_tokens == 2 ** 18 and run.micro_batch == (32 if c.width < 18 else 16 if c.width < 30 else 8)
        assert run.optim.optimizer == "muonh" and run.optim.lr == 0.014  # the run transfers it (training.recipe)
        assert run.use_gpu and run.num_workers * run.micro_batch * run.grad_accum * 2048 == 2 ** 18
    assert spec.lr.rule == "fixed"


def test_reference_config_keeps_the_optuna_lr_stage_as_an_option():
    data = yaml.safe_load((CONFIGS / "reference.yaml").read_text())
    data["lr"] = {"rule": "tuned", "search": {"trials": 4, "low": 3e-3, "high": 6e-2, "width": 6, "r": 1}}
    spec = SweepSpec.from_dict(data)
    assert search_cell(spec).model.d_model == 384 and validate(spec)
    assert {c.run.optim.lr for c in expand(spec, lr_plan(spec, best_lr=0.02))} == {0.02}
    data["lr"]["transfer"] = {"width_exponent": 1.0}  # muonh transfers by the study's rules: no second transfer
    with pytest.raises(ValueError, match="lr.transfer"):
        SweepSpec.from_dict(data)


def test_micro_batch_steps_with_width():
    spec = SweepSpec.from_dict(small_spec(recipe={"batch_tokens": 1024, "micro_batch": {1: 16, 64: 8},
                                                  "val_tokens": 2048}))
    assert {(c.width, c.run.micro_batch, c.run.grad_accum) for c in expand(spec)} == {(32, 16, 1), (64, 8, 2)}
    with pytest.raises(ValueError, match="recipe.micro_batch"):
        expand(SweepSpec.from_dict(small_spec(recipe={"batch_tokens": 1024, "micro_batch": {48: 8}})))


def test_recipe_compile_reaches_every_run_and_keeps_its_id():
    """torch.compile is how a run executes, not what it measures: a stored eager run stays found."""
    eager = expand(SweepSpec.from_dict(small_spec()))
    compiled = expand(SweepSpec.from_dict(small_spec(recipe={**small_spec()["recipe"], "compile": True})))
    assert {c.run.compile for c in compiled} == {True} and {c.run.compile for c in eager} == {None}
    assert [c.run_id for c in compiled] == [c.run_id for c in eager]
    with pytest.raises(ValueError, match="compile"):
        expand(SweepSpec.from_dict(small_spec(recipe={**small_spec()["recipe"], "compile": "yes"})))


def test_quick_config_fits_two_cores():
    spec = SweepSpec.from_yaml(CONFIGS / "quick.yaml")
    cells = validate(spec)
    assert set(spec.r) == {1, 2, 4, 8}
    assert len(spec.budgets) >= 3 and all(len(b.widths) >= 2 for b in spec.budgets)
    assert len(cells) == sum(len(b.widths) for b in spec.budgets) * len(spec.r)
    assert spec.resources.per_trial["CPU"] <= 2 and not spec.resources.gpus_per_worker
    assert all(c.run.model.d_model <= 128 for c in cells)


def test_default_config_is_an_isoflop_design_with_branches_and_seed_noise():
    from tuning.grid import trials
    from tuning.sweep import DEFAULT_CONFIG

    spec = SweepSpec.from_yaml(DEFAULT_CONFIG)
    cells = validate(spec)
    assert len(spec.r) >= 3
    computes = [b.compute for b in spec.budgets]
    assert len(computes) >= 3 and max(computes) >= 6 * min(computes)  # budgets span at least 6x
    assert all(len(b.widths) >= 3 for b in spec.budgets)  # room for an interior IsoFLOP minimum
    baseline = [c for c in cells if c.variant == "baseline"]
    assert len(baseline) == sum(len(b.widths) for b in spec.budgets) * len(spec.r)
    noise = [c for c in cells if c not in baseline]
    assert {c.variant for c in noise} == {"seed_noise"}  # three seeds of two looped cells (the loop check's noise)
    assert len({(c.compute, c.width, c.r) for c in noise}) >= 2 and len(noise) >= 4
    assert all(c.r > 1 for c in noise)
    assert dict(spec.model.options)["injection"] == "additive_normed_per_layer"  # loops that work on the laptop
    assert spec.resources.per_trial["CPU"] <= 2 and not spec.resources.gpus_per_worker
    # wsd: one trained run per (width, r); the smaller budgets of a width are its cooldown branches
    runs = trials(cells, set())
    widths = {w for b in spec.budgets for w in b.widths}
    assert len(runs) == len(widths) * len(spec.r) + len(noise)
    assert sum(len(run.horizons or ()) + 1 for run, _ in runs) == len(cells)


def test_grid_cells_carry_budget_width_r_and_labels():
    spec = SweepSpec.from_dict(small_spec())
    cells = expand(spec)
    assert len(cells) == (1 + 2) * 3
    for c in cells:
        assert c.run.compute == c.compute and c.run.model.d_model == c.width and c.run.model.r == c.r
        assert c.run.sweep == "unit" and c.run.variant == "baseline"
        assert c.run.storage == spec.storage
        assert c.run.model.injection == ("none" if c.r == 1 else "concat")
    # iso-depth: unique parameters shrink with r at fixed width
    at64 = sorted((c for c in cells if c.width == 64), key=lambda c: c.r)
    n = [param_counts(c.run.model).n_once + param_counts(c.run.model).n_rec for c in at64]
    assert n[0] > n[1] > n[2]


def test_variants_evaluate_expressions_and_restrict_the_grid():
    spec = SweepSpec.from_dict(small_spec(variants={
        "baseline": {},
        "truncated": {"bptt_k": "ceil(r/2)", "r": [2, 4]},
        "hyperconnect": {"model": {"injection": "hyperconnect", "hc_lanes": 2}, "r": [4], "budgets": [4.0e10]},
    }))
    cells = expand(spec)
    by = Counter(c.variant for c in cells)
    assert by == {"baseline": 9, "truncated": 6, "hyperconnect": 2}
    for c in cells:
        if c.variant == "truncated":
            assert c.run.model.bptt_k == math.ceil(c.r / 2)
        if c.variant == "hyperconnect":
            assert c.run.model.injection == "hyperconnect" and c.run.model.hc_lanes == 2 and c.compute == 4.0e10
    assert evaluate("max(1, r // 2) + width * 0", {"r": 8, "width": 3}, "x") == 4


def test_fixed_lr_transfers_by_width():
    spec = SweepSpec.from_dict(small_spec())
    cells = expand(spec)
    lr = {c.width: c.run.optim.lr for c in cells}
    assert lr[32] == pytest.approx(4.0e-3)  # the reference width defaults to the smallest d_model
    assert lr[64] == pytest.approx(2.0e-3)  # lr * d_ref / d


def test_tuned_lr_plan_uses_the_search_cell():
    spec = SweepSpec.from_dict(small_spec(lr={"rule": "tuned", "search": {"trials": 3, "low": 1e-4, "high": 1e-1,
                                                                          "width": 64, "budget": 4.0e10}}))
    ref = search_cell(spec)
    assert ref.model.d_model == 64 and ref.compute == 4.0e10 and ref.model.r == 1
    assert ref.storage.endswith("/lr_search") and ref.variant == "lr_search"
    plan = lr_plan(spec, best_lr=6.0e-3)
    cells = expand(spec, plan)
    assert {c.width: c.run.optim.lr for c in cells} == {32: pytest.approx(1.2e-2), 64: pytest.approx(6.0e-3)}
    with pytest.raises(ValueError, match="best LR"):
        lr_plan(spec)


@pytest.mark.parametrize("change, field", [
    ({"name": "bad name"}, "name"),
    ({"r": [1, 3]}, "LoopedConfig.r"),  # 3 does not divide the tiny recurrent depth 8
    ({"r": []}, "r"),
    ({"budgets": [{"compute": "lots", "widths": [32]}]}, "budgets[0].compute"),
    ({"budgets": [{"compute": 1e10}]}, "budgets[0]"),
    ({"budgets": [{"compute": 1e3, "widths": [32]}]}, "budget"),  # less than one batch
    ({"recipe": {"batch_tokens": 500, "micro_batch": 8}}, "batch_tokens"),
    ({"recipe": {"optim": {"lr": 1e-3}}}, "recipe.optim.lr"),
    ({"recipe": {"warmup": 10}}, "recipe.warmup"),
    ({"recipe": {"micro_batch": {1: 0}}}, "recipe.micro_batch"),
    ({"recipe": {"micro_batch": {}}}, "recipe.micro_batch"),
    ({"lr": {"rule": "fixed"}}, "lr.value"),
    ({"lr": {"rule": "tuned", "search": {"pruner": "random"}}}, "lr.search.pruner"),
    ({"lr": {"rule": "tuned", "search": {"low": 1e-2, "high": 1e-3}}}, "lr.search.low"),
    ({"lr": {"rule": "tuned", "search": {"pruner_args": {"patience": 3}}}}, "lr.search.pruner_args"),
    ({"lr": {"rule": "tuned", "search": {"budget": 3e10}}}, "lr.search.budget"),
    ({"lr": {"rule": "tuned", "search": {"storage": "optuna.db"}}}, "lr.search.storage"),
    ({"resources": {"zero_stage": 5}}, "resources.zero_stage"),
    ({"resources": {"gpus_per_worker": 2}}, "resources.gpus_per_worker"),
    ({"variants": {"t": {"bptt_k": "ceil(q/2)"}}}, "variants.t.bptt_k"),
    ({"variants": {"t": {"r": [16]}}}, "variants.t.r"),
    ({"model": {"family": "huge"}}, "model.family"),
    ({"model": {"family": "tiny", "r": 2}}, "model.r"),
    ({"concurrency": 0}, "concurrency"),
    ({"colour": "blue"}, "spec.colour"),
    ({"seed_noise": {"budget": 3e10}}, "seed_noise.budget"),
    ({"seed_noise": {"width": 48}}, "seed_noise.width"),
    ({"seed_noise": {"r": 8}}, "seed_noise.r"),
    ({"seed_noise": {"seeds": [0]}}, "seed_noise.seeds"),
    ({"seed_noise": {"tries": 2}}, "seed_noise.tries"),
    ({"variants": {"seed_noise": {}}}, "variants"),
])
def test_bad_specs_name_the_field(change, field):
    with pytest.raises(ValueError) as err:
        validate(SweepSpec.from_dict(small_spec(**change)))
    assert field in str(err.value)


def test_bad_spec_fails_before_ray_starts(tmp_path):
    bad = small_spec(storage=str(tmp_path / "store"), lr={"rule": "tuned", "search": {"pruner": "random"}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(ROOT / "tuning" / "sweep.py"), "--config", str(path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "lr.search.pruner" in proc.stderr and "median" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "store").exists()


def test_storage_override_is_validated_and_keeps_optuna_on_the_driver(tmp_path):
    # --storage s3://... with a tuned LR: the study must not land at a sqlite path made from the URI.
    tuned = small_spec(storage=str(tmp_path / "store"), lr={"rule": "tuned", "search": {"pruner": "median"}})
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(tuned))
    assert SweepSpec.from_yaml(path, storage=str(tmp_path / "other")).optuna_storage.endswith("other/optuna.db")
    remote = SweepSpec.from_yaml(path, storage="s3://bucket/looplaw")
    assert remote.storage == "s3://bucket/looplaw"
    assert remote.optuna_storage.startswith("sqlite:////") and "s3:" not in remote.optuna_storage


def test_wsd_grid_trains_each_width_and_r_once_with_cooldown_branches():
    """Under wsd the cells of one (variant, width, r) share a trajectory: the largest budget trains with the smaller
    ones as cooldown branches whose run ids are the cells' own; a stored parent leaves a missing cell to train alone."""
    from tuning.grid import trials

    spec = SweepSpec.from_dict(small_spec(
        budgets=[{"compute": 2.0e10, "widths": [32]}, {"compute": 4.0e10, "widths": [32]},
                 {"compute": 8.0e10, "widths": [32]}],
        recipe={"batch_tokens": 512, "micro_batch": 8, "eval_every": 5, "val_tokens": 2048,
                "optim": {"schedule": "wsd", "cooldown_frac": 0.25}}))
    cells = expand(spec)
    assert len(cells) == 9
    runs = trials(cells, done=set())
    assert len(runs) == 3  # one per r
    for run, cell in runs:
        assert cell.compute == 8.0e10 and run.run_id == cell.run_id
        assert run.horizons == (2.0e10, 4.0e10)
        siblings = {c.run_id for c in cells if c.r == cell.r}
        assert {run.branch_config(h).run_id for h in run.horizons} | {run.run_id} == siblings

    r1 = [c for c in cells if c.r == 1]
    parent = max(r1, key=lambda c: c.compute)
    done = {c.run_id for c in cells} - {r1[0].run_id}  # a lost branch row, its parent stored
    assert [(run.run_id, run.horizons) for run, _ in trials(cells, done)] == [(r1[0].run_id, None)]
    done = {c.run_id for c in cells} - {parent.run_id, r1[1].run_id}
    assert [(run.run_id, run.horizons) for run, _ in trials(cells, done)] == [(parent.run_id, (r1[1].compute,))]

    linear = expand(SweepSpec.from_dict(small_spec()))
    assert [run for run, _ in trials(linear, set())] == [c.run for c in linear]  # one trial per cell


def test_seed_noise_adds_other_seeds_of_one_baseline_cell_outside_the_fit():
    from tuning.grid import trials

    spec = SweepSpec.from_dict(small_spec(seed_noise={"seeds": [1, 2]}))
    cells = expand(spec)
    base_cells = expand(SweepSpec.from_dict(small_spec()))
    extra = [c for c in cells if c.variant == "seed_noise"]
    assert cells[:len(base_cells)] == base_cells and len(extra) == 2
    # defaults: the smallest budget, the middle of its widths, the smallest r
    (base,) = [c for c in base_cells if c.compute == 2.0e10 and c.width == 32 and c.r == 1]
    for seed, c in zip((1, 2), extra):
        assert (c.compute, c.width, c.r, c.run.seed) == (base.compute, base.width, base.r, seed)
        assert c.run.replace(seed=0, variant=base.variant, name=base.run.name) == base.run  # only seed and labels differ
        assert c.run.name.endswith(f"seed{seed}") and "seed_noise" in c.run.name
        assert c.run_id != base.run_id
    assert len({c.run_id for c in cells}) == len(cells)
    wsd = small_spec(seed_noise={}, recipe={**small_spec()["recipe"], "optim": {"schedule": "wsd"}})
    cells = expand(SweepSpec.from_dict(wsd))
    (noise,) = [run for run, c in trials(cells, set()) if c.variant == "seed_noise"]
    assert noise.horizons is None and noise.seed == 1  # trained alone, not as a branch of a larger budget


def test_seed_noise_takes_a_list_of_cells_and_refuses_one_twice():
    spec = SweepSpec.from_dict(small_spec(seed_noise=[{"seeds": [1, 2]}, {"r": 2, "seeds": [1, 2]}]))
    extra = [c for c in expand(spec) if c.variant == "seed_noise"]
    assert [(c.r, c.run.seed) for c in extra] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    with pytest.raises(ValueError, match="seed_noise.*same cell twice"):
        SweepSpec.from_dict(small_spec(seed_noise=[{"seeds": [1]}, {"seeds": [2]}]))
