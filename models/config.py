"""The iso-depth looped-transformer family as one frozen, validated config.

Imports no torch: analysis and cluster planning build configs on machines without it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from models import registry
from models.builtin_counts import BUILTIN
from models.validate import fail, integer

# The built-in modes; `injection` also takes an entry point name or an import path (models.registry).
INJECTIONS = tuple(BUILTIN)

# Reference recipe of arXiv 2604.21106: effective depth 2 + 16 + 2, head dim 128.
REFERENCE_PRELUDE = 2
REFERENCE_REC_DEPTH = 16
REFERENCE_CODA = 2
REFERENCE_HEAD_DIM = 128


def _layout(n_prelude: int, rec_depth: int, n_coda: int, r: int) -> dict[str, int]:
    """Prelude, block and coda of an iso-depth family member. At r=1 every layer sits in the block, as in the
    study's dense baseline: its norm_recur then closes the stack instead of cutting it before the coda."""
    if r == 1:
        return {"n_prelude": 0, "n_rec_layers": n_prelude + rec_depth + n_coda, "n_coda": 0, "r": 1}
    return {"n_prelude": n_prelude, "n_rec_layers": rec_depth // r, "n_coda": n_coda, "r": r}


def _injection(r: int, injection: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """A family member's injection: none at r=1 (nothing recurs), so a variant's plugin and its arguments leave the
    r=1 cells equal to the baseline's."""
    return {"injection": "none", "injection_args": None} if r == 1 else {"injection": injection, "injection_args": args}


def _plain_data(value: Any) -> bool:
    """JSON-like data only: injection arguments are hashed into the run id and stored in the run's row."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain_data(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def reference_width(size: int) -> int:
    """Width of the reference recipe for size s: d = ceil(64*s/128)*128."""
    return math.ceil(64 * size / 128) * 128


@dataclass(frozen=True)
class LoopedConfig:
    """Prelude of `n_prelude` unique blocks, a block of `n_rec_layers` layers run `r` times, a coda of `n_coda` blocks."""

    vocab_size: int = 32064
    d_model: int = 768
    n_heads: int = 6
    head_dim: int = 128
    n_prelude: int = 2
    n_rec_layers: int = 4
    n_coda: int = 2
    r: int = 4
    injection: str = "concat"  # a built-in mode, an entry point name, or a plugin's import path module:Class
    injection_args: dict[str, Any] | None = None  # keyword arguments of a plugin injection (None: none)
    hc_lanes: int = 2
    bptt_k: int | None = None  # None: gradients through every recurrence
    seq_len: int = 2048
    softcap: float = 15.0
    mlp_ratio: int = 4
    # Huginn-style recurrence sampling during training: r ~ Poisson(lambda), log lambda ~ N(log mean - sigma^2/2, sigma).
    sample_r_mean: float | None = None
    sample_r_max: int | None = None
    sample_r_sigma: float = 0.5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "head_dim", "n_rec_layers", "r", "seq_len", "mlp_ratio"):
            integer(f"LoopedConfig.{name}", getattr(self, name))
        for name in ("n_prelude", "n_coda"):
            integer(f"LoopedConfig.{name}", getattr(self, name), minimum=0)
        if self.n_heads * self.head_dim != self.d_model:
            fail("LoopedConfig.n_heads", f"n_heads*head_dim = {self.n_heads}*{self.head_dim} != d_model = {self.d_model}",
                 "choose n_heads = d_model // head_dim")
        if self.head_dim % 2:
            fail("LoopedConfig.head_dim", f"must be even for rotary embeddings, got {self.head_dim}", "use an even head_dim")
        injection = self._checked_injection()
        if self.bptt_k is not None:
            if not isinstance(self.bptt_k, int) or isinstance(self.bptt_k, bool) or self.bptt_k < 1:
                fail("LoopedConfig.bptt_k", f"must be None or an integer >= 1, got {self.bptt_k!r}", "use None for full backprop")
            if self.bptt_k > self.r:
                fail("LoopedConfig.bptt_k", f"{self.bptt_k} exceeds r = {self.r}", "use bptt_k <= r (or None for full backprop)")
            if not injection.truncation:
                fail("LoopedConfig.bptt_k", f"truncated backprop with {self.injection} is refused (its per-recurrence "
                     "weights before the window would get no gradient; the reference study refuses it for "
                     "hyperconnect)", "set bptt_k=None or use another injection")
        if not (isinstance(self.softcap, (int, float)) and self.softcap >= 0):
            fail("LoopedConfig.softcap", f"must be >= 0 (0 disables), got {self.softcap!r}", "use e.g. 15.0")
        if self.sample_r_mean is not None:
            if not self.sample_r_mean > 0:
                fail("LoopedConfig.sample_r_mean", f"must be > 0, got {self.sample_r_mean!r}", "use None to disable sampling")
            if self.sample_r_max is None or self.sample_r_max < 1:
                fail("LoopedConfig.sample_r_max", "must be an integer >= 1 when sample_r_mean is set", "cap it, e.g. 2*r")
            if not self.sample_r_sigma > 0:
                fail("LoopedConfig.sample_r_sigma", f"must be > 0, got {self.sample_r_sigma!r}", "use e.g. 0.5")
        self._check_declared_costs(injection)

    def _checked_injection(self) -> type:
        """Resolve the injection (an unknown name, a bad path or a class off the contract fails here, before Ray
        starts), bind its arguments and let it check the config."""
        injection = registry.contract(self.injection)
        args = self.injection_args
        if args is not None:
            if not isinstance(args, dict) or not all(isinstance(k, str) for k in args) or not _plain_data(args):
                fail("LoopedConfig.injection_args", f"must map argument names to plain values (numbers, strings, "
                     f"booleans, lists), got {args!r}", "write injection_args: {name: value}")
            if not args:
                object.__setattr__(self, "injection_args", None)  # frozen: {} and None are one experiment
        registry.check_args(self.injection, self.injection_args or {})
        injection.validate(self, **(self.injection_args or {}))
        return injection

    def _check_declared_costs(self, injection: type) -> None:
        """Ask for the declared costs once, so a plugin whose counts fail does so here rather than in accounting."""
        for name in ("param_count", "macs_per_token", "uncounted_macs_per_token"):
            try:
                value = getattr(injection, name)(self, **(self.injection_args or {}))
            except ValueError:
                raise
            except Exception as exc:
                fail("LoopedConfig.injection", f"{injection.__qualname__}.{name} raised {type(exc).__name__}: {exc}",
                     f"fix {name}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail("LoopedConfig.injection", f"{injection.__qualname__}.{name} returned {value!r}",
                     "declare a non-negative integer")

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def effective_depth(self) -> int:
        return self.n_prelude + self.r * self.n_rec_layers + self.n_coda

    @property
    def backprop_recurrences(self) -> int:
        """k in the FLOP formula: recurrences that carry a backward pass."""
        return self.r if self.bptt_k is None else self.bptt_k

    @property
    def recurrence_steps(self) -> int:
        """Steps that own hyper-connection parameters (the most r any training step runs)."""
        return max(self.r, self.sample_r_max or 0)

    # ---- constructors --------------------------------------------------------------------------------------
    @classmethod
    def reference(cls, size: int, r: int, bptt_k: int | None = None, injection: str = "concat",
                  vocab_size: int = 32064, seq_len: int = 2048, hc_lanes: int = 2,
                  injection_args: dict[str, Any] | None = None, **overrides: Any) -> "LoopedConfig":
        """Reference recipe: d = ceil(64*s/128)*128, head dim 128, depth 2 + (16/r) x r + 2; r=1 is plain: 20 layers
        in one block run once, no injection (the study's `noloop`; its arguments go with it)."""
        if not isinstance(size, int) or size < 1:
            fail("LoopedConfig.size", f"must be a positive integer, got {size!r}", "use e.g. size=12")
        if not isinstance(r, int) or r < 1 or REFERENCE_REC_DEPTH % r:
            fail("LoopedConfig.r", f"effective recurrent depth {REFERENCE_REC_DEPTH} is not divisible into a block for r={r!r}",
                 "use r in {1, 2, 4, 8, 16}")
        d = reference_width(size)
        return cls(vocab_size=vocab_size, d_model=d, n_heads=d // REFERENCE_HEAD_DIM, head_dim=REFERENCE_HEAD_DIM,
                   **_layout(REFERENCE_PRELUDE, REFERENCE_REC_DEPTH, REFERENCE_CODA, r),
                   **_injection(r, injection, injection_args), hc_lanes=hc_lanes, bptt_k=bptt_k, seq_len=seq_len,
                   **overrides)

    @classmethod
    def tiny(cls, r: int = 1, d_model: int = 64, rec_depth: int = 8, n_prelude: int = 1, n_coda: int = 1,
             head_dim: int = 16, vocab_size: int = 1024, seq_len: int = 128, injection: str = "concat",
             bptt_k: int | None = None, hc_lanes: int = 2, injection_args: dict[str, Any] | None = None,
             **overrides: Any) -> "LoopedConfig":
        """The reference structure at CPU size: the recurrent depth `rec_depth` is split into r passes of rec_depth/r
        (r=1: all n_prelude + rec_depth + n_coda layers in one block, as the reference family)."""
        if not isinstance(r, int) or r < 1 or rec_depth % r:
            fail("LoopedConfig.r", f"recurrent depth {rec_depth} is not divisible into a block for r={r!r}",
                 f"use an r that divides {rec_depth}")
        return cls(vocab_size=vocab_size, d_model=d_model, n_heads=d_model // head_dim, head_dim=head_dim,
                   **_layout(n_prelude, rec_depth, n_coda, r), **_injection(r, injection, injection_args),
                   hc_lanes=hc_lanes, bptt_k=bptt_k, seq_len=seq_len, **overrides)

    def replace(self, **changes: Any) -> "LoopedConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoopedConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LoopedConfig: unknown field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)
