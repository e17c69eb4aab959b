"""Grid expansion: a sweep spec -> one training RunConfig per (budget, width, r, variant) cell, and the LR rule.

Pure Python (no Ray, no torch): the whole grid is built and validated on the driver before any cluster work, and
each cell's run id (the content hash of its RunConfig) is what resume checks against the results store.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any

from models.config import LoopedConfig
from models.validate import fail
from training.config import RunConfig
from tuning.spec import SweepSpec, Variant, micro_batch_at

LR_SEARCH_VARIANT = "lr_search"
SEED_NOISE_VARIANT = "seed_noise"

_FUNCS = {"ceil": math.ceil, "floor": math.floor, "min": min, "max": max, "round": round, "int": int,
          "sqrt": math.sqrt, "log2": math.log2}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}
_NUMERIC_FIELDS = {f.name for f in dataclasses.fields(LoopedConfig)
                   if any(t in str(f.type) for t in ("int", "float"))}


def evaluate(expr: str, names: dict[str, float], where: str) -> Any:
    """A small arithmetic expression of r / width / d_model (`ceil(r/2)`, `max(1, r//2)`); no Python eval."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
                and not node.keywords:
            return _FUNCS[node.func.id](*(ev(a) for a in node.args))
        raise ValueError(ast.dump(node))

    try:
        value = ev(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError) as exc:
        fail(where, f"cannot evaluate {expr!r} ({type(exc).__name__})",
             f"use arithmetic of {sorted(names)} with {sorted(_FUNCS)}, e.g. ceil(r/2)")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def resolve_overrides(variant: Variant, r: int, width: int) -> dict[str, Any]:
    """The variant's model overrides for one cell, expressions evaluated (strings of text fields stay text)."""
    names = {"r": r, "width": width}
    out = {}
    for key, value in variant.model:
        where = f"variants.{variant.name}.{key}"
        if isinstance(value, str) and key in _NUMERIC_FIELDS:
            value = evaluate(value, names, where)
        out[key] = value
    return out


@dataclass(frozen=True)
class Cell:
    """One grid point and the RunConfig that trains it."""
    compute: float
    width: int
    r: int
    variant: str
    run: RunConfig

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def label(self) -> str:
        return f"{self.variant}/C={self.compute:.3g}/w={self.width}/r={self.r}"


def model_section(spec: SweepSpec, width: int, r: int, overrides: dict[str, Any]) -> dict[str, Any]:
    section = {"family": spec.model.family, "r": r, **dict(spec.model.options), **overrides}
    section["size" if spec.model.family == "reference" else "d_model"] = width
    return section


def run_config(spec: SweepSpec, *, compute: float, width: int, r: int, variant: Variant, lr: float,
               storage: str | None = None, sweep_label: str | None = None) -> RunConfig:
    """The training config of one cell; RunConfig's own validation (batch divisibility, >= 1 step, ...) applies."""
    recipe = spec.recipe_dict
    optim = dict(recipe.pop("optim", None) or {})
    optim["lr"] = lr
    budget = next(b for b in spec.budgets if math.isclose(b.compute, compute, rel_tol=1e-9))
    if budget.batch_tokens is not None:
        recipe["batch_tokens"] = budget.batch_tokens
    res = spec.resources
    where = f"cell {variant.name}/C={compute:.3g}/width={width}/r={r}"
    try:
        if "micro_batch" in recipe:
            recipe["micro_batch"] = micro_batch_at(recipe["micro_batch"], width)
        return RunConfig.from_dict({
            **recipe,
            "model": model_section(spec, width, r, resolve_overrides(variant, r, width)),
            "data": spec.data,
            "optim": optim,
            "budget": {"compute": compute},
            "zero_stage": res.zero_stage,
            "resources": {"num_workers": res.num_workers, "cpus_per_worker": res.cpus_per_worker,
                          "use_gpu": bool(res.gpus_per_worker)},
            "storage": storage or spec.storage,
            "sweep": sweep_label or spec.name,
            "variant": variant.name,
            "name": run_name(spec, variant.name, compute, width, r),
        })
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def run_name(spec: SweepSpec, variant: str, compute: float, width: int, r: int) -> str:
    """A cell's human-readable run name (the run id is the hash; this is what logs and folders show)."""
    return f"{spec.name}-{variant}-C{compute:.3g}-w{width}-r{r}"


def round_lr(lr: float) -> float:
    """Four significant digits: readable rows, and a transferred LR that hashes the same on every rerun."""
    return float(f"{lr:.4g}")


