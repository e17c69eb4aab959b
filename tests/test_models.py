"""The looped family: accounting matches the module, FLOPs follow the reference formula, training mechanics work."""
import math
import subprocess
import sys

import pytest
import torch

from models import INJECTIONS, LoopedConfig, LoopedLM
from models.accounting import (flops_per_token, inference_flops_per_token, param_counts, tokens_for_compute,
                               training_compute)


def numel(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def meta_model(cfg: LoopedConfig) -> LoopedLM:
    with torch.device("meta"):  # reference sizes are counted without allocating their weights
        return LoopedLM(cfg)


def reference_cfg(size, r, injection="concat", **kw):
    return LoopedConfig.reference(size, r, injection=injection, vocab_size=32064, seq_len=2048, **kw)


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("size,r", [(6, 2), (12, 4), (20, 8)])
def test_accounting_equals_module_parameters(injection, size, r):
    cfg = reference_cfg(size, r, injection)
    model = meta_model(cfg)
    counts = param_counts(cfg)
    assert counts.n_once == numel([model.prelude, model.coda, model.norm_emb, model.norm_recur, model.final_norm])
    assert counts.n_rec == numel([model.rec_block, model.injection])
    assert counts.n_embed == numel([model.embed, model.lm_head])
    assert counts.total == sum(p.numel() for p in model.parameters())


def test_tiny_accounting_equals_module_with_sampling_and_hyperconnect():
    cfg = LoopedConfig.tiny(r=2, injection="hyperconnect", hc_lanes=3, sample_r_mean=2.0, sample_r_max=6)
    model = LoopedLM(cfg)
    assert param_counts(cfg).n_rec == numel([model.rec_block, model.injection])
    assert param_counts(cfg).injection == 6 * (9 + 6)  # every step that sampling may reach owns its weights


@pytest.mark.parametrize("size", [6, 12, 34])
def test_r1_reference_is_a_plain_transformer(size):
    cfg = reference_cfg(size, 1)
    assert cfg.injection == "none" and cfg.effective_depth == 20
    assert (cfg.n_prelude, cfg.n_rec_layers, cfg.n_coda) == (0, 20, 0)  # the study's noloop: one stack of 20
    d, v = cfg.d_model, cfg.vocab_size
    plain_block = 12 * d * d + 2 * d  # attention 4d^2, MLP 8d^2, two norms (the QK-norm has no weights)
    expected = 20 * plain_block + 3 * d + 2 * v * d  # + norm_emb, norm_recur, final_norm
    assert sum(p.numel() for p in meta_model(cfg).parameters()) == expected
    counts = param_counts(cfg)
    assert counts.total == expected and counts.injection == 0


def test_reference_width_and_depth():
    assert [LoopedConfig.reference(s, 4).d_model for s in (6, 12, 13, 34)] == [384, 768, 896, 2176]
    for r in (2, 4, 8, 16):  # r=1 is the plain stack of 20 (test_r1_reference_is_a_plain_transformer)
        cfg = LoopedConfig.reference(12, r)
        assert cfg.n_rec_layers * r == 16 and cfg.effective_depth == 20 and cfg.head_dim == 128


FLOP_CASES = [(inj, r, k) for inj in ("concat", "diagonal", "hyperconnect")
              for r, k in [(1, None), (2, None), (4, None), (8, None), (4, 2), (8, 4), (8, 1)]
              if not (inj == "hyperconnect" and k is not None)]  # hyperconnect refuses truncation


@pytest.mark.parametrize("injection,r,bptt_k", FLOP_CASES)
def test_flops_follow_reference_formula(injection, r, bptt_k):
    cfg = reference_cfg(12, r, injection, bptt_k=bptt_k)
    model = meta_model(cfg)
    k = r if bptt_k is None else bptt_k
    n_prelude, n_coda = numel([model.prelude]), numel([model.coda])  # the norms outside blocks: no FLOPs
    n_head, n_block = numel([model.lm_head]), numel([model.rec_block])
    n_inj = numel([model.injection])
    if cfg.injection == "hyperconnect":  # per-step lane arithmetic over d-wide vectors (module docstring)
        n_inj = (cfg.hc_lanes ** 2 + 2 * cfg.hc_lanes) * cfg.d_model
    d, t, n_rec = cfg.d_model, 2048, cfg.n_rec_layers
    expected = (6 * (n_prelude + n_coda + n_head) + (2 * (r - k) + 6 * k) * (n_block + n_inj)
                + (12 * (cfg.n_prelude + cfg.n_coda) + (4 * (r - k) + 12 * k) * n_rec) * d * t)
    assert flops_per_token(cfg) == pytest.approx(expected, rel=1e-12)


def test_truncation_lowers_flops_and_compute_inverts():
    full = reference_cfg(12, 8)
    cut = reference_cfg(12, 8, bptt_k=4)
    assert flops_per_token(cut) < flops_per_token(full)
    assert inference_flops_per_token(cut) == inference_flops_per_token(full)
    assert inference_flops_per_token(full) < flops_per_token(cut)
    assert tokens_for_compute(full, training_compute(full, 1e9)) == pytest.approx(1e9)
    with pytest.raises(ValueError, match="compute"):
        tokens_for_compute(full, 0)


def test_accounting_imports_no_torch():
    code = "import sys, models.accounting as a, models; a.flops_per_token(models.LoopedConfig.reference(12, 4)); " \
           "assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("injection", ["concat", "hyperloop"])
def test_tiny_model_overfits_a_fixed_batch(injection):
    torch.manual_seed(0)
    cfg = LoopedConfig.tiny(r=4, injection=injection, vocab_size=128, seq_len=32, rec_depth=4)
    model = LoopedLM(cfg)
    tokens = torch.randint(0, 128, (4, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def _manual_truncated_loss(model: LoopedLM, x, y, r: int, k: int):
    """Independent re-implementation of the truncated loop from the model's parts (concat injection)."""
    cos, sin = model.rope_cos[:, :, : x.shape[1]], model.rope_sin[:, :, : x.shape[1]]
    e = model.norm_emb(model.embed(x))
    for b in model.prelude:
        e = b(e, cos, sin)
    state = e  # concat starts from the prelude output, as the study
    for i in range(r):
        if i == r - k:
            state = state.detach()  # the reference cut: no gradient flows into earlier recurrences
        h = model.injection.adapter(torch.cat((e if i >= r - k else e.detach(), state), -1))
        for b in model.rec_block:
            h = b(h, cos, sin)
        h = model.norm_recur(h)
        state = h if i >= r - k else h.detach()
    for b in model.coda:
        state = b(state, cos, sin)
    logits = model.lm_head(model.final_norm(state))
    logits = model.cfg.softcap * torch.tanh(logits / model.cfg.softcap)
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_truncated_backprop_matches_reference_computation():
    torch.manual_seed(0)
    r, k = 4, 1
    cfg = LoopedConfig.tiny(r=r, bptt_k=k, injection="concat", vocab_size=64, seq_len=16, rec_depth=4)
    model = LoopedLM(cfg)
    with torch.no_grad():  # move off the [I|0] init so the state really feeds forward
        model.injection.adapter.weight.add_(0.05 * torch.randn_like(model.injection.adapter.weight))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))

    got = _grads(model, model(x, y)[1])
    want = _grads(model, _manual_truncated_loss(model, x, y, r, k))
    assert got.keys() == want.keys()
    assert any(n.startswith("rec_block") for n in got)  # the looped block still learns
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)

    full_model = LoopedLM(cfg.replace(bptt_k=None))
    full_model.load_state_dict(model.state_dict())
    full = _grads(full_model, full_model(x, y)[1])
    assert not torch.allclose(full["rec_block.0.mlp.fc.weight"], got["rec_block.0.mlp.fc.weight"])


