"""Checks a user calls in their tests: an injection's declared costs against what its module really holds and does.

    from models.plugin import check_injection
    check_injection(GatedInjection, LoopedConfig.tiny(r=4, d_model=32, head_dim=16, seq_len=32), gate_init=0.5)

Parameters: building the model compares the module's parameters with `param_count` (models.injection). MACs: one
forward of the model through `torch.utils.flop_counter.FlopCounterMode`, less the same forward with the pass-through
injection, is what the injection adds; over r recurrences and T tokens it must equal `macs_per_token` minus
`uncounted_macs_per_token` (the counter sees matrix products only, as F counts no norm or activation). A mismatch is
refused naming the class and both numbers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from models import registry
from models.config import LoopedConfig
from models.injection_contract import name_of
from models.looped import LoopedLM


def _forward_flops(cfg: LoopedConfig) -> int:
    torch.manual_seed(0)  # the weights do not change the count; a fixed seed keeps a failing check repeatable
    model = LoopedLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens)
    return counter.get_total_flops()


def check_injection(injection: type | str, cfg: LoopedConfig, **args: Any) -> dict[str, int]:
    """Build `cfg` with `injection` (a class, its import path, or a built-in name) and `args`, and refuse declared
    costs the module does not have. Returns the measured {params, macs_per_token}. Use a small config: it runs two
    forwards of one sequence of cfg.seq_len tokens on the CPU."""
    name = injection if isinstance(injection, str) else name_of(injection)
    cfg = cfg.replace(injection=name, injection_args=args or None, bptt_k=None)  # validates, as a run would
    contract = registry.contract(name)
    model = LoopedLM(cfg)  # refuses a param_count that differs from the module's parameters
    params = sum(p.numel() for p in model.injection.parameters())
    added = _forward_flops(cfg) - _forward_flops(cfg.replace(injection="none", injection_args=None))
    measured, rem = divmod(added, 2 * cfg.r * cfg.seq_len)  # a multiply-accumulate is 2 FLOPs to the counter
    declared = contract.macs_per_token(cfg, **args)
    counted = declared - contract.uncounted_macs_per_token(cfg, **args)
    if rem or measured != counted:
        raise ValueError(f"{name_of(registry.module_class(name))}: declares macs_per_token {declared:,} "
                         f"(of which {counted:,} matrix-product MACs the flop counter sees), FlopCounterMode measured "
                         f"{added / (2 * cfg.r * cfg.seq_len):,g} per token and recurrence; fix macs_per_token (matrix "
                         "products; elementwise products it counts go in uncounted_macs_per_token)")
    return {"params": params, "macs_per_token": declared}
