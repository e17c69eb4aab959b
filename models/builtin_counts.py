"""Declared costs of the built-in injections, without torch (models.accounting reads them on any machine).

Each class is the torch-free parent of its module (`module_path` names it: models.builtin_injections, models.hyperloop),
so the counts and the computation are one class on the same contract a plugin implements. The numbers are the
study's accounting, unchanged: for every mode but hyperconnect and hyperloop the multiply-accumulates per token of
one recurrence equal the parameter count (each weight is used once per token); the lane modes' weights are
per-recurrence scalars or gates applied to d-wide lanes, so their MACs scale with d instead.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from models.injection_contract import InjectionContract
from models.validate import fail

if TYPE_CHECKING:
    from models.config import LoopedConfig


class _Free(InjectionContract):
    """No weights, no multiply-accumulates (additions and parameter-free norms are not counted, like the norms
    outside the blocks)."""

    @classmethod
    def param_count(cls, cfg: "LoopedConfig") -> int:
        return 0

    @classmethod
    def macs_per_token(cls, cfg: "LoopedConfig") -> int:
        return 0


class PassThroughCounts(_Free):
    module_path = "models.builtin_injections:PassThrough"


class AdditiveCounts(_Free):
    module_path = "models.builtin_injections:Additive"


class AdditiveNormedCounts(_Free):
    module_path = "models.builtin_injections:AdditiveNormed"


class AdditiveNormedPerLayerCounts(_Free):
    module_path = "models.builtin_injections:AdditiveNormedPerLayer"


class ConcatCounts(InjectionContract):
    module_path = "models.builtin_injections:Concat"

    @classmethod
    def param_count(cls, cfg: "LoopedConfig") -> int:
        return 2 * cfg.d_model * cfg.d_model  # Linear(2d -> d), no bias

    @classmethod
    def macs_per_token(cls, cfg: "LoopedConfig") -> int:
        return cls.param_count(cfg)


class DiagonalCounts(InjectionContract):
    module_path = "models.builtin_injections:Diagonal"

    @classmethod
    def param_count(cls, cfg: "LoopedConfig") -> int:
        return cfg.d_model * cfg.d_model + 2 * cfg.d_model  # B (d x d), A_log (d), dt (d)

    @classmethod
    def macs_per_token(cls, cfg: "LoopedConfig") -> int:
        return cls.param_count(cfg)

    @classmethod
    def uncounted_macs_per_token(cls, cfg: "LoopedConfig") -> int:
        return 2 * cfg.d_model  # decay * state and dt * (B e): elementwise, counted by the study's convention


def _lanes(cfg: "LoopedConfig") -> int:
    if isinstance(cfg.hc_lanes, bool) or not isinstance(cfg.hc_lanes, int) or cfg.hc_lanes < 1:
        fail("LoopedConfig.hc_lanes", f"must be an integer >= 1, got {cfg.hc_lanes!r}", "use e.g. hc_lanes=2")
    return cfg.hc_lanes


class HyperconnectCounts(InjectionContract):
    """The study's static hyper-connections: per recurrence step alpha in R^n, an n x n mixing matrix and beta in
    R^n, for every step training may run (`cfg.recurrence_steps`), so N_rec counts steps*(n^2 + 2n). They multiply
    d-wide lanes: (n^2 + 2n)*d MACs per token and step, of which beta * s (n*d) is elementwise."""

    module_path = "models.builtin_injections:Hyperconnect"
    truncation = False  # as the study: truncated backprop would leave early steps' lane weights untrained

    @classmethod
    def validate(cls, cfg: "LoopedConfig") -> None:
        _lanes(cfg)

    @classmethod
    def param_count(cls, cfg: "LoopedConfig") -> int:
        n = _lanes(cfg)
        return cfg.recurrence_steps * (n * n + 2 * n)

    @classmethod
    def macs_per_token(cls, cfg: "LoopedConfig") -> int:
        n = _lanes(cfg)
        return (n * n + 2 * n) * cfg.d_model

    @classmethod
    def uncounted_macs_per_token(cls, cfg: "LoopedConfig") -> int:
        return _lanes(cfg) * cfg.d_model


class HyperloopCounts(InjectionContract):
    """Hyperloop's loop-level hyper-connections (models.hyperloop): per recurrence step, gates read from the n lanes
    flattened (n*d wide): a pre gate (n*d x n weights, n biases), post and mixing gates (n*d x (n + n^2), n + n^2
    biases), and a loop position vector (d); for every step training may run. Per token and step: the gate
    projections n*d*(n^2 + 2n) MACs, the read of the block input from the lanes n*d, the lane mixing n^2*d, and
    the write of the block output into the lanes n*d (elementwise). Sinkhorn's normalisation, the sigmoids and the
    RMSNorm are elementwise and, like every norm and activation in F, not counted."""

    module_path = "models.hyperloop:Hyperloop"
    truncation = False  # per-loop gates of the first r - k loops would get no gradient

    @classmethod
    def validate(cls, cfg: "LoopedConfig") -> None:
        _lanes(cfg)

    @classmethod
    def param_count(cls, cfg: "LoopedConfig") -> int:
        n, d = _lanes(cfg), cfg.d_model
        return cfg.recurrence_steps * (n * d * (n * n + 2 * n) + n * n + 2 * n + d)

    @classmethod
    def macs_per_token(cls, cfg: "LoopedConfig") -> int:
        n, d = _lanes(cfg), cfg.d_model
        return n * d * (n * n + 2 * n) + n * d + n * n * d + n * d

    @classmethod
    def uncounted_macs_per_token(cls, cfg: "LoopedConfig") -> int:
        return _lanes(cfg) * cfg.d_model


# The short names a config may use, in the order errors list them.
BUILTIN: dict[str, type[InjectionContract]] = {
    "concat": ConcatCounts,
    "additive": AdditiveCounts,
    "additive_normed": AdditiveNormedCounts,
    "additive_normed_per_layer": AdditiveNormedPerLayerCounts,
    "none": PassThroughCounts,
    "diagonal": DiagonalCounts,
    "hyperconnect": HyperconnectCounts,
    "hyperloop": HyperloopCounts,
}
