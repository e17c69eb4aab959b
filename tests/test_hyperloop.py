"""Hyperloop (models/hyperloop.py): its parameters and MACs are exactly what N_rec and F count, and one loop computes
what its docstring writes. It trains, compiles and evaluates at other depths in tests/test_models.py, with the other
injections."""
import pytest
import torch
import torch.nn.functional as F

from models import LoopedConfig, LoopedLM
from models.accounting import flops_per_token, param_counts
from models.hyperloop import Hyperloop, sinkhorn
from models.plugin import check_injection


def cfg_(**kw) -> LoopedConfig:
    return LoopedConfig.tiny(**{"r": 4, "injection": "hyperloop", "hc_lanes": 4, "d_model": 32, "head_dim": 16,
                                "rec_depth": 8, "vocab_size": 64, "seq_len": 16, **kw})


@pytest.mark.parametrize("lanes,extra", [(1, {}), (2, {}), (4, {}), (3, {"sample_r_mean": 4.0, "sample_r_max": 6})])
def test_counts_match_the_module_and_the_flop_counter(lanes, extra):
    cfg = cfg_(hc_lanes=lanes, **extra)
    measured = check_injection(Hyperloop, cfg)  # refuses a parameter or MAC count the module does not have
    n, d, steps = lanes, 32, cfg.recurrence_steps
    assert measured["params"] == param_counts(cfg).injection == steps * (n * d * (n * n + 2 * n) + n * n + 2 * n + d)
    assert measured["macs_per_token"] == d * n * (n + 1) * (n + 2)
    without = flops_per_token(cfg.replace(injection="none"))
    assert flops_per_token(cfg) == without + 6 * cfg.r * d * n * (n + 1) * (n + 2)


def test_one_loop_is_what_the_docstring_writes():
    torch.manual_seed(0)
    cfg = cfg_(hc_lanes=3)
    inj = LoopedLM(cfg).injection
    with torch.no_grad():  # move every gate off its init, so each term shows
        for p in inj.parameters():
            p.add_(0.1 * torch.randn_like(p))
    n, d, i = 3, 32, 1
    lanes, s = torch.randn(n, 2, 5, d), torch.randn(2, 5, d)
    z = F.rms_norm(lanes.permute(1, 2, 0, 3).reshape(2, 5, n * d), (n * d,), eps=1e-6)
    pre = torch.sigmoid(z @ inj.pre_weight[i] + inj.pre_bias[i])
    gates = z @ inj.mix_weight[i] + inj.mix_bias[i]
    post, res = 2 * torch.sigmoid(gates[..., :n]), sinkhorn(gates[..., n:].reshape(2, 5, n, n))
    want_in = torch.einsum("btn,nbtd->btd", pre, lanes)
    want_out = torch.einsum("btmn,nbtd->mbtd", res, lanes) + post.permute(2, 0, 1)[..., None] * (s + inj.loop_pos[i])
    torch.testing.assert_close(inj.step_input(None, lanes, i), want_in)
    torch.testing.assert_close(inj.step_output(lanes, s, i), want_out)
    torch.testing.assert_close(inj.final_state(lanes), lanes.mean(0))
    # Doubly stochastic: the last Sinkhorn pass normalises columns; after 20 passes rows are within a few percent.
    torch.testing.assert_close(res.sum(-2), torch.ones(2, 5, n))
    torch.testing.assert_close(res.sum(-1), torch.ones(2, 5, n), rtol=0, atol=0.05)


def test_initial_gates():
    """Lanes start at e; loop i reads lane i mod n (0.95 there), every lane takes the block output (post 1), and the
    mixing starts at 0.9 on the diagonal; the gates start token-independent and the position signal at zero."""
    inj = LoopedLM(cfg_(hc_lanes=4)).injection
    e = torch.randn(2, 5, 32)
    assert torch.equal(inj.initial_state(e), e.expand(4, 2, 5, 32))
    lanes = torch.randn(4, 2, 5, 32)
    for i in range(4):
        read = inj.step_input(None, lanes, i)
        weights = torch.sigmoid(torch.tensor([3.0 if k == i else -3.0 for k in range(4)]))
        torch.testing.assert_close(read, torch.einsum("n,nbtd->btd", weights, lanes))
    mixing = torch.full((4, 4), 0.1 / 3) + torch.eye(4) * (0.9 - 0.1 / 3)
    s = torch.randn(2, 5, 32)
    torch.testing.assert_close(inj.step_output(lanes, s, 2), torch.einsum("mn,nbtd->mbtd", mixing, lanes) + s)


def test_config_rules():
    with pytest.raises(ValueError, match="bptt_k"):
        cfg_(bptt_k=2)
    with pytest.raises(ValueError, match="hc_lanes"):
        cfg_(hc_lanes=0)
    assert cfg_(r=1).injection == "none"  # r = 1: nothing recurs, the variant's r=1 cell is the baseline's
