"""Looped transformer family. `LoopedLM` is imported lazily so config and accounting work without torch."""
from models.config import INJECTIONS, LoopedConfig, reference_width

__all__ = ["INJECTIONS", "LoopedConfig", "LoopedLM", "reference_width"]


def __getattr__(name: str):
    if name == "LoopedLM":
        from models.looped import LoopedLM

        return LoopedLM
    raise AttributeError(f"module 'models' has no attribute {name!r}")