def test_truncated_graph_contains_only_last_k_recurrences():
    cfg = LoopedConfig.tiny(r=8, bptt_k=2, injection="additive", vocab_size=64, seq_len=16, rec_depth=8)
    model = LoopedLM(cfg)
    calls = []
    model.rec_block[0].register_forward_hook(lambda m, i, o: calls.append(o.requires_grad))
    model(torch.randint(0, 64, (1, 16)), torch.randint(0, 64, (1, 16)))
    assert calls == [False] * 6 + [True] * 2


@pytest.mark.parametrize("injection", INJECTIONS)
def test_changing_r_at_eval(injection):
    cfg = LoopedConfig.tiny(r=2, injection=injection, vocab_size=64, seq_len=16)
    model = LoopedLM(cfg).eval()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        for r in (1, 2, 4, 8):
            logits, _ = model(x, r=r)
            assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all()
            assert len(model.last_state_norms) == r


def test_recurrence_sampling_only_in_training():
    torch.manual_seed(0)
    cfg = LoopedConfig.tiny(r=4, rec_depth=4, vocab_size=64, seq_len=8, sample_r_mean=4.0, sample_r_max=12)
    model = LoopedLM(cfg)
    x = torch.randint(0, 64, (1, 8))
    seen = set()
    for _ in range(20):
        model(x)
        seen.add(len(model.last_state_norms))
    assert len(seen) > 2 and max(seen) <= 12 and min(seen) >= 1
    model.eval()
    model(x)
    assert len(model.last_state_norms) == 4


