"""The study's injection modes (and the normed ones this project added), each a class on the public contract.

Their costs are declared by their torch-free parents (models.builtin_counts); their arithmetic is the one the model
had before the contract, operation for operation, so every built-in's outputs are unchanged to the bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import builtin_counts as counts
from models.config import LoopedConfig
from models.injection import Injection
from models.looped import rms_norm


class PassThrough(counts.PassThroughCounts, Injection):
    """`none`: the state starts at e (the study's passthrough) and each recurrence's input is the state."""


class Concat(counts.ConcatCounts, Injection):
    """`concat` (the study's default): W [e | state], W initialised to [I | 0]."""

    def __init__(self, cfg: LoopedConfig):
        super().__init__(cfg)
        self.adapter = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)

    def reset_parameters(self) -> None:
        d = self.adapter.out_features
        with torch.no_grad():
            # [I | 0]: the first recurrence sees exactly e, the state enters as training finds it useful.
            self.adapter.weight.zero_()
            self.adapter.weight[:, :d].copy_(torch.eye(d))

    def step_input(self, x: torch.Tensor, state: torch.Tensor, i: int) -> torch.Tensor:
        return self.adapter(torch.cat((x, state), dim=-1))


class Additive(counts.AdditiveCounts, Injection):
    """`additive` (the study's): state + e, from a zero state, so the first block input is e alone."""

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(e)

    def step_input(self, x: torch.Tensor, state: torch.Tensor, i: int) -> torch.Tensor:
        return state + x


class AdditiveNormed(counts.AdditiveNormedCounts, Additive):
    """`additive_normed`: state + rms_norm(e). Unnormalised, e outgrows the normed state and the block recomputes one
    function of e every recurrence (idle loops, README "Loops that work"); normed once per forward."""

    def injected(self, e: torch.Tensor) -> torch.Tensor:
        return rms_norm(e)


class AdditiveNormedPerLayer(counts.AdditiveNormedPerLayerCounts, AdditiveNormed):
    """`additive_normed_per_layer`: rms_norm(e) also before every later layer of the block, so every r injects e
    rec_depth times per token and r changes how many unique layers the depth has, not how often the block sees the
    prelude output (at block-level injection a 2-layer block looped 4x sees e half as often as a 1-layer block
    looped 8x, which cost it 0.1 nats on the laptop; README "Loops that work")."""

    def layer_input(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + x


class Diagonal(counts.DiagonalCounts, Additive):
    """`diagonal` (Parcae): s <- exp(-dt*A)*s + dt*(B e), A = exp(A_log) > 0, so the decay lies in (0, 1)."""

    def __init__(self, cfg: LoopedConfig):
        super().__init__(cfg)
        d = cfg.d_model
        self.B = nn.Linear(d, d, bias=False)
        self.A_log = nn.Parameter(torch.zeros(d))
        self.dt = nn.Parameter(torch.full((d,), math.log(math.e - 1)))  # softplus(dt) = 1 at init

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.B.weight.copy_(torch.eye(self.B.in_features))
            self.A_log.zero_()
            self.dt.fill_(math.log(math.e - 1))

    def step_input(self, x: torch.Tensor, state: torch.Tensor, i: int) -> torch.Tensor:
        dt = F.softplus(self.dt)
        return torch.exp(-dt * torch.exp(self.A_log)) * state + dt * self.B(x)


class Hyperconnect(counts.HyperconnectCounts, Injection):
    """`hyperconnect` (the study's static hyper-connections): n lanes; per recurrence step the block reads
    alpha . lanes, and the lanes become mixing @ lanes + beta * (normed block output); summed before the coda."""

    def __init__(self, cfg: LoopedConfig):
        super().__init__(cfg)
        n, steps = cfg.hc_lanes, cfg.recurrence_steps
        self.alpha = nn.Parameter(torch.zeros(steps, n))
        self.mixing = nn.Parameter(torch.eye(n).repeat(steps, 1, 1))
        self.beta = nn.Parameter(torch.ones(steps, n))

    def reset_parameters(self) -> None:
        steps, n = self.alpha.shape
        with torch.no_grad():
            self.alpha.zero_()
            self.alpha[torch.arange(steps), torch.arange(steps) % n] = 1.0  # cyclic: step i reads lane i mod n
            self.mixing.copy_(torch.eye(n).repeat(steps, 1, 1))
            self.beta.fill_(1.0)

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        return e.unsqueeze(0).expand(self.alpha.shape[1], *e.shape).contiguous()  # every lane starts at e

    def step_input(self, x: torch.Tensor, state: torch.Tensor, i: int) -> torch.Tensor:
        return torch.einsum("n,n...->...", self.alpha[self._row(i)], state)

    def step_output(self, state: torch.Tensor, s: torch.Tensor, i: int) -> torch.Tensor:
        row = self._row(i)
        # As the study: the mixed lanes plus beta times the block's normed output.
        mixed = torch.einsum("mn,n...->m...", self.mixing[row], state)
        return mixed + self.beta[row].view(-1, *([1] * s.dim())) * s

    def final_state(self, state: torch.Tensor) -> torch.Tensor:
        return state.sum(0)

    def _row(self, i: int) -> int:
        # Evaluating at a larger r than trained reuses the last step's hyper-connection weights.
        return min(i, self.alpha.shape[0] - 1)
