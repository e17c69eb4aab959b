"""The GPU-grade training step, checked on the CPU: the memory-lean loss, torch.compile as training applies it, the
prefetching loader's resume position, and the Trainer's step and checkpoint (DeepSpeed client_state) outside Ray."""
import copy

import pytest
import torch

from models import LoopedConfig, LoopedLM
from models.loss import linear_cross_entropy


@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_lean_loss_equals_plain_loss_and_gradients(softcap):
    torch.manual_seed(0)
    h = torch.randn(3, 37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 37))
    t[0, 3] = -1  # ignored position
    lean = linear_cross_entropy(h, w, t, softcap, chunk_rows=8)  # 111 rows: 13 full chunks and a ragged one
    (2.5 * lean).backward()
    lean_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    z = h @ w.t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    plain = torch.nn.functional.cross_entropy(z.reshape(-1, 50), t.reshape(-1), ignore_index=-1)
    (2.5 * plain).backward()
    assert lean.item() == pytest.approx(plain.item(), rel=1e-12)
    torch.testing.assert_close(lean_grads[0], h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lean_grads[1], w.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # evaluation takes the loss-only path
        assert linear_cross_entropy(h, w, t, softcap, chunk_rows=8).item() == pytest.approx(plain.item(), rel=1e-12)


def test_model_loss_is_the_softcapped_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    model = LoopedLM(LoopedConfig.tiny(r=2, vocab_size=64, seq_len=16))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    logits, none = model(x)
    none_logits, loss = model(x, y)
    assert none is None and none_logits is None  # training never builds the [B, T, V] logits
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), y.reshape(-1))
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)


def _loss_and_grads(model, x, y, r=None):
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y, r=r)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True], ids=["fixed-r", "sampled-r"])
def test_compiled_step_matches_eager(sampled):
    """compile_model as the Trainer applies it (whole forward at fixed r, each block when r is sampled) computes the
    eager model's loss and gradients; with sampling, two different r run through the same compiled blocks."""
    from training.trainer import compile_model

    extra = {"sample_r_mean": 2.0, "sample_r_max": 4} if sampled else {}
    cfg = LoopedConfig.tiny(r=2, d_model=32, head_dim=16, rec_depth=4, vocab_size=64, seq_len=16, **extra)
    torch.manual_seed(0)
    eager = LoopedLM(cfg)
    compiled = copy.deepcopy(eager)
    compile_model(compiled, sampled_r=sampled)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    for r in ((1, 3) if sampled else (None,)):
        loss_e, grads_e = _loss_and_grads(eager, x, y, r)
        loss_c, grads_c = _loss_and_grads(compiled, x, y, r)
        assert loss_c.item() == pytest.approx(loss_e.item(), rel=1e-4)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.synthetic_data import write_synthetic_prepared

    return write_synthetic_prepared(tmp_path_factory.mktemp("data"), vocab_size=128, train_tokens=40_000,
                                    val_tokens=4_000, doc_tokens=40)


def test_prefetcher_state_is_the_position_after_the_last_consumed_batch(synthetic_data):
    from training.loader import TokenLoader
    from training.prefetch import BatchPrefetcher

    reference = TokenLoader(synthetic_data, "train", 32, 4, seed=3)
    expected = [reference.next_rows() for _ in range(6)]
    loader = TokenLoader(synthetic_data, "train", 32, 4, seed=3)
    batches = BatchPrefetcher(loader, torch.device("cpu"), depth=3)
    try:
        for i in range(3):
            x, y = next(batches)
            assert torch.equal(x, torch.from_numpy(expected[i][:, :-1]))
            assert torch.equal(y, torch.from_numpy(expected[i][:, 1:]))
        state = batches.state_dict()  # the thread has packed further ahead by now
    finally:
        batches.close()
    resumed = TokenLoader(synthetic_data, "train", 32, 4, seed=3)
    resumed.load_state_dict(state)
    assert (resumed.next_rows() == expected[3]).all()


def _single_process_group():
    import os
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as sock:  # a free port: a fixed one collides with other test processes on the machine
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)