@dataclass(frozen=True)
class LRPlan:
    """Where the LR comes from: a base LR measured at (d_ref, batch_ref, tokens_ref), transferred to each cell."""
    base: float
    d_ref: int
    batch_ref: int
    tokens_ref: float

    def lr_for(self, spec: SweepSpec, run: RunConfig) -> float:
        t = spec.lr.transfer
        lr = self.base * (self.d_ref / run.model.d_model) ** t.width_exponent
        lr *= (run.batch_tokens / self.batch_ref) ** t.batch_exponent
        lr *= (run.target_tokens / self.tokens_ref) ** t.tokens_exponent
        return round_lr(lr)


def search_cell(spec: SweepSpec, lr: float = 1e-3) -> RunConfig:
    """The (small) cell the LR search trains at: its own store under the sweep folder, so search runs never
    enter the law's fit."""
    s = spec.lr.search
    budget = min(spec.budgets, key=lambda b: b.compute) if s is None or s.budget is None else \
        next(b for b in spec.budgets if math.isclose(b.compute, s.budget, rel_tol=1e-9))
    width = (s.width if s and s.width else None) or min(budget.widths)
    r = (s.r if s and s.r else None) or min(spec.r)
    return run_config(spec, compute=budget.compute, width=width, r=r, variant=Variant(LR_SEARCH_VARIANT), lr=lr,
                      storage=search_storage(spec))


def search_storage(spec: SweepSpec) -> str:
    return f"{spec.storage.rstrip('/')}/lr_search"


def lr_plan(spec: SweepSpec, best_lr: float | None = None) -> LRPlan:
    """Fixed rule: the spec's LR at the reference width. Tuned rule: the search's best LR at the search cell."""
    if spec.lr.rule == "tuned":
        if best_lr is None:
            raise ValueError("lr: rule tuned needs the search's best LR; run the LR stage first")
        ref = search_cell(spec, best_lr)
        return LRPlan(base=best_lr, d_ref=ref.model.d_model, batch_ref=ref.batch_tokens, tokens_ref=ref.target_tokens)
    probe = [run_config(spec, compute=b.compute, width=w, r=min(spec.r), variant=spec.baseline, lr=1.0)
             for b in spec.budgets for w in b.widths]
    d_ref = spec.lr.transfer.reference_width or min(p.model.d_model for p in probe)
    first = min(probe, key=lambda p: p.target_tokens)
    return LRPlan(base=spec.lr.value, d_ref=d_ref, batch_ref=first.batch_tokens, tokens_ref=first.target_tokens)


def expand(spec: SweepSpec, plan: LRPlan | None = None) -> list[Cell]:
    """Every cell of the grid, in budget, width, r, variant order. Variants that reduce to the same training
    config as an earlier cell (same run id) are kept once: the store has one row per run id."""
    if plan is None:
        plan = lr_plan(spec, best_lr=1e-3) if spec.lr.rule == "tuned" else lr_plan(spec)
    cells: list[Cell] = []
    seen: set[str] = set()
    for budget in spec.budgets:
        for width in budget.widths:
            for r in spec.r:
                for variant in spec.variants:
                    if variant.r is not None and r not in variant.r:
                        continue
                    if variant.budgets is not None and not any(
                            math.isclose(budget.compute, c, rel_tol=1e-9) for c in variant.budgets):
                        continue
                    probe = run_config(spec, compute=budget.compute, width=width, r=r, variant=variant, lr=1.0)
                    run = probe.replace(optim={"lr": plan.lr_for(spec, probe)})
                    if run.run_id in seen:
                        continue
                    seen.add(run.run_id)
                    cells.append(Cell(compute=budget.compute, width=width, r=r, variant=variant.name, run=run))
    return cells + seed_noise_cells(spec, cells)


def seed_noise_cells(spec: SweepSpec, cells: list[Cell]) -> list[Cell]:
    """The spec's extra seeds of its seed-noise baseline cells (variant `seed_noise`); none without the section."""
    out = []
    for noise, base in zip(spec.seed_noise, seed_noise_bases(spec, cells)):
        name = run_name(spec, SEED_NOISE_VARIANT, base.compute, base.width, base.r)
        out += [Cell(compute=base.compute, width=base.width, r=base.r, variant=SEED_NOISE_VARIANT,
                     run=base.run.replace(seed=seed, variant=SEED_NOISE_VARIANT, name=f"{name}-seed{seed}"))
                for seed in noise.seeds]
    return out


