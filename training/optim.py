"""The optimizer of a run: parameter groups, the LR schedule, the DeepSpeed config and the engine built from them."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from training.config import RunConfig


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """Three groups: embedding tables, weight matrices (decayed; the LM head is one), norms and scalars.

    Grouped by module type and rank rather than by name so any model of the family is split the same way.
    Each group carries `base_lr` (its peak) so the schedule can be applied by multiplying, whatever wraps the optimizer.
    """
    o = cfg.optim
    embed_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    embed, matrices, scalars = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in embed_ids:
            embed.append(p)
        elif p.ndim >= 2:
            matrices.append(p)
        else:
            scalars.append(p)
    groups = [
        {"name": "embedding", "params": embed, "lr": o.lr * o.embed_lr_mult, "weight_decay": 0.0},
        {"name": "matrices", "params": matrices, "lr": o.lr, "weight_decay": o.weight_decay},
        {"name": "norms_scalars", "params": scalars, "lr": o.lr * o.norm_lr_mult, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def apply_lr(optimizer: Any, multiplier: float) -> None:
    """Set every group to base_lr * multiplier (the schedule is a function of the step: resume needs no scheduler state)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier


def deepspeed_config(cfg: RunConfig, on_gpu: bool) -> dict[str, Any]:
    """ZeRO stage, accumulation and clipping from the run; AdamW built by DeepSpeed from torch (no JIT build on CPU)."""
    o = cfg.optim
    config: dict[str, Any] = {
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * cfg.num_workers,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: DeepSpeed's FusedAdam would JIT-compile a C++/CUDA op on first use (~70 s on CPU).
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": True, **({"fused": True} if on_gpu else {})},
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": on_gpu},
        # Every node's local rank 0 writes the model states too, so a cooldown branch's snapshot in node-local /tmp
        # loads on every rank (training.trainer.Trainer.run_branch).
        "checkpoint": {"use_node_local_storage": True},
        "steps_per_print": 10 ** 9,  # the loop does its own logging
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage == 3:
        # Params of the recurrent block are fetched once per recurrence: keep prefetch simple and the trace
        # from being invalidated by the varying module order of recurrence sampling.
        config["zero_optimization"].update({"stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 0})
    return config


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op (~75 s on a fresh machine).

    The op only serves `inference_all_reduce`; training collectives go through the torch process group.
    DeepSpeed builds it when its comm backend starts if its compatibility table says it can, and it keeps
    that table as an editable module-level dict, so marking the op unavailable there is the supported switch.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model: torch.nn.Module, cfg: RunConfig, on_gpu: bool):
    """Wrap `model` in a DeepSpeed engine with the run's ZeRO stage, accumulation, clipping and AdamW groups."""
    import deepspeed

    _skip_shm_comm_op()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg),
                                           config=deepspeed_config(cfg, on_gpu))
    return engine
