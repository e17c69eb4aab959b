"""The hyperparameters of each parameter group of a run, by recipe: peak LR, betas, eps, weight decay.

Parameters are grouped by role (training.optim assigns them): `embedding`, `lm_head`, `matrices` (every 2-D block
matrix, the injection's Linear included), `norms_scalars` (norm gains, 1-D scalars) and `lanes` (hyper-connection
alpha / mixing / beta). Imports no torch, so the numbers can be checked and printed without building a model.

The muonh numbers are the study's (kschwethelm/looped-lm-scaling: scripts/base_train.py, nanochat/gpt.py
`setup_optimizer`, HyperP arXiv 2603.28743):
- matrices (MuonH): lr * (B/2^18)^0.558 * (D/D_ref)^-0.32, D the run's training tokens and D_ref ten tokens per
  effective parameter of the size-10 model of the run's kind (looped 2 + 4x4 + 2 for r > 1, else the dense stack);
- AdamW: embedding 0.3 and lm_head 0.004, both times (B/2^18)^0.558; norms 0.005 and lanes 0.01; all four times
  (d/640)^-0.5 (muP width scaling against the size-10 width); betas, eps from the config; no weight decay.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from models.accounting import param_counts
from models.config import LoopedConfig
from training.config import RunConfig

ROLES = ("embedding", "lm_head", "matrices", "norms_scalars", "lanes")

STUDY_ADAMW_LR = {"embedding": 0.3, "lm_head": 0.004, "norms_scalars": 0.005, "lanes": 0.01}
STUDY_BATCH_SCALED = ("embedding", "lm_head", "matrices")
STUDY_REF_WIDTH = 640  # d of size 10 (10 x aspect ratio 64)
STUDY_REF_BATCH = 2 ** 18  # tokens
STUDY_BATCH_EXPONENT = 0.558
STUDY_DATA_EXPONENT = -0.32
STUDY_REF_SIZE = 10
STUDY_REF_TOKENS_PER_PARAM = 10
MUON_MOMENTUM = 0.95  # Nesterov
# DeepSpeed's Newton-Schulz (5 quintic steps in bf16): the study's Polar Express coefficients have no DeepSpeed
# switch. `gram` is the same map computed in fp16.
MUON_NS_METHOD = "standard"


@lru_cache(maxsize=None)
def study_reference_tokens(looped: bool) -> float:
    """D_ref: ten tokens per effective (non-embedding) parameter of the size-10 reference model."""
    ref = LoopedConfig.reference(STUDY_REF_SIZE, 4 if looped else 1, injection="concat")
    counts = param_counts(ref)
    return float(STUDY_REF_TOKENS_PER_PARAM * (counts.n_once + ref.r * counts.n_rec))


def study_scales(cfg: RunConfig) -> dict[str, float]:
    """The study's three transfer factors for this run: batch, width (AdamW groups) and data (matrices)."""
    return {
        "batch": (cfg.batch_tokens / STUDY_REF_BATCH) ** STUDY_BATCH_EXPONENT,
        "width": (cfg.model.d_model / STUDY_REF_WIDTH) ** -0.5,
        "data": (cfg.target_tokens / study_reference_tokens(cfg.model.r > 1)) ** STUDY_DATA_EXPONENT,
    }


def group_settings(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Role -> optimizer settings of its group (peak `lr`; AdamW roles: betas, eps, weight_decay; MuonH: momentum)."""
    o = cfg.optim
    adam = {"betas": (o.beta1, o.beta2), "eps": o.eps}
    if o.optimizer == "adamw":
        lr = {"embedding": o.lr * o.embed_lr_mult, "lm_head": o.lr, "matrices": o.lr,
              "norms_scalars": o.lr * o.norm_lr_mult, "lanes": o.lr * o.norm_lr_mult}
        return {role: {"lr": lr[role], **adam, "weight_decay": o.weight_decay if role == "matrices" else 0.0}
                for role in ROLES}
    scale = study_scales(cfg)
    out: dict[str, dict[str, Any]] = {}
    for role, base in STUDY_ADAMW_LR.items():
        lr = base * scale["width"] * (scale["batch"] if role in STUDY_BATCH_SCALED else 1.0)
        out[role] = {"lr": lr, **adam, "weight_decay": 0.0}
    out["matrices"] = {"lr": o.lr * scale["batch"] * scale["data"], "momentum": MUON_MOMENTUM, "weight_decay": 0.0,
                       "ns_method": MUON_NS_METHOD}
    return out
