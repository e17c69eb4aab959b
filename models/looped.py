"""The looped (depth-recurrent) transformer: prelude -> r x recurrent block -> coda -> LM head."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import LoopedConfig
from models.loss import linear_cross_entropy


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim (the QK-norm)."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, None], angles.sin()[None, None]  # [1, 1, T, head_dim/2]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        q = self.q(x).view(shape).transpose(1, 2)
        k = self.k(x).view(shape).transpose(1, 2)
        v = self.v(x).view(shape).transpose(1, 2)
        # QK-norm (parameter-free, after rotary as in the study) keeps attention logits bounded when the same
        # weights are applied r times.
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Injection(nn.Module):
    """How the prelude output e enters each recurrence: `initial_state(e)` and, once, x = `injected(e)`; then per
    recurrence `step_input(x, state, i)` -> block input (`layer_input(x, h)` before each later layer of the block) and
    `step_output(state, s, i)` -> next state, where s is the block's normed output."""

    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.mode = cfg.injection
        d = cfg.d_model
        if self.mode == "concat":
            self.adapter = nn.Linear(2 * d, d, bias=False)
        elif self.mode == "diagonal":
            self.B = nn.Linear(d, d, bias=False)
            self.A_log = nn.Parameter(torch.zeros(d))  # A = exp(A_log) > 0
            self.dt = nn.Parameter(torch.full((d,), math.log(math.e - 1)))  # softplus(dt) = 1 at init
        elif self.mode == "hyperconnect":
            n, steps = cfg.hc_lanes, cfg.recurrence_steps
            self.alpha = nn.Parameter(torch.zeros(steps, n))
            self.mixing = nn.Parameter(torch.eye(n).repeat(steps, 1, 1))
            self.beta = nn.Parameter(torch.ones(steps, n))

    def reset_parameters(self) -> None:
        d = self.adapter.out_features if self.mode == "concat" else None
        with torch.no_grad():
            if self.mode == "concat":
                # [I | 0]: the first recurrence sees exactly e, the state enters as training finds it useful.
                self.adapter.weight.zero_()
                self.adapter.weight[:, :d].copy_(torch.eye(d))
            elif self.mode == "diagonal":
                self.B.weight.copy_(torch.eye(self.B.in_features))
                self.A_log.zero_()
                self.dt.fill_(math.log(math.e - 1))
            elif self.mode == "hyperconnect":
                steps, n = self.alpha.shape
                self.alpha.zero_()
                self.alpha[torch.arange(steps), torch.arange(steps) % n] = 1.0  # cyclic: step i reads lane i mod n
                self.mixing.copy_(torch.eye(n).repeat(steps, 1, 1))
                self.beta.fill_(1.0)

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        if self.mode in ("concat", "none"):
            return e  # the study's inject_init_prelude / passthrough: the state starts from the prelude output
        if self.mode == "hyperconnect":
            return e.unsqueeze(0).expand(self.alpha.shape[1], *e.shape).contiguous()  # every lane starts at e
        return torch.zeros_like(e)  # additive(_normed...), diagonal: the first block input is the injected e alone

    def step_input(self, e: torch.Tensor, state: torch.Tensor, i: int) -> torch.Tensor:
        if self.mode == "concat":
            return self.adapter(torch.cat((e, state), dim=-1))
        if self.mode == "additive":
            return state + e
        if self.mode in ("additive_normed", "additive_normed_per_layer"):
            return state + e  # e already on the state's scale (`injected`)
        if self.mode == "diagonal":
            dt = F.softplus(self.dt)
            return torch.exp(-dt * torch.exp(self.A_log)) * state + dt * self.B(e)
        if self.mode == "hyperconnect":
            return torch.einsum("n,n...->...", self.alpha[self._row(i)], state)
        return state

    def injected(self, e: torch.Tensor) -> torch.Tensor:
        """The prelude output as the recurrences receive it, computed once per forward. The normed modes put e on
        the state's scale: unnormalised, it outgrows the normed state and the block recomputes one function of e
        every recurrence (idle loops, README "Loops that work")."""
        return rms_norm(e) if self.mode in ("additive_normed", "additive_normed_per_layer") else e

    def layer_input(self, e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Input of the block's second and later layers. `additive_normed_per_layer` injects e before every layer:
        every r then injects e rec_depth times per token, so r changes how many unique layers the depth has, not
        how often the block sees the prelude output (at block-level injection a 2-layer block looped 4x sees e half
        as often as a 1-layer block looped 8x, which cost it 0.1 nats on the laptop; README "Loops that work")."""
        return h + e if self.mode == "additive_normed_per_layer" else h

    def step_output(self, state: torch.Tensor, s: torch.Tensor, i: int) -> torch.Tensor:
        if self.mode != "hyperconnect":
            return s
        row = self._row(i)
        # As the study: the mixed lanes plus beta times the block's normed output.
        mixed = torch.einsum("mn,n...->m...", self.mixing[row], state)
        return mixed + self.beta[row].view(-1, *([1] * s.dim())) * s

    def final_state(self, state: torch.Tensor) -> torch.Tensor:
        return state.sum(0) if self.mode == "hyperconnect" else state

    def _row(self, i: int) -> int:
        # Evaluating at a larger r than trained reuses the last step's hyper-connection weights.
        return min(i, self.alpha.shape[0] - 1)


class LoopedLM(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm_emb = RMSNorm(cfg.d_model)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.rec_block = nn.ModuleList(Block(cfg) for _ in range(cfg.n_rec_layers))
        self.injection = Injection(cfg)
        self.norm_recur = RMSNorm(cfg.d_model)  # on the block's output, every recurrence
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.final_norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.track_state_norms = True
        self._state_norms: list[torch.Tensor] = []
        self._state_changes: list[torch.Tensor] = []  # RMS(s_i - s_{i-1}) / RMS(s_{i-1}), i >= 2
        self._e_rms: torch.Tensor | None = None  # RMS of the prelude output e
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The study's init: block matrices uniform with std 1/sqrt(fan_in) (uniform has no outliers, and MuonH
        needs every matrix to start with a nonzero norm), embedding N(0, 1), LM head N(0, 0.001), norms at one."""
        for block in (*self.prelude, *self.rec_block, *self.coda):
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    bound = math.sqrt(3 / module.in_features)
                    nn.init.uniform_(module.weight, -bound, bound)
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.injection.reset_parameters()

    @property
    def last_state_norms(self) -> list[float]:
        """RMS of the recurrent state after each recurrence of the last forward (for monitoring)."""
        return [float(n) for n in self._state_norms]

    @property
    def last_loop_stats(self) -> dict[str, object]:
        """What the last forward's loop did: e's RMS, the state's RMS after each recurrence and its relative change
        from one recurrence to the next. An idle loop shows a large e / state ratio and changes near zero."""
        return {"e_rms": math.nan if self._e_rms is None else float(self._e_rms),
                "state_rms": self.last_state_norms,
                "state_change": [float(c) for c in self._state_changes]}

    def sample_recurrences(self) -> int:
        """Huginn-style r: Poisson with a log-normal rate of the configured mean, clipped to [1, sample_r_max]."""
        cfg = self.cfg
        sigma = cfg.sample_r_sigma
        rate = math.exp(math.log(cfg.sample_r_mean) - sigma ** 2 / 2 + sigma * float(torch.randn(())))
        return int(min(max(int(torch.poisson(torch.tensor(rate))), 1), cfg.sample_r_max))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, r: int | None = None):
        """(logits, None) without targets; (None, mean loss in nats) with them (see models.loss)."""
        cfg = self.cfg
        if r is None:
            r = self.sample_recurrences() if (self.training and cfg.sample_r_mean is not None) else cfg.r
        if r < 1:
            raise ValueError(f"r: must be >= 1, got {r}")
        t = tokens.shape[1]
        if t > self.rope_cos.shape[2]:
            cos, sin = rotary_tables(t, cfg.head_dim, device=tokens.device)
        else:
            cos, sin = self.rope_cos[:, :, :t], self.rope_sin[:, :, :t]

        x = self.norm_emb(self.embed(tokens))
        for block in self.prelude:
            x = block(x, cos, sin)
        state = self._recur(x, r, cos, sin)
        for block in self.coda:
            state = block(state, cos, sin)
        h = self.final_norm(state)
        if targets is not None:
            # Training and evaluation never need the logits, only the loss: skip the [B, T, V] fp32 tensor.
            return None, linear_cross_entropy(h, self.lm_head.weight, targets, cfg.softcap)
        logits = self.lm_head(h).float()
        if cfg.softcap:
            logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        return logits, None

    def _recur(self, e: torch.Tensor, r: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        inj = self.injection
        k = r if self.cfg.bptt_k is None else min(self.cfg.bptt_k, r)
        track = self.track_state_norms and not torch.compiler.is_compiling()
        norms: list[torch.Tensor] = []
        changes: list[torch.Tensor] = []
        previous = None
        state = inj.initial_state(e)
        x = inj.injected(e)
        for i in range(r):
            # Truncated backprop: the first r-k recurrences build no graph, so neither the block nor e
            # receives gradient through them; the last k do.
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= r - k):
                h = inj.step_input(x, state, i)
                for j, block in enumerate(self.rec_block):
                    h = block(h if j == 0 else inj.layer_input(x, h), cos, sin)
                state = inj.step_output(state, self.norm_recur(h), i)
            if track:
                s = inj.final_state(state).detach().float()
                norms.append(s.pow(2).mean().sqrt())
                if previous is not None:
                    changes.append((s - previous).pow(2).mean().sqrt() / previous.pow(2).mean().sqrt().clamp_min(1e-12))
                previous = s
        if track:
            self._state_norms = norms
            self._state_changes = changes
            self._e_rms = e.detach().float().pow(2).mean().sqrt()
        return inj.final_state(state)
