"""Exact parameter and training-FLOP accounting of the looped family, as arXiv 2604.21106 counts them.

Imports no torch. Embeddings are excluded from N_once / N_rec; the LM head is counted in FLOPs. The three norms
outside the blocks (norm_emb, norm_recur, final_norm) count in N_once and, as in the study, not in FLOPs.

Training FLOPs per token, with k = bptt_k (k = r for full backprop), T = seq_len, d = width:

    F = 6*(N_prelude + N_coda + N_lm_head)
        + (2*(r-k) + 6*k) * (N_rec_block + N_inj)
        + [12*(n_prelude + n_coda) + (4*(r-k) + 12*k) * n_rec_layers] * d * T

Recurrences outside the truncation window run forward only (2 FLOPs per weight), the others forward and backward (6).

The injection's two numbers are its own declarations (models.injection_contract): N_inj in N_rec is its
`param_count`, and in the FLOP term N_inj is its `macs_per_token`, the multiply-accumulates per token of one
recurrence. For most built-ins the two agree (every weight used once per token); hyper-connection lanes
(hyperconnect, hyperloop) are per-recurrence weights applied to d-wide lanes, so their MACs scale with d instead
(models.builtin_counts). A built-in's declaration needs no torch; a plugin's is its class, imported by path.
"""
from __future__ import annotations

from dataclasses import dataclass

from models import registry
from models.config import LoopedConfig


@dataclass(frozen=True)
class ParamCounts:
    prelude: int  # prelude blocks
    coda: int  # coda blocks
    norms: int  # norm_emb, norm_recur, final_norm (the study's "scalars": run once per token in its count)
    rec_block: int  # the looped block, counted once
    injection: int  # input-injection parameters (all recurrence steps for the lane modes)
    embedding: int
    lm_head: int

    @property
    def n_once(self) -> int:
        return self.prelude + self.coda + self.norms

    @property
    def n_rec(self) -> int:
        return self.rec_block + self.injection

    @property
    def n_embed(self) -> int:
        return self.embedding + self.lm_head

    @property
    def total(self) -> int:
        return self.n_once + self.n_rec + self.n_embed


def block_params(cfg: LoopedConfig) -> int:
    """One pre-norm block: q,k,v,o projections, ReLU^2 MLP, two RMSNorm weights (the QK-norm has none)."""
    d, attn = cfg.d_model, cfg.n_heads * cfg.head_dim
    return 4 * d * attn + 2 * cfg.mlp_ratio * d * d + 2 * d


def injection_params(cfg: LoopedConfig) -> int:
    """The injection's trainable parameters, as its class declares them (the model refuses a module that differs)."""
    return registry.contract(cfg.injection).param_count(cfg, **(cfg.injection_args or {}))


def injection_macs_per_token(cfg: LoopedConfig) -> int:
    """Multiply-accumulates per token of one injection step (see the module docstring)."""
    return registry.contract(cfg.injection).macs_per_token(cfg, **(cfg.injection_args or {}))


def param_counts(cfg: LoopedConfig) -> ParamCounts:
    block = block_params(cfg)
    vd = cfg.vocab_size * cfg.d_model
    return ParamCounts(prelude=cfg.n_prelude * block, coda=cfg.n_coda * block, norms=3 * cfg.d_model,
                       rec_block=cfg.n_rec_layers * block, injection=injection_params(cfg), embedding=vd, lm_head=vd)


def flops_per_token(cfg: LoopedConfig) -> float:
    """Training FLOPs (forward + backward) per token, the reference study's definition."""
    p = param_counts(cfg)
    r, k = cfg.r, cfg.backprop_recurrences
    dense = 6 * (p.prelude + p.coda + p.lm_head)
    looped = (2 * (r - k) + 6 * k) * (p.rec_block + injection_macs_per_token(cfg))
    attention = (12 * (cfg.n_prelude + cfg.n_coda) + (4 * (r - k) + 12 * k) * cfg.n_rec_layers) * cfg.d_model * cfg.seq_len
    return float(dense + looped + attention)


def inference_flops_per_token(cfg: LoopedConfig) -> float:
    """Forward-only FLOPs per token at the config's r (what serving one token costs)."""
    p = param_counts(cfg)
    r = cfg.r
    weights = 2 * (p.prelude + p.coda + p.lm_head) + 2 * r * (p.rec_block + injection_macs_per_token(cfg))
    attention = 4 * (cfg.n_prelude + cfg.n_coda + r * cfg.n_rec_layers) * cfg.d_model * cfg.seq_len
    return float(weights + attention)


def training_compute(cfg: LoopedConfig, tokens: float) -> float:
    """C = F * D."""
    if tokens < 0:
        raise ValueError(f"tokens: must be >= 0, got {tokens!r}")
    return flops_per_token(cfg) * tokens


def tokens_for_compute(cfg: LoopedConfig, compute: float) -> float:
    """D = C / F: training tokens that spend a FLOP budget."""
    if not compute > 0:
        raise ValueError(f"compute: must be a positive FLOP count, got {compute!r}")
    return compute / flops_per_token(cfg)
