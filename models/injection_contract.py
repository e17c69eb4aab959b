"""The torch-free half of the injection contract: what an injection costs and which configs it accepts.

An injection decides how the prelude output e and the recurrent state meet at every recurrence (the torch half,
`models.injection.Injection`, holds the computation). Its parameters count in N_rec and its multiply-accumulates in
F, so the law's two inputs stay exact only if every injection declares both as functions of the config. Those
declarations live here, on classmethods that need no torch: `models.accounting` reads them on machines without it.

A class states (all classmethods take the LoopedConfig and the run's `injection_args` as keyword arguments):
- `param_count(cfg, **args)`: its trainable parameters (all of them count in N_rec);
- `macs_per_token(cfg, **args)`: multiply-accumulates per token of one recurrence (its step input, the block's
  per-layer inputs and its step output), the figure F counts r times (forward) and 3x for a recurrence with backward;
- `uncounted_macs_per_token(cfg, **args)`: the part of that figure that `torch.utils.flop_counter` does not see
  (elementwise products: the counter counts matrix products only); 0 unless the class counts elementwise work, as
  the study's hyperconnect and diagonal modes do;
- `validate(cfg, **args)`: refuse configs it cannot serve (raise ValueError naming the field and the fix);
- `truncation`: False where truncated backprop (bptt_k) would leave per-recurrence weights untrained.

The platform checks `param_count` against the module whenever a model is built, and `models.plugin.check_injection`
checks `macs_per_token` against the flop counter on a forward pass.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config module imports the registry, which imports this one
    from models.config import LoopedConfig


class InjectionContract:
    """Declared costs of an injection; built-ins and plugins alike subclass it (plugins through Injection)."""

    truncation: bool = True

    @classmethod
    def validate(cls, cfg: "LoopedConfig", **args: Any) -> None:
        """Refuse a config this injection cannot serve; the default accepts every one."""

    @classmethod
    def param_count(cls, cfg: "LoopedConfig", **args: Any) -> int:
        raise NotImplementedError(f"{cls.__qualname__}: declare param_count(cfg, **args), the trainable parameters "
                                  "of the module (they count in N_rec)")

    @classmethod
    def macs_per_token(cls, cfg: "LoopedConfig", **args: Any) -> int:
        raise NotImplementedError(f"{cls.__qualname__}: declare macs_per_token(cfg, **args), the multiply-"
                                  "accumulates per token of one recurrence (they count in F)")

    @classmethod
    def uncounted_macs_per_token(cls, cfg: "LoopedConfig", **args: Any) -> int:
        return 0


def name_of(cls: type) -> str:
    """The import path that names a class in a config: `package.module:Class`."""
    return f"{cls.__module__}:{cls.__qualname__}"
