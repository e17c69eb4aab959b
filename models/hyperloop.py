"""Hyperloop (arXiv 2604.21254, Zeitoun, Torroba-Hennigen, Kim): loop-level hyper-connections, written on the
public injection contract (the worked example of README "Bring your own loop").

The paper organises a looped transformer into begin, middle and end blocks (here prelude, recurrent block, coda),
loops only the middle block, and gives the loop matrix-valued residual streams: hyper-connections (the manifold-
constrained kind, mHC, Xie et al. 2026) applied once per loop rather than at every layer, so they add few
parameters and little compute. Per loop i, with the n lanes Y (n x d per token):

    z     = RMSNorm(flatten(Y))                              # the lanes of one token, n*d wide
    pre   = sigmoid(z W_pre[i] + b_pre[i])                   # n gates: what the block reads
    post  = 2 sigmoid(z W_post[i] + b_post[i])               # n gates: how much of its output each lane takes
    res   = Sinkhorn(z W_res[i] + b_res[i])                  # n x n lane mixing, doubly stochastic (mHC)
    out   = block(pre . Y) , normed, + loop_pos[i]           # the looped middle block, its loop position signal
    Y     = res Y + post (x) out
and the end block receives the lanes' mean.

What the paper's text available here does not pin down, chosen here (and said in README "Hyperloop"):
- every gate weight and bias is per loop (loop i has its own), for every loop training may run
  (cfg.recurrence_steps); evaluating deeper than trained reuses the last loop's gates, as hyperconnect does;
- the gates read a parameter-free RMSNorm of the flattened lanes (eps 1e-6) and have no mHC gating factor alpha
  (it only rescales W at init; here W starts at zero, so the gates start token-independent and learn their token
  dependence);
- res: 20 Sinkhorn-Knopp iterations (rows, then columns) of exp(logits - max), as mHC, computed in fp32;
- the block's output is the platform's normed one (norm_recur, as the study's every recurrence), and the loop
  position signal is a learned d-vector per loop, zero at init, added to it before it is written to the lanes;
- initial values: every lane starts at the prelude output e; pre reads lane i mod n (bias +3 there, -3 elsewhere:
  gates 0.95 / 0.05), which breaks the symmetry between lanes as the study's hyperconnect does; post = 1
  (bias 0); res = 0.9 on the diagonal and 0.1/(n-1) elsewhere (bias log(9(n-1)) on the diagonal, 0 elsewhere);
- truncated backprop is refused (the early loops' gates would get no gradient), as for hyperconnect.

Parameters (all in N_rec) and multiply-accumulates (in F) are declared by models.builtin_counts.HyperloopCounts,
torch-free so that models.accounting never needs torch for a built-in; the platform checks the parameters whenever
a model is built, and tests/test_hyperloop.py checks the MACs against torch's flop counter
(models.plugin.check_injection).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.builtin_counts import HyperloopCounts
from models.config import LoopedConfig
from models.injection import Injection

SINKHORN_ITERATIONS = 20
PRE_BIAS = 3.0  # sigmoid(3) = 0.95 on the lane a loop reads first, sigmoid(-3) = 0.05 on the others
RES_DIAGONAL = 0.9  # initial weight of a lane on itself in the mixing


def sinkhorn(logits: torch.Tensor, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """A doubly stochastic matrix (rows and columns sum to one) over the last two dims, from unconstrained logits:
    the mixing then neither grows nor shrinks the lanes' total, whatever the depth (mHC's manifold constraint)."""
    m = torch.exp((logits - logits.amax(dim=(-2, -1), keepdim=True)).float())  # fp32: 40 bf16 divisions would drift
    for _ in range(iterations):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m.to(logits.dtype)


class Hyperloop(HyperloopCounts, Injection):
    """`injection: hyperloop` with `hc_lanes` lanes (see the module docstring). The state is the lanes, [n, B, T, d]."""

    def __init__(self, cfg: LoopedConfig):
        super().__init__(cfg)
        n, d, steps = cfg.hc_lanes, cfg.d_model, cfg.recurrence_steps
        self.lanes = n
        # Stacked per-loop tensors, not Linear modules: the optimizer treats them as lanes (AdamW under both recipes,
        # training/optim.py), so they may start at zero, which MuonH's sphere would not allow a block matrix.
        self.pre_weight = nn.Parameter(torch.zeros(steps, n * d, n))
        self.pre_bias = nn.Parameter(torch.zeros(steps, n))
        self.mix_weight = nn.Parameter(torch.zeros(steps, n * d, n + n * n))  # post gates, then res logits
        self.mix_bias = nn.Parameter(torch.zeros(steps, n + n * n))
        self.loop_pos = nn.Parameter(torch.zeros(steps, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        steps, n = self.pre_bias.shape
        with torch.no_grad():
            self.pre_weight.zero_()
            self.mix_weight.zero_()
            self.loop_pos.zero_()
            self.pre_bias.fill_(-PRE_BIAS)
            self.pre_bias[torch.arange(steps), torch.arange(steps) % n] = PRE_BIAS  # loop i reads lane i mod n
            self.mix_bias.zero_()  # post = 2 * sigmoid(0) = 1
            diagonal = math.log(RES_DIAGONAL / (1 - RES_DIAGONAL) * (n - 1)) if n > 1 else 0.0
            self.mix_bias[:, n:].view(steps, n, n).diagonal(dim1=-2, dim2=-1).fill_(diagonal)

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        return e.unsqueeze(0).expand(self.lanes, *e.shape).contiguous()  # every lane starts at e

    def step_input(self, x: torch.Tensor, state: torch.Tensor, i: int) -> torch.Tensor:
        row, lanes = self._row(i), state.permute(1, 2, 0, 3)  # [B, T, n, d]
        pre = torch.sigmoid(self._gate_input(lanes) @ self.pre_weight[row] + self.pre_bias[row])  # [B, T, n]
        return (pre.unsqueeze(-2) @ lanes).squeeze(-2)  # a matrix product even for one lane: counted as one

    def step_output(self, state: torch.Tensor, s: torch.Tensor, i: int) -> torch.Tensor:
        # The gates read the same lanes step_input read (the state has not changed in between): the pre gate there
        # and these here cost the projections once each.
        row, n, lanes = self._row(i), self.lanes, state.permute(1, 2, 0, 3)
        gates = self._gate_input(lanes) @ self.mix_weight[row] + self.mix_bias[row]  # [B, T, n + n^2]
        post = 2 * torch.sigmoid(gates[..., :n])
        res = sinkhorn(gates[..., n:].unflatten(-1, (n, n)))  # [B, T, n, n]
        mixed = (res @ lanes).permute(2, 0, 1, 3)  # [n, B, T, d]
        return mixed + post.permute(2, 0, 1).unsqueeze(-1) * (s + self.loop_pos[row])

    def final_state(self, state: torch.Tensor) -> torch.Tensor:
        return state.mean(0)

    def _gate_input(self, lanes: torch.Tensor) -> torch.Tensor:
        flat = lanes.flatten(-2)  # one token's lanes side by side, n*d wide
        return F.rms_norm(flat, (flat.shape[-1],), eps=1e-6)

    def _row(self, i: int) -> int:
        return min(i, self.pre_bias.shape[0] - 1)
