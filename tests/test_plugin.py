"""Bring your own loop: an injection named by import path (tests/plugins/gated.py) or entry point is resolved, checked
and trained like a built-in; broken declarations and bad names are refused before Ray starts, naming the class and
the numbers; the path and its arguments are part of the run id; every built-in satisfies the same contract."""
import math
import textwrap

import pytest
import torch

from models import LoopedConfig, LoopedLM
from models.accounting import flops_per_token, param_counts
from models.builtin_counts import BUILTIN
from models.plugin import check_injection
from models import registry
from plugins.gated import Gated
from test_step import _single_process_group, synthetic_data  # noqa: F401  (the step tests' prepared data fixture)
from training.config import RunConfig
from tuning.grid import validate
from tuning.spec import SweepSpec

GATED = "plugins.gated:Gated"


def tiny(**kw) -> LoopedConfig:
    return LoopedConfig.tiny(**{"r": 2, "d_model": 32, "head_dim": 16, "rec_depth": 4, "vocab_size": 128,
                                "seq_len": 32, **kw})


def test_plugin_by_path_counts_in_n_rec_and_f():
    cfg = tiny(injection=GATED, injection_args={"gate_init": 0.3})
    model = LoopedLM(cfg)
    assert isinstance(model.injection, Gated) and model.injection.gate_init == 0.3
    d, k = 32, cfg.n_rec_layers
    assert param_counts(cfg).n_rec == k * (12 * d * d + 2 * d) + d * d + d  # the block, W and the gate
    plain = flops_per_token(tiny(injection="additive"))  # the same model with a free injection
    assert flops_per_token(cfg) == plain + 6 * cfg.r * (d * d + d)
    assert check_injection(Gated, cfg, gate_init=0.3) == {"params": d * d + d, "macs_per_token": d * d + d}


@pytest.mark.parametrize("name,lanes", [(name, lanes) for name in BUILTIN for lanes in (2, 4)
                                        if lanes == 2 or name in ("hyperconnect", "hyperloop")])
def test_every_builtin_meets_its_own_contract(name, lanes):
    """The built-ins' declared counts (the study's accounting, unchanged) match their modules and the flop counter."""
    cfg = tiny(hc_lanes=lanes, sample_r_mean=2.0, sample_r_max=3)  # steps beyond r own weights too
    assert check_injection(name, cfg)["params"] == param_counts(cfg.replace(injection=name)).injection


def test_declared_parameter_mismatch_is_refused_naming_class_and_numbers():
    with pytest.raises(ValueError, match=r"plugins\.broken:MiscountedParams declares param_count 1,024 but its "
                                         r"module has 1,056 parameters"):
        LoopedLM(tiny(injection="plugins.broken:MiscountedParams"))


def test_declared_mac_mismatch_is_refused_naming_class_and_numbers():
    with pytest.raises(ValueError, match=r"plugins\.broken:MiscountedMacs: declares macs_per_token 32 .*measured "
                                         r"1,024 per token"):
        check_injection("plugins.broken:MiscountedMacs", tiny())


@pytest.mark.parametrize("injection,args,message", [
    ("plugins.nope:Gated", None, r"cannot import 'plugins\.nope'"),
    ("plugins.gated:Nope", None, r"module 'plugins\.gated' has no attribute 'Nope'"),
    ("plugins.gated", None, r"names the class after a colon"),
    ("gated", None, r"unknown mode 'gated'"),
    ("plugins.broken:NotAnInjection", None, r"not a subclass of models\.injection\.Injection"),
    ("plugins.broken:not_a_class", None, r"not a class"),
    (GATED, {"gate_inti": 0.3}, r"injection_args: .* do not fit Gated"),
    (GATED, {"gate_init": 2.0}, r"gate_init: must be in \(0, 1\)"),
    ("concat", {"gate_init": 0.3}, r"concat takes no injection_args"),
])
def test_bad_injection_is_refused_by_the_config(injection, args, message):
    run = {"model": {"family": "tiny", "r": 2, "d_model": 32, "head_dim": 16, "seq_len": 32, "injection": injection,
                     **({"injection_args": args} if args else {})}, "budget": {"tokens": 10 ** 5}}
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(run)


def test_bad_injection_in_a_sweep_spec_fails_validation_before_ray(tmp_path):
    spec = SweepSpec.from_dict({"name": "p", "storage": str(tmp_path), "model": {"family": "tiny", "seq_len": 32},
                                "budgets": [{"compute": 1e11, "widths": [32]}], "r": [1, 2],
                                "variants": {"baseline": {}, "gated": {"injection": "plugins.gated:Gatd"}},
                                "lr": {"rule": "fixed", "value": 0.01}})
    with pytest.raises(ValueError, match=r"cell gated/.*LoopedConfig\.injection: module 'plugins\.gated' has no "
                                         r"attribute 'Gatd'"):
        validate(spec)


