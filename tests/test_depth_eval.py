"""Test-time depth, training side (no Ray): the eval_depths setting, its pass-through from the sweep spec,
evaluation of a looped model at depths beyond its trained r, and the depth table in the results store."""
from __future__ import annotations

import math

import pytest
import torch

from models import LoopedLM
from models.config import LoopedConfig
from training import results_store as rs
from training.config import RunConfig
from training.depth_eval import evaluate, evaluate_depths
from tuning.grid import validate
from tuning.spec import SweepSpec


def run_cfg(r: int = 2, **changes) -> RunConfig:
    return RunConfig.from_dict({"model": {"family": "tiny", "r": r, "d_model": 32, "seq_len": 32, "vocab_size": 64},
                                "budget": {"tokens": 1024}, "batch_tokens": 256, "micro_batch": 8,
                                "val_tokens": 256, **changes})


def test_default_depths_are_one_to_twice_the_trained_r_and_r1_has_none():
    assert run_cfg(2).depths == (1, 2, 3, 4)
    assert run_cfg(4).depths == tuple(range(1, 9))
    assert run_cfg(1).depths == ()  # nothing recurs in a plain transformer
    assert run_cfg(1, eval_depths=[1, 2]).depths == ()


def test_eval_depths_always_include_the_trained_r_and_leave_the_run_id_alone():
    cfg = run_cfg(4, eval_depths=[8, 1, 16, 8])
    assert cfg.eval_depths == (1, 8, 16) and cfg.depths == (1, 4, 8, 16)
    assert cfg.run_id == run_cfg(4).run_id  # evaluation after training does not change what is trained
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad", [[0, 1, 2], [2, -1], [1.5], ["2"], [], 4, [True]])
def test_eval_r_below_one_or_not_an_integer_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"^eval_depths: .*; "):
        run_cfg(2, eval_depths=bad)


def _spec(**recipe) -> SweepSpec:
    return SweepSpec.from_dict({
        "name": "unit", "storage": "/tmp/looplaw-unit-never-written",
        "model": {"family": "tiny", "vocab_size": 1024, "seq_len": 64, "head_dim": 16},
        "budgets": [{"compute": 4.0e10, "widths": [32]}], "r": [1, 2, 4],
        "recipe": {"batch_tokens": 512, "micro_batch": 8, "val_tokens": 2048, **recipe},
        "lr": {"rule": "fixed", "value": 4.0e-3}, "resources": {"num_workers": 1, "zero_stage": 0},
    })


def test_sweep_spec_passes_eval_depths_to_every_cell():
    cells = {c.r: c.run for c in validate(_spec(eval_depths=[1, 2, 8]))}
    assert cells[4].depths == (1, 2, 4, 8) and cells[2].depths == (1, 2, 8) and cells[1].depths == ()
    default = {c.r: c.run for c in validate(_spec())}
    assert default[4].depths == tuple(range(1, 9))
    assert [c.run_id for c in validate(_spec(eval_depths=[1, 2, 8]))] == [c.run_id for c in validate(_spec())]


def test_sweep_spec_with_an_eval_r_below_one_names_the_field():
    with pytest.raises(ValueError, match="eval_depths"):
        validate(_spec(eval_depths=[0, 2]))


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny forwards: on a shared CPU, several threads fight each other and run 100x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batches(cfg: LoopedConfig, n: int = 2, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g),
             torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("injection", ["hyperconnect", "diagonal", "concat"])
def test_looped_models_evaluate_beyond_their_trained_r(injection):
    cfg = LoopedConfig.tiny(r=2, d_model=32, rec_depth=4, vocab_size=64, seq_len=16, injection=injection)
    torch.manual_seed(0)
    model = LoopedLM(cfg)
    batches = _batches(cfg)
    rows = evaluate_depths(model, batches, range(1, 2 * cfg.r + 3), torch.device("cpu"))
    assert [row["eval_r"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(row["val_loss"]) and row["seconds"] >= 0 for row in rows)
    assert all(math.isnan(row["val_bpb"]) for row in rows)  # no data meta given
    # the trained depth reproduces the plain evaluation the run's final loss comes from, exactly
    assert rows[1]["val_loss"] == evaluate(model, batches, torch.device("cpu"))
    assert model.training, "evaluation hands the model back in training mode"


def test_bits_per_byte_follow_the_data_meta():
    cfg = LoopedConfig.tiny(r=2, d_model=32, rec_depth=4, vocab_size=64, seq_len=16)
    rows = evaluate_depths(LoopedLM(cfg), _batches(cfg, 1), [1, 2], torch.device("cpu"),
                           meta={"val_bytes_per_token": 3.0})
    for row in rows:
        assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2) / 3.0)


def test_evaluating_at_zero_recurrences_is_refused():
    cfg = LoopedConfig.tiny(r=2, d_model=32, rec_depth=4, vocab_size=64, seq_len=16)
    with pytest.raises(ValueError, match="^eval_depths: 0"):
        evaluate_depths(LoopedLM(cfg), _batches(cfg, 1), [0, 1], torch.device("cpu"))


DEPTHS = [{"eval_r": r, "trained_r": 2, "val_loss": 4.0 + 1 / r, "val_bpb": 2.0 + 1 / r, "seconds": 0.1}
          for r in (1, 2, 3, 4)]


def test_depth_tables_roundtrip_atomically(tmp_path):
    store = str(tmp_path / "store")
    assert rs.read_depths(store).num_rows == 0 and rs.read_depths(store, "d64-r2-a").num_rows == 0
    rs.write_depths(store, "d64-r2-a", DEPTHS)
    rs.write_depths(store, "d64-r2-b", DEPTHS[:2])
    rs.write_depths(store, "d64-r2-a", DEPTHS)  # rewriting replaces, never duplicates
    assert sorted(p.name for p in (tmp_path / "store" / "depths").iterdir()) == ["d64-r2-a.parquet",
                                                                                  "d64-r2-b.parquet"]
    table = rs.read_depths(store)
    assert table.schema == rs.DEPTH_SCHEMA and table.num_rows == 6
    one = rs.read_depths(store, "d64-r2-a").to_pylist()
    assert [d["eval_r"] for d in one] == [1, 2, 3, 4] and one[2]["val_loss"] == pytest.approx(4 + 1 / 3)
    assert {d["run_id"] for d in one} == {"d64-r2-a"}


def test_depth_rows_with_an_eval_r_below_one_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^depths.eval_r: \[0\]"):
        rs.write_depths(str(tmp_path), "d64-r2-a", [{**DEPTHS[0], "eval_r": 0}])
    with pytest.raises(ValueError, match="run_id"):
        rs.write_depths(str(tmp_path), "../x", DEPTHS)
    assert not (tmp_path / "depths").exists()
