"""Budget-optimal recurrence: which r (with its width and token count) a law says to train for a FLOP budget.

Designs come from a model family with exact accounting (models.accounting): for "reference", every r and size s
give cfg = LoopedConfig.reference(s, r); for "tiny", every r and width d (a multiple of the head dim) give
cfg = LoopedConfig.tiny(r, d, ...) with the vocabulary, sequence length, head dim, injection and layout of the runs
the law was fitted on (law.meta["models"]). F = flops_per_token(cfg); D = C / F; unique parameters N_once + N_rec;
inference cost = inference_flops_per_token(cfg) (forward only, at r).

A law answers for the models it was fitted on: the family and r values default to the fitted ones, and every
design says how far outside the fitted widths, tokens, compute and r it reaches (`extrapolation`).

This module needs only the law's predict/predict_draws/meta (the `Law` protocol), so it does not import law.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from models import LoopedConfig
from models.accounting import flops_per_token, inference_flops_per_token, param_counts
from models.config import REFERENCE_CODA, REFERENCE_HEAD_DIM, REFERENCE_PRELUDE, REFERENCE_REC_DEPTH, reference_width

from .intervals import DEFAULT_LEVEL, percentile_interval

FAMILIES = ("reference", "tiny")
DEFAULT_R = (1, 2, 4, 8)
DEFAULT_SIZES = tuple(range(2, 129, 2))  # even s: each gives a distinct width d = 64 s
TINY_WIDTH_SPAN = 16  # tiny candidates: multiples of the head dim up to this many times the widest fitted width
TINY_MIN_TOP_WIDTH = 64

# The models behind the published law (arXiv 2604.21106; ../shared/DESIGN.md "Numbers to check against"): the study's
# grid of 6 budgets x sizes 6..34 x r in {1, 2, 4, 8}; token range of that grid under exact accounting.
REFERENCE_MODELS: dict[str, Any] = {
    "family": "reference", "vocab_size": 32064, "seq_len": 2048, "head_dim": REFERENCE_HEAD_DIM, "injection": "concat",
    "layout": {"n_prelude": REFERENCE_PRELUDE, "rec_depth": REFERENCE_REC_DEPTH, "n_coda": REFERENCE_CODA},
    "r_values": [1, 2, 4, 8], "sizes": list(range(6, 35, 2)), "widths": [reference_width(s) for s in range(6, 35, 2)],
    "compute": [4.64e17, 2.15e19], "tokens": [3.2e8, 4.2e9], "unique_params": [1.09e7, 1.14e9],
    "source": "the study's grid (published coefficients)",
}
UNKNOWN_NOTE = ("the law does not record which models it was fitted on (a law.json saved before models were "
                "recorded, or runs without model columns): designs come from the study's reference family at r in "
                "{1, 2, 4, 8} and nothing is checked for extrapolation; refit to record them")


class Law(Protocol):
    meta: dict

    def predict(self, n_once, n_rec, r, tokens): ...

    def predict_draws(self, n_once, n_rec, r, tokens): ...


@dataclass(frozen=True)
class Design:
    r: int
    size: int | None  # the reference size s; None in the tiny family (its width is d_model)
    d_model: int
    n_once: int
    n_rec: int
    unique_params: int
    tokens: float
    flops_per_token: float
    inference_flops_per_token: float
    loss: float
    loss_ci: tuple[float, float] | None = None
    extrapolation: dict = field(default_factory=dict)  # quantity -> {value, range, factor, side}; {} inside

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.unique_params

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_param": self.tokens_per_param}


# ---- extrapolation ------------------------------------------------------------------------------------------------
_LABELS = {"compute": "C", "tokens": "tokens", "width": "width", "r": "r", "unique_params": "params"}


def extrapolation(models: dict | None, **values: float | None) -> dict[str, dict]:
    """How far each given quantity (compute, tokens, width, r, unique_params) lies outside the range the law was
    fitted on: {name: {"value", "range", "factor" (>= 1: times past the nearer end), "side"}}; inside ones omitted."""
    models = models or {}
    ranges = {"compute": models.get("compute"), "tokens": models.get("tokens"),
              "unique_params": models.get("unique_params"),
              "width": [min(models["widths"]), max(models["widths"])] if models.get("widths") else None,
              "r": [min(models["r_values"]), max(models["r_values"])] if models.get("r_values") else None}
    out = {}
    for name, value in values.items():
        span = ranges.get(name)
        if value is None or not span or None in span:
            continue
        lo, hi = float(span[0]), float(span[1])
        value = float(value)
        if value > hi * (1 + 1e-9):
            out[name] = {"value": value, "range": [lo, hi], "factor": value / hi, "side": "above"}
        elif value < lo * (1 - 1e-9):
            out[name] = {"value": value, "range": [lo, hi], "factor": lo / value if value > 0 else float("inf"),
                         "side": "below"}
    return out


def describe_extrapolation(ex: dict) -> str:
    """'C 10x above, width 2x above' (or '-' inside every fitted range)."""
    if not ex:
        return "-"
    def times(f: float) -> str:
        if f < 9.95:
            return f"{f:.2g}"
        return f"{f:.0f}" if f < 1e4 else f"{f:.3g}".replace("e+0", "e").replace("e+", "e")

    return ", ".join(f"{_LABELS.get(k, k)} {times(v['factor'])}x {v['side']}" for k, v in ex.items())


# ---- the family ---------------------------------------------------------------------------------------------------
def resolve_family(law: Law, family: str | None = None) -> tuple[str, dict, list[str]]:
    """(family, its fitted model description, notes): the fitted family unless asked for another; a law that does
    not know its models answers in the reference family (as before models were recorded), with a note."""
    models = dict((law.meta or {}).get("models") or {})
    fitted = models.get("family") or "unknown"
    notes = []
    if family is None:
        if fitted in FAMILIES:
            return fitted, models, notes
        family = "reference"
        notes.append(UNKNOWN_NOTE if fitted == "unknown" else
                     f"the law was fitted on {fitted} models: designs come from the study's reference family")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if fitted not in FAMILIES and not notes:
        notes.append(f"the law does not record one model family ({fitted}): nothing is checked for extrapolation")
    if fitted in FAMILIES and family != fitted:
        notes.append(f"the law was fitted on the {fitted} family, not {family}: every {family} design extrapolates")
        return family, {"family": family}, notes
    return family, (models if fitted == family else {"family": family}), notes


def family_config(family: str, models: dict, width: int, r: int) -> LoopedConfig:
    """The family member of this width (reference: size s; tiny: d_model) and r, built with the fitted vocabulary,
    sequence length, head dim, injection and layout (the family's defaults where the fit recorded none)."""
    layout = models.get("layout") or {}
    common = {k: models[k] for k in ("vocab_size", "seq_len") if models.get(k) is not None}
    if models.get("injection"):
        common["injection"] = models["injection"]
    if models.get("hc_lanes"):
        common["hc_lanes"] = int(models["hc_lanes"])
    if models.get("mlp_ratio"):
        common["mlp_ratio"] = int(models["mlp_ratio"])
    if family == "reference":
        return LoopedConfig.reference(int(width), int(r), **common)
    if family != "tiny":
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    tiny = {k: int(layout[k]) for k in ("rec_depth", "n_prelude", "n_coda") if layout.get(k) is not None}
    if models.get("head_dim"):
        tiny["head_dim"] = int(models["head_dim"])
    return LoopedConfig.tiny(r=int(r), d_model=int(width), **tiny, **common)


def default_widths(family: str, models: dict) -> tuple[int, ...]:
    """Reference: even sizes 2..128. Tiny: every multiple of the head dim up to TINY_WIDTH_SPAN x the widest fitted
    width (at least TINY_MIN_TOP_WIDTH), a range around the fitted widths wide enough to find an interior optimum."""
    if family == "reference":
        return DEFAULT_SIZES
    head = int(models.get("head_dim") or LoopedConfig.tiny().head_dim)
    top = max(TINY_MIN_TOP_WIDTH, TINY_WIDTH_SPAN * max(models.get("widths") or [LoopedConfig.tiny().d_model]))
    return tuple(range(head, top + 1, head))


def design_counts(law: Law, width: int, r: int, family: str | None = None) -> dict[str, Any]:
    """Parameter and FLOP counts of one family member (for predict/effective queries given a width)."""
    family, models, notes = resolve_family(law, family)
    cfg = family_config(family, models, width, r)
    pc = param_counts(cfg)
    return {"family": family, "d_model": cfg.d_model, "n_once": pc.n_once, "n_rec": pc.n_rec,
            "unique_params": pc.n_once + pc.n_rec, "flops_per_token": flops_per_token(cfg),
            "inference_flops_per_token": inference_flops_per_token(cfg), "notes": notes}


def _candidates(family: str, models: dict, r_values, widths) -> dict[str, np.ndarray]:
    cols: dict[str, list] = {k: [] for k in ("r", "size", "d_model", "n_once", "n_rec", "f", "f_inf")}
    for r in r_values:
        seen = set()
        for w in widths:
            cfg = family_config(family, models, int(w), int(r))
            if cfg.d_model in seen:  # odd and even s can share a width
                continue
            seen.add(cfg.d_model)
            pc = param_counts(cfg)
            for k, v in zip(cols, (int(r), int(w) if family == "reference" else -1, cfg.d_model, pc.n_once, pc.n_rec,
                                   flops_per_token(cfg), inference_flops_per_token(cfg))):
                cols[k].append(v)
    return {k: np.array(v) for k, v in cols.items()}


# ---- the answer ---------------------------------------------------------------------------------------------------
def compact(x: float) -> str:
    """A compact number: 4 significant digits below 10^4, else 3 in e-notation without '+' ('1.23e6')."""
    x = float(x)
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-2):
        return f"{x:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return f"{x:.4g}"


