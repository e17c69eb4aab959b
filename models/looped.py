"""The looped (depth-recurrent) transformer: prelude -> r x recurrent block -> coda -> LM head."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import LoopedConfig
from models.injection import build_injection
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


class LoopedLM(nn.Module):
    def __init__(self, cfg: LoopedConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm_emb = RMSNorm(cfg.d_model)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.rec_block = nn.ModuleList(Block(cfg) for _ in range(cfg.n_rec_layers))
        self.injection = build_injection(cfg)  # the configured class, its declared parameter count checked
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
