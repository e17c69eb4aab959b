"""Plugins that break the contract, each in one way, for the refusals in tests/test_plugin.py."""
import torch.nn as nn

from plugins.gated import Gated


class MiscountedParams(Gated):
    @classmethod
    def param_count(cls, cfg, gate_init: float = 0.5):
        return cfg.d_model * cfg.d_model  # forgets the gate's d parameters


class MiscountedMacs(Gated):
    @classmethod
    def macs_per_token(cls, cfg, gate_init: float = 0.5):
        return cfg.d_model  # forgets the projection's d^2


class NotAnInjection(nn.Module):
    @classmethod
    def param_count(cls, cfg):
        return 0

    @classmethod
    def macs_per_token(cls, cfg):
        return 0


not_a_class = 3