def seed_noise_bases(spec: SweepSpec, cells: list[Cell]) -> list[Cell]:
    """The baseline cell each seed_noise entry trains again."""
    bases = []
    for noise in spec.seed_noise:
        base = next((c for c in cells if c.variant == spec.baseline.name and c.width == noise.width and c.r == noise.r
                     and math.isclose(c.compute, noise.budget, rel_tol=1e-9)), None)
        if base is None:
            fail("seed_noise", f"the baseline variant {spec.baseline.name!r} has no cell at budget {noise.budget:g}, "
                 f"width {noise.width}, r {noise.r}", "pick a cell the baseline trains")
        bases.append(base)
    return bases


def trials(cells: list[Cell], done: set[str]) -> list[tuple[RunConfig, Cell]]:
    """The runs that train the cells not in `done`, each with the cell it is labelled by.

    Under the wsd schedule the cells of one (variant, width, r) differ only in budget, so the largest one trains once
    with cooldown branches at the smaller budgets (RunConfig.horizons): each branch's row carries its cell's run id.
    A cell whose largest sibling is already stored trains alone (the same trajectory as its branch would be)."""
    todo = [c for c in cells if c.run_id not in done]
    if not todo or todo[0].run.optim.schedule != "wsd" or todo[0].run.optim.optimizer == "muonh":
        return [(c.run, c) for c in todo]
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.variant, c.width, c.r), []).append(c)
    out = []
    for group in groups.values():
        parent = max(group, key=lambda c: c.compute)
        missing = [c for c in group if c.run_id not in done and c is not parent]
        if parent.run_id in done:
            out += [(c.run, c) for c in missing]
            continue
        branches = [c for c in missing if parent.run.branch_config(c.compute).run_id == c.run_id]
        alone = [c for c in missing if c not in branches]  # e.g. a budget with its own batch size or LR
        horizons = tuple(c.compute for c in branches) or None
        out.append((parent.run.replace(horizons=horizons), parent))
        out += [(c.run, c) for c in alone]
    return out


def _tokens_per_param(run: RunConfig) -> float:
    from models.accounting import param_counts

    counts = param_counts(run.model)
    return run.train_tokens / (counts.n_once + counts.n_rec)


def candidate_cells(spec: SweepSpec, plan: LRPlan | None = None) -> list[Cell]:
    """Baseline-variant cells a planner may pick from: the spec's budgets x widths x r, with the reference family's
    widths filled in between (even sizes: odd ones share their neighbour's width), kept inside the range of tokens
    per unique parameter that the spec's own grid spans, so no pick extrapolates past the designs it trusts."""
    if plan is None:
        plan = lr_plan(spec, best_lr=1e-3) if spec.lr.rule == "tuned" else lr_plan(spec)
    variant = spec.baseline
    own = [c for c in expand(spec, plan) if c.variant == variant.name]
    ratios = [_tokens_per_param(c.run) for c in own]
    low, high = min(ratios) * (1 - 1e-9), max(ratios) * (1 + 1e-9)
    widths = sorted({w for b in spec.budgets for w in b.widths})
    if spec.model.family == "reference":
        widths = sorted(set(widths) | set(range(widths[0] + widths[0] % 2, widths[-1] + 1, 2)))
    cells, seen = [], set()
    for budget in spec.budgets:
        for width in widths:
            for r in spec.r:
                if variant.r is not None and r not in variant.r:
                    continue
                try:
                    probe = run_config(spec, compute=budget.compute, width=width, r=r, variant=variant, lr=1.0)
                except ValueError:
                    continue  # e.g. a budget that buys less than one batch at this width
                run = probe.replace(optim={"lr": plan.lr_for(spec, probe)})
                if run.run_id in seen or not low <= _tokens_per_param(run) <= high:
                    continue
                seen.add(run.run_id)
                cells.append(Cell(compute=budget.compute, width=width, r=r, variant=variant.name, run=run))
    return cells


def validate(spec: SweepSpec) -> list[Cell]:
    """Build every cell (and the LR search cell) so any invalid combination fails before Ray starts."""
    if spec.lr.rule == "tuned":
        from tuning.pruning import make_pruner

        s = spec.lr.search
        search_cell(spec, s.low)
        try:
            make_pruner(s.pruner, s.startup_trials, dict(s.pruner_args))
        except TypeError as exc:
            fail("lr.search.pruner_args", f"not accepted by the {s.pruner} pruner ({exc})",
                 "see optuna.pruners for its keyword arguments")
    return expand(spec)