@pytest.mark.slow
def test_trainer_resumes_exactly_from_its_client_state(synthetic_data, tmp_path):
    """A Trainer restored from a mid-run checkpoint (weights, optimizer, TrainState in DeepSpeed's client_state)
    finishes with the curve an uninterrupted Trainer draws; the loss syncs only at log, eval and checkpoint steps."""
    from training.config import RunConfig
    from training.trainer import Trainer, TrainState

    _single_process_group()
    cfg = RunConfig.from_dict({
        "model": {"family": "tiny", "r": 2, "d_model": 32, "head_dim": 16, "rec_depth": 4, "vocab_size": 128,
                  "seq_len": 32, "sample_r_mean": 2.0, "sample_r_max": 3},
        "budget": {"tokens": 256 * 12}, "batch_tokens": 256, "micro_batch": 4, "zero_stage": 1,
        "eval_every": 4, "log_every": 3, "checkpoint_every": 6, "val_tokens": 256, "storage": str(tmp_path),
    })
    reports = []

    def report_and_save(trainer):
        def report(metrics, with_checkpoint, summary):
            reports.append((metrics["step"], with_checkpoint, summary is not None))
            if with_checkpoint and summary is None:
                trainer.save(str(tmp_path / f"ckpt{metrics['step']}"))
        return report

    full = Trainer(cfg, synthetic_data)
    summary = full.fit(report_and_save(full))
    assert summary["status"] == "completed" and summary["steps"] == 12
    # evals at 4, 8 and the last step report metrics; step 6 checkpoints; the end reports the summary
    assert reports == [(4, False, False), (6, True, False), (8, False, False), (12, False, False), (12, True, True)]
    assert [p["step"] for p in summary["curve"]] == [0, 4, 8, 12]

    resumed = Trainer(cfg, synthetic_data)
    resumed.restore(str(tmp_path / "ckpt6"))
    assert isinstance(resumed.state, TrainState) and resumed.state.step == 6 and resumed.state.restarts == 1
    again = resumed.fit(lambda *a: None)
    assert again["restarts"] == 1
    for a, b in zip(summary["curve"], again["curve"]):
        assert a["step"] == b["step"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5, nan_ok=True)


@pytest.mark.slow
def test_cooldown_branch_equals_the_run_trained_to_its_horizon(synthetic_data, tmp_path):
    """A wsd run with a horizon branches a cooldown off its stable phase: the branch's final loss is the loss of an
    independent run to that horizon, and the main run goes on as if no branch had run."""
    from training.config import RunConfig
    from training.trainer import Trainer

    _single_process_group()
    cfg = RunConfig.from_dict({
        "model": {"family": "tiny", "r": 2, "d_model": 32, "head_dim": 16, "rec_depth": 4, "vocab_size": 128,
                  "seq_len": 32},
        "optim": {"schedule": "wsd", "cooldown_frac": 0.5, "lr": 3e-3},
        "budget": {"tokens": 256 * 12}, "batch_tokens": 256, "micro_batch": 4, "zero_stage": 1,
        "eval_every": 6, "log_every": 2, "checkpoint_every": 100, "val_tokens": 256, "storage": str(tmp_path),
        "horizons": [256 * 6],
    })
    assert cfg.horizon_steps == [6, 12] and cfg.optim.cooldown_start(6) == 3
    with_branch = Trainer(cfg, synthetic_data).fit(lambda *a: None)
    (branch,) = with_branch["branches"]
    assert branch["steps"] == 6 and branch["cooldown_steps"] == 3 and branch["status"] == "completed"
    assert with_branch["steps_trained"] == 12 + 3

    alone = Trainer(cfg.branch_config(256 * 6), synthetic_data).fit(lambda *a: None)
    assert alone["steps"] == 6 and not alone["branches"]
    assert branch["val_loss"] == pytest.approx(alone["val_loss"], abs=1e-5)

    main_only = Trainer(cfg.replace(horizons=None), synthetic_data).fit(lambda *a: None)
    assert [p["val_loss"] for p in with_branch["curve"]] == pytest.approx(
        [p["val_loss"] for p in main_only["curve"]], abs=1e-5)