@pytest.mark.parametrize("kwargs,field", [
    (dict(injection="gated"), "injection"),
    (dict(bptt_k=5, r=4), "bptt_k"),
    (dict(bptt_k=0), "bptt_k"),
    (dict(injection="hyperconnect", bptt_k=1), "bptt_k"),
    (dict(n_heads=5), "n_heads"),
    (dict(d_model=0), "d_model"),
    (dict(sample_r_mean=4.0), "sample_r_max"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoopedConfig(**kwargs)


def test_reference_refuses_r_that_does_not_divide_depth():
    with pytest.raises(ValueError, match=r"LoopedConfig\.r"):
        LoopedConfig.reference(12, 3)
    with pytest.raises(ValueError, match="unknown field"):
        LoopedConfig.from_dict({"widht": 3})
    assert LoopedConfig.from_dict(LoopedConfig.reference(8, 4).to_dict()) == LoopedConfig.reference(8, 4)


def test_softcap_bounds_logits():
    cfg = LoopedConfig.tiny(r=1, vocab_size=64, seq_len=8)
    model = LoopedLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
        logits, _ = model(torch.randint(0, 64, (1, 8)))
    assert logits.abs().max() <= cfg.softcap + 1e-4
    assert math.isclose(cfg.softcap, 15.0)


@pytest.mark.parametrize("injection,bptt_k", [("concat", 2), ("hyperconnect", None), ("diagonal", None),
                                               ("hyperloop", None)])
def test_compiles_as_one_graph_at_fixed_r(injection, bptt_k):
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward without a C++ toolchain.
    torch.manual_seed(0)
    model = LoopedLM(LoopedConfig.tiny(r=4, injection=injection, bptt_k=bptt_k, vocab_size=64, seq_len=16))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randint(0, 64, (2, 16))
    _, loss = compiled(x, x)
    loss.backward()
    torch.testing.assert_close(loss, model(x, x)[1])


def test_study_init_and_norms():
    torch.manual_seed(0)
    cfg = LoopedConfig.tiny(r=2, d_model=128, head_dim=32, vocab_size=512, seq_len=16)
    model = LoopedLM(cfg)
    for name, p in model.named_parameters():
        if name.startswith(("prelude", "rec_block", "coda")) and p.ndim == 2:
            bound = math.sqrt(3 / p.shape[1])  # uniform with std 1/sqrt(fan_in): 1/sqrt(d), 1/sqrt(4d) for mlp.proj
            assert p.abs().max() <= bound and abs(p.std().item() * math.sqrt(p.shape[1]) - 1) < 0.05, name
    assert abs(model.lm_head.weight.std().item() - 1e-3) < 1e-4
    assert abs(model.embed.weight.std().item() - 1.0) < 0.02
    for norm in (model.norm_emb, model.norm_recur, model.final_norm):
        assert torch.equal(norm.weight, torch.ones(cfg.d_model))
    assert len(list(model.rec_block[0].attn.parameters())) == 4  # q, k, v, o: the QK-norm has no weights


def test_qk_norm_follows_rotary():
    from models.looped import apply_rotary

    torch.manual_seed(0)
    cfg = LoopedConfig.tiny(r=1, d_model=64, head_dim=16, vocab_size=64, seq_len=8)
    model = LoopedLM(cfg)
    attn = model.rec_block[0].attn
    x = torch.randn(2, 8, 64)
    cos, sin = model.rope_cos[:, :, :8], model.rope_sin[:, :, :8]
    heads = lambda w: (x @ w.T).view(2, 8, 4, 16).transpose(1, 2)  # noqa: E731
    rms = lambda t: t / t.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # noqa: E731
    q, k = rms(apply_rotary(heads(attn.q.weight), cos, sin)), rms(apply_rotary(heads(attn.k.weight), cos, sin))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, heads(attn.v.weight), is_causal=True)
    torch.testing.assert_close(attn(x, cos, sin), attn.o(y.transpose(1, 2).reshape(2, 8, 64)))


@pytest.mark.parametrize("injection", ["concat", "none"])
def test_state_starts_from_the_prelude_output(injection):
    cfg = LoopedConfig.tiny(r=2, injection=injection, vocab_size=64, seq_len=8)
    model = LoopedLM(cfg)
    e = torch.randn(1, 8, cfg.d_model)
    assert model.injection.initial_state(e) is e


def test_hyperconnect_writes_the_normed_block_output_to_the_lanes():
    torch.manual_seed(0)
    cfg = LoopedConfig.tiny(r=2, injection="hyperconnect", hc_lanes=2, vocab_size=64, seq_len=8)
    inj = LoopedLM(cfg).injection
    with torch.no_grad():
        inj.mixing.add_(0.1 * torch.randn_like(inj.mixing))
        inj.beta.add_(0.1 * torch.randn_like(inj.beta))
    lanes, s = torch.randn(2, 1, 8, cfg.d_model), torch.randn(1, 8, cfg.d_model)
    want = torch.einsum("mn,nbtd->mbtd", inj.mixing[1], lanes) + inj.beta[1][:, None, None, None] * s
    torch.testing.assert_close(inj.step_output(lanes, s, 1), want)


@pytest.mark.parametrize("injection", ["additive_normed", "additive_normed_per_layer"])
def test_normed_injections_match_their_definition(injection):
    """u = state + rms_norm(e) before the block (and, per layer, before every later layer of it)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    cfg = LoopedConfig.tiny(r=2, injection=injection, d_model=32, vocab_size=64, seq_len=16, rec_depth=4)
    model = LoopedLM(cfg).eval()
    tokens = torch.randint(0, 64, (2, 16))
    cos, sin = model.rope_cos[:, :, :16], model.rope_sin[:, :, :16]
    with torch.no_grad():
        e = model.norm_emb(model.embed(tokens))
        for block in model.prelude:
            e = block(e, cos, sin)
        en = F.rms_norm(e, (32,), eps=1e-6)
        state = torch.zeros_like(e)
        for _ in range(2):
            h = state + en
            for j, block in enumerate(model.rec_block):
                if j and injection == "additive_normed_per_layer":
                    h = h + en
                h = block(h, cos, sin)
            state = model.norm_recur(h)
        for block in model.coda:
            state = block(state, cos, sin)
        expected = model.lm_head(model.final_norm(state)).float()
        expected = cfg.softcap * torch.tanh(expected / cfg.softcap)
        logits, _ = model(tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    stats = model.last_loop_stats
    assert stats["e_rms"] == pytest.approx(float(e.pow(2).mean().sqrt()), rel=1e-5)
    assert len(stats["state_rms"]) == 2 and len(stats["state_change"]) == 1 and stats["state_change"][0] > 0
