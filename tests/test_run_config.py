"""The run config: YAML loading, run ids, budgets, and validation errors that name the field (no Ray)."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models.accounting import flops_per_token
from models.config import LoopedConfig
from training import config as config_module
from training.config import OptimConfig, RunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "tiny.yaml"


def _base(**kw):
    d = {"model": {"family": "tiny", "r": 2, "d_model": 64, "seq_len": 64, "vocab_size": 512},
         "budget": {"tokens": 1024 * 30}, "batch_tokens": 1024, "micro_batch": 4,
         "resources": {"num_workers": 2, "cpus_per_worker": 0.5}, "val_tokens": 1024}
    d.update(kw)
    return d


def test_tiny_yaml_loads_and_round_trips():
    cfg = RunConfig.from_yaml(TINY)
    assert cfg.model == LoopedConfig.tiny(r=2, d_model=64, seq_len=128, vocab_size=1024)
    assert (cfg.num_workers, cfg.zero_stage, cfg.data) == (2, 2, "default")
    assert cfg.grad_accum == 2 and cfg.steps == 40
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.run_id == cfg.run_id
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_reference_family_and_compute_budget():
    cfg = RunConfig.from_dict(_base(model={"family": "reference", "size": 12, "r": 4, "seq_len": 64},
                                    budget={"compute": "1e13"}))
    assert cfg.size == 12 and cfg.model.d_model == 768 and cfg.model.n_rec_layers == 4
    f = flops_per_token(cfg.model)
    assert cfg.flops_per_token == f
    assert cfg.steps == round(1e13 / (f * 1024)) and cfg.train_tokens == cfg.steps * 1024


def test_run_id_ignores_labels_and_storage_but_not_training():
    cfg = RunConfig.from_dict(_base())
    assert cfg.replace(name="x", sweep="y", variant="z", storage="/elsewhere", max_failures=5).run_id == cfg.run_id
    assert cfg.replace(optim={"lr": 1e-2}).run_id != cfg.run_id
    assert cfg.replace(model={"r": 4}).run_id != cfg.run_id
    assert cfg.replace(seed=1).run_id != cfg.run_id
    assert cfg.replace(zero_stage=3).run_id != cfg.run_id
    assert cfg.replace(compute=1e12).tokens is None  # one budget replaces the other


def _with_new_defaulted_fields(cfg, model=None, optim=None, run=None):
    """The same config under code that grew a defaulted field in LoopedConfig, OptimConfig and RunConfig."""
    Looped2 = dataclasses.make_dataclass("Looped2", [("norm", str, "rms")], bases=(LoopedConfig,), frozen=True)
    Optim2 = dataclasses.make_dataclass("Optim2", [("recipe", str, "adamw")], bases=(OptimConfig,), frozen=True)
    Run2 = dataclasses.make_dataclass("Run2", [("new_setting", tuple, ())], bases=(RunConfig,), frozen=True)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}
    fields["model"] = Looped2(**dataclasses.asdict(cfg.model), **(model or {}))
    fields["optim"] = Optim2(**dataclasses.asdict(cfg.optim), **(optim or {}))
    return Run2(**fields, **(run or {}))


def test_a_new_defaulted_field_leaves_run_ids_alone(monkeypatch):
    cfg = RunConfig.from_dict(_base())
    assert _with_new_defaulted_fields(cfg).run_id == cfg.run_id
    assert _with_new_defaulted_fields(cfg, model={"norm": "layer"}).run_id != cfg.run_id
    assert _with_new_defaulted_fields(cfg, optim={"recipe": "muon"}).run_id != cfg.run_id
    # A new top-level field counts once it is listed as part of the experiment, and then only off its default.
    stored_id = cfg.run_id
    monkeypatch.setattr(config_module, "EXPERIMENT_FIELDS", config_module.EXPERIMENT_FIELDS + ("new_setting",))
    assert _with_new_defaulted_fields(cfg).run_id == stored_id
    assert _with_new_defaulted_fields(cfg, run={"new_setting": (1, 4)}).run_id != stored_id


def test_run_ids_are_stable_across_versions():
    # Stored runs are found by these ids: a change to the rule that moves them must bump RUN_ID_SCHEMA on purpose.
    assert config_module.RUN_ID_SCHEMA == 2
    assert RunConfig.from_yaml(TINY).run_id == "d64-r2-9f6877239ce4046d"
    cfg = RunConfig.from_dict(_base(budget={"compute": 1e12}))
    assert cfg.replace(compute=10 ** 12).run_id == cfg.run_id  # 1e12 and 10**12 are one budget
    assert cfg.replace(cpus_per_worker=0.25, eval_every=7, checkpoint_every=3).run_id == cfg.run_id


def test_lr_schedule_is_warmup_free_linear_to_ten_percent():
    o = OptimConfig(lr=1.0)
    assert o.lr_multiplier(0, 11) == 1.0
    assert o.lr_multiplier(10, 11) == pytest.approx(0.1)
    assert o.lr_multiplier(5, 11) == pytest.approx(0.55)


@pytest.mark.parametrize("change, field", [
    ({"budget": {"tokens": 1000, "compute": 1e12}}, "budget"),
    ({"budget": {}}, "budget"),
    ({"zero_stage": 4}, "zero_stage"),
    ({"batch_tokens": 1000}, "batch_tokens"),
    ({"micro_batch": 0}, "micro_batch"),
    ({"optim": {"lr": -1}}, "optim.lr"),
    ({"optim": {"learning_rate": 1e-3}}, "optim.learning_rate"),
    ({"resources": {"num_workers": 0}}, "resources.num_workers"),
    ({"spike_factor": 0.5}, "spike_factor"),
    ({"epochs": 3}, "epochs"),
    ({"model": {"family": "tiny", "r": 3}}, "r"),
    ({"model": {"family": "giant"}}, "model.family"),
    ({"model": {"family": "explicit", "d_model": 64, "n_heads": 3, "head_dim": 16}}, "n_heads"),
    ({"budget": {"tokens": 10}}, "budget"),
    ({"optim": {"optimizer": "sgd"}}, "optim.optimizer"),
    ({"optim": {"optimizer": "muonh", "weight_decay": 0.1}}, "optim.weight_decay"),
    ({"optim": {"optimizer": "muonh", "embed_lr_mult": 10.0}}, "optim.embed_lr_mult"),
])
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ValueError) as info:
        RunConfig.from_dict(_base(**change))
    assert field in str(info.value)


def test_cli_rejects_bad_config_before_ray(tmp_path):
    bad = _base(zero_stage=7)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, "-m", "training.run", "--config", str(path), "--storage", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "zero_stage" in proc.stderr and "Started a local Ray" not in proc.stderr + proc.stdout
    missing_data = _base(data=str(tmp_path / "nowhere"))
    path.write_text(yaml.safe_dump(missing_data))
    proc = subprocess.run([sys.executable, "-m", "training.run", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data:" in proc.stderr
    assert not list(tmp_path.glob("ray")), "nothing may be written for a config that fails validation"


def test_optimizer_defaults_follow_the_recipe():
    adamw, muonh = OptimConfig(), OptimConfig(optimizer="muonh", lr=0.014)
    assert (adamw.beta1, adamw.beta2, adamw.eps, adamw.grad_clip, adamw.embed_lr_mult) == (0.9, 0.95, 1e-8, 1.0, 1.0)
    assert (muonh.beta1, muonh.beta2, muonh.eps, muonh.grad_clip, muonh.embed_lr_mult) == (0.8, 0.95, 1e-10, 0.0, None)
    cfg = RunConfig.from_dict(_base(optim={"optimizer": "muonh", "lr": 0.014}))
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.run_id != RunConfig.from_dict(_base(optim={"lr": 0.014})).run_id