def test_miscounted_plugin_stops_both_clis_before_ray(tmp_path, capsys):
    """The run and sweep commands build each plugin injection on the driver: a wrong param_count exits 2 there."""
    import yaml

    from training.run import main as run_main
    from tuning.sweep import main as sweep_main

    model = {"family": "tiny", "r": 2, "d_model": 32, "head_dim": 16, "seq_len": 32,
             "injection": "plugins.broken:MiscountedParams"}
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": model, "budget": {"tokens": 10 ** 5}}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "p", "storage": str(tmp_path / "store"), "model": {"family": "tiny", "seq_len": 32, "head_dim": 16},
        "budgets": [{"compute": 1e11, "widths": [32]}], "r": [2], "lr": {"rule": "fixed", "value": 0.01},
        "variants": {"baseline": {"injection": "plugins.broken:MiscountedParams"}}}))
    for main, argv in ((sweep_main, ["--config", str(spec)]), (run_main, ["--config", str(run)])):
        assert main(argv) == 2
        assert "MiscountedParams declares param_count" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_path_and_arguments_are_part_of_the_run_id(tmp_path):
    def run(**model) -> RunConfig:
        return RunConfig.from_dict({"model": {"family": "tiny", "r": 2, "d_model": 32, "head_dim": 16, "seq_len": 32,
                                              **model}, "budget": {"tokens": 10 ** 5}, "storage": str(tmp_path)})

    ids = {run(injection=GATED).run_id, run(injection=GATED, injection_args={"gate_init": 0.3}).run_id,
           run(injection="plugins.broken:MiscountedMacs").run_id, run(injection="concat").run_id}
    assert len(ids) == 4
    assert run(injection=GATED, injection_args={}).run_id == run(injection=GATED).run_id  # no arguments either way
    assert run(injection="concat").run_id == run().run_id  # a default stays out of the hash: stored ids unchanged
    again = RunConfig.from_dict(run(injection=GATED, injection_args={"gate_init": 0.3}).to_dict())
    assert again.model.injection_args == {"gate_init": 0.3}


def test_sweep_variant_carries_path_and_arguments(tmp_path):
    spec = SweepSpec.from_dict({"name": "p", "storage": str(tmp_path),
                                "model": {"family": "tiny", "seq_len": 32, "head_dim": 16},
                                "budgets": [{"compute": 1e11, "widths": [32]}], "r": [1, 2],
                                "variants": {"baseline": {}, "gated": {"injection": GATED,
                                                                       "injection_args": {"gate_init": 0.3}}},
                                "lr": {"rule": "fixed", "value": 0.01}})
    cells = {(c.variant, c.r): c.run for c in validate(spec)}
    gated = cells[("gated", 2)].model
    assert (gated.injection, gated.injection_args) == (GATED, {"gate_init": 0.3})
    assert ("gated", 1) not in cells  # at r = 1 nothing recurs: the variant's cell is the baseline's, trained once


def test_entry_point_names_a_plugin(tmp_path, monkeypatch):
    """A package registers `[looplaw.injections] gated = plugins.gated:Gated`; configs then say `injection: gated`."""
    dist = tmp_path / "looplaw_gated-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: looplaw-gated\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [looplaw.injections]
        gated = plugins.gated:Gated
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.contract.cache_clear()
    try:
        assert registry.module_class("gated") is Gated
        assert param_counts(tiny(injection="gated")).injection == 32 * 32 + 32
    finally:
        registry.contract.cache_clear()


@pytest.mark.slow  # a DeepSpeed engine, as the step tests' Trainer tests
def test_plugin_trains_through_the_trainer_under_zero3(synthetic_data, tmp_path):  # noqa: F811 (imported fixture)
    """The production Trainer (DeepSpeed engine, the run's optimizer groups) trains a plugin-injected model, under
    ZeRO-3 too, where a parameter the plugin reads outside a submodule's forward (its gate) must still be gathered:
    the plugin's weights move with the rest (the synthetic tokens are random, so the loss has nothing to learn)."""
    import deepspeed

    from training.trainer import Trainer

    def weights(module):
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {name: p.detach().clone() for name, p in module.named_parameters()}

    _single_process_group()
    cfg = RunConfig.from_dict({
        "model": {"family": "tiny", "r": 2, "d_model": 32, "head_dim": 16, "rec_depth": 4, "vocab_size": 128,
                  "seq_len": 32, "injection": GATED, "injection_args": {"gate_init": 0.3}},
        "budget": {"tokens": 256 * 6}, "batch_tokens": 256, "micro_batch": 4, "zero_stage": 3,
        "eval_every": 6, "log_every": 3, "checkpoint_every": 100, "val_tokens": 256, "storage": str(tmp_path),
    })
    trainer = Trainer(cfg, synthetic_data)
    injection = trainer.engine.module.injection
    assert isinstance(injection, Gated)
    before = weights(injection)
    summary = trainer.fit(lambda *a: None)
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert all(math.isfinite(point["val_loss"]) for point in summary["curve"])
    after = weights(injection)
    for name in before:
        assert before[name].numel() and not torch.equal(after[name], before[name]), f"injection.{name} did not move"