def format_table(rows: list[list[str]], header: list[str], right: set[int]) -> list[str]:
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(v).rjust(w) if i in right else str(v).ljust(w)  # noqa: E731
                                for i, (v, w) in enumerate(zip(row, widths))).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


@dataclass(frozen=True)
class OptimalDesign:
    compute: float
    best: Design
    table: list[Design]  # the best design of every r, best first (the runner-up table)
    r_share: dict[int, float] | None = None  # fraction of bootstrap draws whose optimum has each r
    constraints: dict = field(default_factory=dict)
    at_size_edge: bool = False  # the best width is the smallest/largest searched: widen `sizes`
    family: str = "reference"
    models: dict = field(default_factory=dict)  # what the law was fitted on (law.meta["models"]), for the header
    notes: list[str] = field(default_factory=list)

    @property
    def r(self) -> int:
        return self.best.r

    @property
    def extrapolates(self) -> bool:
        return any(d.extrapolation for d in self.table)

    def to_dict(self) -> dict:
        return {"compute": self.compute, "family": self.family, "best": self.best.to_dict(),
                "table": [d.to_dict() for d in self.table],
                "r_share": None if self.r_share is None else {str(k): v for k, v in self.r_share.items()},
                "constraints": self.constraints, "at_size_edge": self.at_size_edge,
                "extrapolation": self.best.extrapolation, "notes": list(self.notes)}

    def to_frame(self) -> pd.DataFrame:
        """One row per r, best first: the table a person reads, as numbers."""
        return pd.DataFrame([{
            "r": d.r, "width": d.d_model, "size": d.size, "unique_params": d.unique_params, "tokens": d.tokens,
            "tokens_per_param": d.tokens_per_param, "loss": d.loss,
            "loss_low": None if d.loss_ci is None else d.loss_ci[0],
            "loss_high": None if d.loss_ci is None else d.loss_ci[1],
            "inference_flops_per_token": d.inference_flops_per_token,
            "p_best": None if self.r_share is None else self.r_share.get(d.r),
            "extrapolation": describe_extrapolation(d.extrapolation),
        } for d in self.table])

    def __str__(self) -> str:
        m = self.models or {}
        about = [f"{self.family} family"]
        if m.get("vocab_size"):
            about.append(f"vocab {m['vocab_size']}, seq_len {m.get('seq_len')}, head_dim {m.get('head_dim')}")
        if m.get("injection"):
            about.append(f"injection {m['injection']}")
        if m.get("widths"):
            about.append(f"fitted widths {min(m['widths'])}-{max(m['widths'])}")
        if m.get("r_values"):
            about.append("fitted r " + ",".join(f"{r:g}" for r in m["r_values"]))
        if m.get("compute"):
            about.append(f"fitted C {compact(m['compute'][0])}-{compact(m['compute'][1])}")
        lines = [f"budget-optimal design for C = {compact(self.compute)} FLOPs ({'; '.join(about)})"]
        share = self.r_share is not None
        has_ci = any(d.loss_ci is not None for d in self.table)
        header = (["r", "width", "unique params", "tokens", "tokens/param", "loss (nats)"]
                  + (["95% CI"] if has_ci else []) + ["inference FLOPs/token"] + (["P(best)"] if share else []) + ["extrapolates"])
        rows = []
        for d in self.table:
            ci = "-" if d.loss_ci is None else f"[{d.loss_ci[0]:.4f}, {d.loss_ci[1]:.4f}]"
            width = str(d.d_model) + ("" if d.size is None else f" (s={d.size})")
            rows.append([str(d.r), width, compact(d.unique_params), compact(d.tokens), f"{d.tokens_per_param:.3g}", f"{d.loss:.4f}"] + ([ci] if has_ci else [])
                        + [compact(d.inference_flops_per_token)]
                        + ([f"{self.r_share.get(d.r, 0.0):.2f}"] if share else [])
                        + [describe_extrapolation(d.extrapolation)])
        lines += format_table(rows, header, right=set(range(len(header) - 1)))
        c = self.constraints
        caps = [f"{k} <= {compact(c[k])}" for k in ("max_unique_params", "max_inference_flops_per_token") if c.get(k)]
        if caps:
            lines.append("constraints: " + ", ".join(caps))
        if self.at_size_edge:
            lines.append(f"note: the best width {self.best.d_model} is at the edge of the widths searched "
                         f"({c.get('widths')}): the optimum may lie beyond; widen the search (sizes=..., CLI --widths)")
        if self.extrapolates:
            lines.append("note: 'extrapolates' says how far a design lies outside what the law was fitted on; "
                         "its loss there is the law's guess, not a measurement")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def optimal_design(law: Law, compute: float, r_values=None, max_unique_params: float | None = None,
                   max_inference_flops_per_token: float | None = None, family: str | None = None, sizes=None,
                   level: float = DEFAULT_LEVEL) -> OptimalDesign:
    """The lowest-loss design of every r under a FLOP budget; family and r values default to the fitted ones.

    sizes: the widths searched, in the family's unit (reference: size s; tiny: d_model); default_widths otherwise.
    """
    if not (compute and compute > 0 and np.isfinite(compute)):
        raise ValueError(f"compute must be a positive FLOP count, got {compute!r}")
    family, models, notes = resolve_family(law, family)
    if r_values is None:
        r_values = models.get("r_values") or DEFAULT_R
    r_values = tuple(int(r) for r in r_values)
    if not r_values or min(r_values) < 1:
        raise ValueError(f"r_values must be integers >= 1, got {r_values!r}")
    sizes = default_widths(family, models) if sizes is None else tuple(int(s) for s in sizes)
    c = _candidates(family, models, r_values, sizes)
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
        ex = extrapolation(models, compute=compute, width=int(c["d_model"][i]), tokens=float(tokens[i]),
                           r=int(c["r"][i]))
        return Design(r=int(c["r"][i]), size=None if c["size"][i] < 0 else int(c["size"][i]),
                      d_model=int(c["d_model"][i]), n_once=int(c["n_once"][i]), n_rec=int(c["n_rec"][i]),
                      unique_params=int(unique[i]), tokens=float(tokens[i]), flops_per_token=float(c["f"][i]),
                      inference_flops_per_token=float(c["f_inf"][i]), loss=float(loss[i]), loss_ci=ci, extrapolation=ex)

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
    searched = c["d_model"][c["r"] == best.r]
    edge = best.d_model in (searched.min(), searched.max())
    constraints = {"max_unique_params": max_unique_params, "max_inference_flops_per_token": max_inference_flops_per_token,
                   "family": family, "r_values": list(r_values), "sizes": [min(sizes), max(sizes)],
                   "widths": [int(c["d_model"].min()), int(c["d_model"].max())]}
    return OptimalDesign(compute=float(compute), best=best, table=table, r_share=r_share, constraints=constraints,
                         at_size_edge=edge, family=family, models=models, notes=notes)
