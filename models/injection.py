"""The torch half of the injection contract, and the one place a model builds its injection.

A recurrence of the looped block runs, with x = `injected(e)` computed once per forward and the state from
`initial_state(e)`:

    h = step_input(x, state, i)                       # the block's input at recurrence i (0-based)
    for every later layer of the block: h = layer(layer_input(x, h))   (the first layer takes h as it is)
    state = step_output(state, norm_recur(h), i)      # the next state from the block's normed output

and after the last recurrence the coda receives `final_state(state)`. The state is whatever the injection makes it
(a tensor, or lanes stacked on dim 0); `final_state` must return [batch, tokens, d]: it is also what the per-
recurrence state norms are read from. The defaults below are the pass-through (`none`): the state starts at e and
each recurrence's input is the state.

A plugin subclasses `Injection`, takes `(cfg, **injection_args)` in its constructor, and declares its costs as
classmethods (models.injection_contract); `build_injection` refuses a module whose parameters differ from its
declared `param_count`, naming the class and both numbers.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from models import registry
from models.config import LoopedConfig
from models.injection_contract import InjectionContract, name_of


class Injection(nn.Module, InjectionContract):
    """How the prelude output e and the recurrent state meet at every recurrence (see the module docstring)."""

    def __init__(self, cfg: LoopedConfig, **args: Any):
        super().__init__()

    def reset_parameters(self) -> None:
        """Put the weights at their initial values (LoopedLM.reset_parameters calls it after its own init)."""

    def initial_state(self, e: torch.Tensor) -> Any:
        return e

    def injected(self, e: torch.Tensor) -> torch.Tensor:
        return e

    def step_input(self, x: torch.Tensor, state: Any, i: int) -> torch.Tensor:
        return state

    def layer_input(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h

    def step_output(self, state: Any, s: torch.Tensor, i: int) -> Any:
        return s

    def final_state(self, state: Any) -> torch.Tensor:
        return state


def build_injection(cfg: LoopedConfig) -> Injection:
    """The config's injection module, its parameter count checked against the class's declaration: N_rec (and
    every law fitted on it) is only as exact as that number."""
    cls = registry.module_class(cfg.injection)
    args = cfg.injection_args or {}
    module = cls(cfg, **args)
    declared = cls.param_count(cfg, **args)
    actual = sum(p.numel() for p in module.parameters())
    if actual != declared:
        raise ValueError(f"LoopedConfig.injection: {name_of(cls)} declares param_count {declared:,} but its module "
                         f"has {actual:,} parameters; make param_count(cfg, **args) return what __init__ registers "
                         "(N_rec counts every parameter)")
    return module


def check_plugins(models: Iterable[LoopedConfig]) -> None:
    """Build each distinct plugin injection once, so a `param_count` its module does not match fails on the driver
    before Ray starts, not in every trial's workers (the built-ins' counts are checked by the tests)."""
    seen: set[str] = set()
    for cfg in models:
        if registry.is_builtin(cfg.injection) or repr(cfg) in seen:
            continue
        seen.add(repr(cfg))
        build_injection(cfg)
