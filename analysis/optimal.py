"""Budget-optimal recurrence: which r (with its width and token count) a law says to train for a FLOP budget.

Designs come from a model family with exact accounting (models.accounting): for "reference", every
r and size s give cfg = LoopedConfig.reference(s, r); F = flops_per_token(cfg); D = C / F; unique
parameters N_once + N_rec; inference cost = inference_flops_per_token(cfg) (forward only, at r).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .intervals import DEFAULT_LEVEL, percentile_interval

if TYPE_CHECKING:  # law.py imports this module for ScalingLaw.optimal: only type checkers need the name here
    from .law import ScalingLaw

FAMILIES = ("reference",)
DEFAULT_SIZES = tuple(range(2, 129, 2))  # even s: each gives a distinct width d = 64 s


@dataclass(frozen=True)
class Design:
    r: int
    size: int
    d_model: int
    n_once: int
    n_rec: int
    unique_params: int
    tokens: float
    flops_per_token: float
    inference_flops_per_token: float
    loss: float
    loss_ci: tuple[float, float] | None = None


@dataclass(frozen=True)
class OptimalDesign:
    compute: float
    best: Design
    table: list[Design]  # the best design of every r, best first (the runner-up table)
    r_share: dict[int, float] | None = None  # fraction of bootstrap draws whose optimum has each r
    constraints: dict = field(default_factory=dict)
    at_size_edge: bool = False  # the best size is the smallest/largest searched: widen `sizes`

    @property
    def r(self) -> int:
        return self.best.r

    def to_dict(self) -> dict:
        return {"compute": self.compute, "best": asdict(self.best), "table": [asdict(d) for d in self.table],
                "r_share": None if self.r_share is None else {str(k): v for k, v in self.r_share.items()},
                "constraints": self.constraints, "at_size_edge": self.at_size_edge}


def _candidates(family: str, r_values, sizes) -> dict[str, np.ndarray]:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    from models import LoopedConfig
    from models.accounting import flops_per_token, inference_flops_per_token, param_counts

    cols: dict[str, list] = {k: [] for k in ("r", "size", "d_model", "n_once", "n_rec", "f", "f_inf")}
    for r in r_values:
        seen = set()
        for s in sizes:
            cfg = LoopedConfig.reference(int(s), int(r))
            if cfg.d_model in seen:  # odd and even s can share a width
                continue
            seen.add(cfg.d_model)
            pc = param_counts(cfg)
            for k, v in zip(cols, (int(r), int(s), cfg.d_model, pc.n_once, pc.n_rec, flops_per_token(cfg),
                                   inference_flops_per_token(cfg))):
                cols[k].append(v)
    return {k: np.array(v) for k, v in cols.items()}


def optimal_design(law: ScalingLaw, compute: float, r_values=(1, 2, 4, 8), max_unique_params: float | None = None,
                   max_inference_flops_per_token: float | None = None, family: str = "reference", sizes=None,
                   level: float = DEFAULT_LEVEL) -> OptimalDesign:
    if not (compute and compute > 0 and np.isfinite(compute)):
        raise ValueError(f"compute must be a positive FLOP count, got {compute!r}")
    r_values = tuple(int(r) for r in r_values)
    if not r_values or min(r_values) < 1:
        raise ValueError(f"r_values must be integers >= 1, got {r_values!r}")
    sizes = DEFAULT_SIZES if sizes is None else tuple(int(s) for s in sizes)
    c = _candidates(family, r_values, sizes)
    tokens = compute / c["f"]
    unique = c["n_once"] + c["n_rec"]
    feasible = np.ones(len(tokens), dtype=bool)
    if max_unique_params is not None:
        feasible &= unique <= max_unique_params
    if max_inference_flops_per_token is not None:
        feasible &= c["f_inf"] <= max_inference_flops_per_token
    if not feasible.any():
        raise ValueError(
            f"no design satisfies the constraints (max_unique_params={max_unique_params}, "
            f"max_inference_flops_per_token={max_inference_flops_per_token}); the smallest design has "
            f"{unique.min():.4g} unique parameters and {c['f_inf'].min():.4g} inference FLOPs/token")
    loss = np.asarray(law.predict(c["n_once"], c["n_rec"], c["r"], tokens), dtype=float)
    masked = np.where(feasible, loss, np.inf)

    draw_loss = law.predict_draws(c["n_once"], c["n_rec"], c["r"], tokens)  # (n_draws, n_designs) or None

    def design(i: int) -> Design:
        ci = None
        if draw_loss is not None:
            lo, hi = percentile_interval(draw_loss[:, i], level)
            ci = (float(lo), float(hi))
        return Design(r=int(c["r"][i]), size=int(c["size"][i]), d_model=int(c["d_model"][i]), n_once=int(c["n_once"][i]),
                      n_rec=int(c["n_rec"][i]), unique_params=int(unique[i]), tokens=float(tokens[i]),
                      flops_per_token=float(c["f"][i]), inference_flops_per_token=float(c["f_inf"][i]),
                      loss=float(loss[i]), loss_ci=ci)

    table = []
    for r in r_values:
        idx = np.flatnonzero((c["r"] == r) & feasible)
        if len(idx):
            table.append(design(int(idx[np.argmin(masked[idx])])))
    table.sort(key=lambda d: d.loss)
    best = table[0]

    r_share = None
    if draw_loss is not None:
        picks = c["r"][np.argmin(np.where(feasible, draw_loss, np.inf), axis=1)]
        r_share = {r: float(np.mean(picks == r)) for r in r_values}
    edge = best.size in (min(sizes), max(sizes))
    constraints = {"max_unique_params": max_unique_params, "max_inference_flops_per_token": max_inference_flops_per_token,
                   "family": family, "r_values": list(r_values), "sizes": [min(sizes), max(sizes)]}
    return OptimalDesign(compute=float(compute), best=best, table=table, r_share=r_share, constraints=constraints,
                         at_size_edge=edge)
