"""The optimizer of a run: parameter groups, the LR schedule, the DeepSpeed config and the engine built from them."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from training.config import RunConfig
from training.recipe import ROLES, group_settings


def parameter_roles(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every trainable parameter by role (training.recipe.ROLES), by module type and rank rather than by name:
    embedding tables; the LM head; 2-D weights of every other Linear (block matrices, the injection's adapter);
    other tensors of rank >= 2 (hyper-connection lanes); the rest (norm gains, 1-D scalars)."""
    embed = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    linear = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    head = {id(p) for p in model.lm_head.parameters()}
    roles: dict[str, list[tuple[str, nn.Parameter]]] = {role: [] for role in ROLES}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embed:
            role = "embedding"
        elif id(p) in head:
            role = "lm_head"
        elif p.ndim >= 2:
            role = "matrices" if id(p) in linear else "lanes"
        else:
            role = "norms_scalars"
        roles[role].append((name, p))
    return roles


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """The optimizer's groups, hyperparameters from training.recipe. adamw: one group per role. muonh: AdamW groups
    flagged `use_muon: False`, and one MuonH group per block matrix carrying its initial Frobenius norm.

    Each group carries `base_lr` (its peak) so the schedule can be applied by multiplying, whatever wraps the optimizer.
    """
    settings = group_settings(cfg)
    groups = []
    for role, named in parameter_roles(model).items():
        if not named:
            continue
        if cfg.optim.optimizer == "muonh" and role == "matrices":
            # One matrix per group: under ZeRO a group's partition then holds a slice of one matrix, whose norm
            # the optimizer can complete with one all-reduce (training.muonh).
            groups += [{"name": f"matrices:{name}", "params": [p], **settings[role], "use_muon": True,
                        "sphere_norm": float(p.detach().float().norm())} for name, p in named]
            continue
        group = {"name": role, "params": [p for _, p in named], **settings[role]}
        if cfg.optim.optimizer == "muonh":
            group["use_muon"] = False
        groups.append(group)
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def apply_lr(optimizer: Any, multiplier: float) -> None:
    """Set every group to base_lr * multiplier (the schedule is a function of the step: resume needs no scheduler state)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier


def deepspeed_config(cfg: RunConfig, on_gpu: bool) -> dict[str, Any]:
    """ZeRO stage, accumulation and clipping from the run. adamw: DeepSpeed builds torch's AdamW (no JIT build on
    CPU). muonh: the optimizer is ours (build_engine), a subclass of DeepSpeed's Muon that ZeRO is told to accept."""
    o = cfg.optim
    config: dict[str, Any] = {
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * cfg.num_workers,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": on_gpu},
        # Every node's local rank 0 writes the model states too, so a cooldown branch's snapshot in node-local /tmp
        # loads on every rank (training.trainer.Trainer.run_branch).
        "checkpoint": {"use_node_local_storage": True},
        "steps_per_print": 10 ** 9,  # the loop does its own logging
        "wall_clock_breakdown": False,
    }
    if o.optimizer == "adamw":
        config["optimizer"] = {
            "type": "AdamW",
            # torch_adam: DeepSpeed's FusedAdam would JIT-compile a C++/CUDA op on first use (~70 s on CPU).
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": True, **({"fused": True} if on_gpu else {})},
        }
    else:
        config["zero_allow_untested_optimizer"] = True  # ZeRO lists DeepSpeed's Muon class, not subclasses
        if on_gpu:
            config["data_types"] = {"grad_accum_dtype": "fp32"}  # DeepSpeed's bf16 Muon needs fp32 accumulation
    if cfg.zero_stage == 3:
        # Params of the recurrent block are fetched once per recurrence: keep prefetch simple and the trace
        # from being invalidated by the varying module order of recurrence sampling.
        config["zero_optimization"].update({"stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 0})
        if o.optimizer == "muonh":
            config["zero_optimization"]["reduce_scatter"] = False  # DeepSpeed's ZeRO-3 Muon all-reduces gradients
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
    """Wrap `model` (already on its device) in a DeepSpeed engine with the run's ZeRO stage, accumulation, clipping
    and optimizer recipe."""
    import deepspeed

    _skip_shm_comm_op()
    groups = param_groups(model, cfg)
    config = deepspeed_config(cfg, on_gpu)
    if cfg.optim.optimizer == "adamw":
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
        return engine
    from training.muonh import MuonHWithAuxAdam

    for group in groups:  # the flag DeepSpeed's ZeRO reads to orthogonalise a matrix before partitioning it
        for p in group["params"]:
            p.use_muon = group["use_muon"]
    optimizer = MuonHWithAuxAdam(groups, fused_adam=on_gpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine
