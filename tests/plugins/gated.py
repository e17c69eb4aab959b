"""A plugin injection as a user would write one (README "Bring your own loop"): named by its import path,
`injection: plugins.gated:Gated` (the tests put tests/ on the path), with `injection_args: {gate_init: ...}`.

Each recurrence's block input is state + g * (W e): W a d x d projection of the prelude output, g = sigmoid of a
learned per-channel gate that starts at `gate_init`. Parameters: W (d^2) and the gate logits (d). Multiply-
accumulates per token and recurrence: d^2 for W e, which the flop counter sees, and d for g * (W e), elementwise.
"""
import math

import torch
import torch.nn as nn

from models.injection import Injection


class Gated(Injection):
    def __init__(self, cfg, gate_init: float = 0.5):
        super().__init__(cfg)
        self.gate_init = gate_init
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.gate = nn.Parameter(torch.empty(cfg.d_model))
        self.reset_parameters()

    @classmethod
    def validate(cls, cfg, gate_init: float = 0.5):
        if not 0 < gate_init < 1:
            raise ValueError(f"LoopedConfig.injection_args.gate_init: must be in (0, 1), got {gate_init!r}; "
                             "use e.g. 0.5")

    @classmethod
    def param_count(cls, cfg, gate_init: float = 0.5):
        return cfg.d_model * cfg.d_model + cfg.d_model

    @classmethod
    def macs_per_token(cls, cfg, gate_init: float = 0.5):
        return cfg.d_model * cfg.d_model + cfg.d_model

    @classmethod
    def uncounted_macs_per_token(cls, cfg, gate_init: float = 0.5):
        return cfg.d_model  # g * (W e) is elementwise: the flop counter does not see it

    def reset_parameters(self):
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(self.proj.in_features))  # nonzero: MuonH keeps a matrix on its sphere
            self.gate.fill_(math.log(self.gate_init / (1 - self.gate_init)))

    def initial_state(self, e):
        return torch.zeros_like(e)

    def step_input(self, x, state, i):
        return state + torch.sigmoid(self.gate) * self.proj(x)
