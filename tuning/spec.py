"""A sweep spec: the iso-depth x compute grid, its variants, recipe, LR rule and resources, validated before Ray starts.

The YAML is read into frozen dataclasses; every problem raises ValueError naming the field and the fix. Imports no
torch and no Ray: `validate` (in tuning.grid) builds every cell's RunConfig on the driver before any cluster work.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from models.validate import fail, integer, number

FAMILIES = ("tiny", "reference")
PRUNERS = ("median", "hyperband", "wilcoxon", "none")
LR_RULES = ("fixed", "tuned")
# Keys of the training recipe a spec may set; the sweep owns model, budget, storage, resources and labels.
RECIPE_KEYS = ("optim", "batch_tokens", "micro_batch", "seed", "eval_every", "val_tokens", "spike_factor",
               "max_failures", "checkpoint_every", "eval_depths", "compile")


def _mapping(name: str, value: Any, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        fail(name, f"must be a mapping, got {value!r}", f"write {name}: {{key: value}}")
    if allowed is not None:
        extra = sorted(set(value) - set(allowed))
        if extra:
            fail(f"{name}.{extra[0]}", "unknown field", f"valid fields are {list(allowed)}")
    return dict(value)


def _int_list(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        fail(name, f"must be a non-empty list, got {value!r}", f"write {name}: [1, 2, 4, 8]")
    out = tuple(integer(f"{name}[{i}]", v) for i, v in enumerate(value))
    if len(set(out)) != len(out):
        fail(name, f"has duplicates: {list(out)}", "list each value once")
    return out


def _micro_batch(value: Any) -> int | dict[int, int]:
    """`micro_batch`: one integer, or {smallest width: micro batch} steps, e.g. {1: 32, 18: 16, 30: 8}."""
    if not isinstance(value, Mapping):
        return integer("recipe.micro_batch", value)
    if not value:
        fail("recipe.micro_batch", "is an empty mapping", "write micro_batch: 8 or {1: 32, 18: 16, 30: 8}")
    return {integer(f"recipe.micro_batch (key {w!r})", w): integer(f"recipe.micro_batch[{w}]", mb) for w, mb in value.items()}


def micro_batch_at(value: int | Mapping[int, int], width: int) -> int:
    """The micro batch of a cell: the step with the largest smallest-width <= width."""
    if not isinstance(value, Mapping):
        return value
    steps = [mb for w, mb in sorted(value.items()) if w <= width]
    if not steps:
        fail("recipe.micro_batch", f"has no step for width {width} (its smallest is {min(value)})",
             f"add a step that starts at or below {width}")
    return steps[-1]


@dataclass(frozen=True)
class Budget:
    """One compute budget (training FLOPs) and the widths run at it (reference: size s; tiny: d_model)."""
    compute: float
    widths: tuple[int, ...]
    batch_tokens: int | None = None  # per-budget batch (None: the recipe's)

    @classmethod
    def from_dict(cls, name: str, d: Any) -> "Budget":
        d = _mapping(name, d, ("compute", "widths", "batch_tokens"))
        if "compute" not in d or "widths" not in d:
            fail(name, "needs compute and widths", "write {compute: 1.0e18, widths: [6, 8, 10]}")
        batch = d.get("batch_tokens")
        return cls(compute=number(f"{name}.compute", d["compute"], parse=True), widths=_int_list(f"{name}.widths", d["widths"]),
                   batch_tokens=None if batch is None else integer(f"{name}.batch_tokens", batch))


@dataclass(frozen=True)
class Variant:
    """Model overrides applied to every cell of the variant. String values of numeric fields are expressions of
    r and width (e.g. `bptt_k: ceil(r/2)`); `r` / `budgets` restrict the variant to part of the grid."""
    name: str
    model: tuple[tuple[str, Any], ...] = ()
    r: tuple[int, ...] | None = None
    budgets: tuple[float, ...] | None = None

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model)

    @classmethod
    def from_dict(cls, name: str, d: Any) -> "Variant":
        d = _mapping(f"variants.{name}", d)
        r = d.pop("r", None)
        budgets = d.pop("budgets", None)
        model = d.pop("model", None)
        # Overrides may sit under `model:` or directly in the variant (the short form `truncated: {bptt_k: ...}`).
        overrides = {**_mapping(f"variants.{name}.model", model), **d}
        if budgets is not None:
            if not isinstance(budgets, (list, tuple)) or not budgets:
                fail(f"variants.{name}.budgets", f"must be a non-empty list of computes, got {budgets!r}",
                     "list compute values from budgets, e.g. [4.64e17, 1.0e18]")
            budgets = tuple(number(f"variants.{name}.budgets[{i}]", b, parse=True) for i, b in enumerate(budgets))
        return cls(name=name, model=tuple(sorted(overrides.items())),
                   r=None if r is None else _int_list(f"variants.{name}.r", r), budgets=budgets)


@dataclass(frozen=True)
class ModelFamily:
    """`family: reference` (widths are sizes s) or `family: tiny` (widths are d_model); other keys go to the
    family constructor (vocab_size, seq_len, rec_depth, head_dim, injection, ...)."""
    family: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, d: Any) -> "ModelFamily":
        d = _mapping("model", d)
        family = d.pop("family", None)
        if family not in FAMILIES:
            fail("model.family", f"must be one of {FAMILIES}, got {family!r}", "write model: {family: tiny}")
        for key in ("r", "size", "d_model"):
            if key in d:
                fail(f"model.{key}", "is set per cell by the grid", "put r values under r: and widths under budgets:")
        return cls(family=family, options=tuple(sorted(d.items())))


@dataclass(frozen=True)
class Transfer:
    """lr(cell) = lr_base * (d_ref/d)^width_exponent * (B/B_ref)^batch_exponent * (D/D_ref)^tokens_exponent."""
    width_exponent: float = 1.0
    batch_exponent: float = 0.0
    tokens_exponent: float = 0.0
    reference_width: int | None = None  # d_ref for a fixed LR (default: the smallest d_model in the grid)

    @classmethod
    def from_dict(cls, d: Any) -> "Transfer":
        d = _mapping("lr.transfer", d, tuple(f.name for f in dataclasses.fields(cls)))
        kw = {k: number(f"lr.transfer.{k}", v, positive=False, parse=True) for k, v in d.items() if k != "reference_width"}
        if d.get("reference_width") is not None:
            kw["reference_width"] = integer("lr.transfer.reference_width", d["reference_width"])
        return cls(**kw)


@dataclass(frozen=True)
class Search:
    """The Optuna LR search: TPE over log-LR at one small cell, with a pruner fed the trials' intermediate losses."""
    trials: int = 8
    low: float = 1e-4
    high: float = 3e-2
    budget: float | None = None  # compute of the search cell (default: the smallest budget)
    width: int | None = None  # width of the search cell (default: the smallest width at that budget)
    r: int | None = None  # r of the search cell (default: the smallest r)
    pruner: str = "median"
    pruner_args: tuple[tuple[str, Any], ...] = ()
    startup_trials: int = 3  # TPE's random start (and the median pruner's n_startup_trials unless given)
    seed: int = 0
    storage: str | None = None  # Optuna storage URL (default: sqlite file in the sweep folder)
    enqueue: tuple[float, ...] = ()  # LRs to try first (warm start / known-good points)
    concurrency: int | None = None  # trials at once (default: what the cluster fits)

    @classmethod
    def from_dict(cls, d: Any) -> "Search":
        names = tuple(f.name for f in dataclasses.fields(cls))
        d = _mapping("lr.search", d, names)
        kw: dict[str, Any] = {}
        for key in ("trials", "startup_trials", "concurrency", "width", "r"):
            if d.get(key) is not None:
                kw[key] = integer(f"lr.search.{key}", d[key], minimum=0 if key == "startup_trials" else 1)
        for key in ("low", "high", "budget"):
            if d.get(key) is not None:
                kw[key] = number(f"lr.search.{key}", d[key], parse=True)
        if "seed" in d:
            kw["seed"] = integer("lr.search.seed", d["seed"], minimum=0)
        if "pruner" in d:
            if d["pruner"] not in PRUNERS:
                fail("lr.search.pruner", f"must be one of {PRUNERS}, got {d['pruner']!r}", "use e.g. pruner: median")
            kw["pruner"] = d["pruner"]
        kw["pruner_args"] = tuple(sorted(_mapping("lr.search.pruner_args", d.get("pruner_args")).items()))
        if d.get("storage") is not None:
            if not isinstance(d["storage"], str) or "://" not in d["storage"]:
                fail("lr.search.storage", f"must be an Optuna storage URL, got {d['storage']!r}",
                     "use e.g. sqlite:///sweep/optuna.db or postgresql://user@host/db")
            kw["storage"] = d["storage"]
        if d.get("enqueue"):
            if not isinstance(d["enqueue"], (list, tuple)):
                fail("lr.search.enqueue", f"must be a list of LRs, got {d['enqueue']!r}", "write enqueue: [3.0e-3]")
            kw["enqueue"] = tuple(number(f"lr.search.enqueue[{i}]", v, parse=True) for i, v in enumerate(d["enqueue"]))
        out = cls(**kw)
        if out.low >= out.high:
            fail("lr.search.low", f"must be below lr.search.high ({out.low} >= {out.high})", "swap them")
        for lr in out.enqueue:
            if not out.low <= lr <= out.high:
                fail("lr.search.enqueue", f"{lr} lies outside [low, high] = [{out.low}, {out.high}]",
                     "widen the range or drop the point")
        return out


@dataclass(frozen=True)
class LRRule:
    rule: str = "fixed"
    value: float | None = None  # the fixed LR at the reference width (rule: fixed)
    transfer: Transfer = field(default_factory=Transfer)
    search: Search | None = None  # rule: tuned

    @classmethod
    def from_dict(cls, d: Any) -> "LRRule":
        d = _mapping("lr", d, ("rule", "value", "transfer", "search"))
        rule = d.get("rule", "fixed")
        if rule not in LR_RULES:
            fail("lr.rule", f"must be one of {LR_RULES}, got {rule!r}", "use rule: fixed (with value) or rule: tuned")
        transfer = Transfer.from_dict(d.get("transfer"))
        if rule == "fixed":
            if d.get("value") is None:
                fail("lr.value", "missing for rule: fixed", "write lr: {rule: fixed, value: 3.0e-3}")
            if d.get("search") is not None:
                fail("lr.search", "given with rule: fixed", "set rule: tuned, or drop the search section")
            return cls(rule=rule, value=number("lr.value", d["value"], parse=True), transfer=transfer)
        if d.get("value") is not None:
            fail("lr.value", "given with rule: tuned (the search finds it)", "drop lr.value or use rule: fixed")
        return cls(rule=rule, transfer=transfer, search=Search.from_dict(d.get("search")))


@dataclass(frozen=True)
class Resources:
    """Per trial: Train workers with their CPUs/GPUs, the ZeRO stage, and the small CPU share of the Tune trainable
    (the driver function that only builds and waits on the TorchTrainer)."""
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: int = 0
    zero_stage: int = 2
    trial_cpus: float = 0.1

    @classmethod
    def from_dict(cls, d: Any) -> "Resources":
        d = _mapping("resources", d, tuple(f.name for f in dataclasses.fields(cls)))
        kw: dict[str, Any] = {}
        if "num_workers" in d:
            kw["num_workers"] = integer("resources.num_workers", d["num_workers"])
        if "cpus_per_worker" in d:
            kw["cpus_per_worker"] = number("resources.cpus_per_worker", d["cpus_per_worker"], parse=True)
        if "trial_cpus" in d:
            kw["trial_cpus"] = number("resources.trial_cpus", d["trial_cpus"], allow_zero=True, parse=True)
        if "gpus_per_worker" in d:
            if d["gpus_per_worker"] not in (0, 1) or isinstance(d["gpus_per_worker"], bool):
                fail("resources.gpus_per_worker", f"must be 0 or 1, got {d['gpus_per_worker']!r}",
                     "one GPU per Train worker (1) or CPU only (0)")
            kw["gpus_per_worker"] = int(d["gpus_per_worker"])
        if "zero_stage" in d:
            if d["zero_stage"] not in (0, 1, 2, 3) or isinstance(d["zero_stage"], bool):
                fail("resources.zero_stage", f"must be 0, 1, 2 or 3, got {d['zero_stage']!r}", "use e.g. zero_stage: 2")
            kw["zero_stage"] = d["zero_stage"]
        return cls(**kw)

    @property
    def per_trial(self) -> dict[str, float]:
        """Everything one trial holds while it runs: its trainable plus its Train workers."""
        out = {"CPU": self.trial_cpus + self.num_workers * self.cpus_per_worker}
        if self.gpus_per_worker:
            out["GPU"] = float(self.num_workers * self.gpus_per_worker)
        return out


@dataclass(frozen=True)
class FitOptions:
    bootstrap: int = 200
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Any) -> "FitOptions":
        d = _mapping("fit", d, ("bootstrap", "seed"))
        return cls(bootstrap=integer("fit.bootstrap", d.get("bootstrap", 200), minimum=0),
                   seed=integer("fit.seed", d.get("seed", 0), minimum=0))


@dataclass(frozen=True)
class Adaptive:
    """An adaptive sweep instead of the full grid (tuning.adaptive): after `initial_runs` picked at the `prior` law,
    each next run is the candidate cell that shrinks phi's variance most per FLOP at the current fit; the sweep stops
    when phi's predicted 95% half-width at the current fit is at most target_phi_halfwidth, or when max_flops are
    spent."""
    target_phi_halfwidth: float
    max_flops: float
    initial_runs: int = 12
    prior: str = "reference"  # `reference` (the published law) or a law JSON from `python -m analysis fit`

    @classmethod
    def from_dict(cls, d: Any) -> "Adaptive":
        names = tuple(f.name for f in dataclasses.fields(cls))
        d = _mapping("adaptive", d, names)
        for key in ("target_phi_halfwidth", "max_flops"):
            if d.get(key) is None:
                fail(f"adaptive.{key}", "missing", "write adaptive: {target_phi_halfwidth: 0.05, max_flops: 7.0e20}")
        kw: dict[str, Any] = {key: number(f"adaptive.{key}", d[key], parse=True) for key in ("target_phi_halfwidth", "max_flops")}
        if "initial_runs" in d:
            kw["initial_runs"] = integer("adaptive.initial_runs", d["initial_runs"], minimum=7)  # > 6 coefficients
        if "prior" in d:
            prior = d["prior"]
            if not isinstance(prior, str) or not (prior == "reference" or Path(prior).expanduser().is_file()):
                fail("adaptive.prior", f"must be `reference` or an existing law JSON file, got {prior!r}",
                     "write prior: reference, or the path of a law.json from `python -m analysis fit`")
            kw["prior"] = prior
        return cls(**kw)


@dataclass(frozen=True)
class SeedNoise:
    """More seeds of one baseline cell, stored as variant `seed_noise` (outside the fit): the run-to-run spread that
    the law's residuals and phi's interval are read against. Defaults: the smallest budget, the middle of its
    widths, the smallest r, one extra seed."""
    budget: float | None = None
    width: int | None = None
    r: int | None = None
    seeds: tuple[int, ...] = (1,)

    @classmethod
    def from_dict(cls, d: Any, budgets: tuple[Budget, ...], r_values: tuple[int, ...], seed: int) -> "SeedNoise":
        d = _mapping("seed_noise", d, tuple(f.name for f in dataclasses.fields(cls)))
        budget = min(budgets, key=lambda b: b.compute)
        if d.get("budget") is not None:
            compute = number("seed_noise.budget", d["budget"], parse=True)
            budget = next((b for b in budgets if math.isclose(b.compute, compute, rel_tol=1e-9)), None)
            if budget is None:
                fail("seed_noise.budget", f"{compute:g} is not one of the budgets {[b.compute for b in budgets]}",
                     "pick a compute value from budgets:")
        widths = sorted(budget.widths)
        width = widths[len(widths) // 2] if d.get("width") is None else integer("seed_noise.width", d["width"])
        if width not in widths:
            fail("seed_noise.width", f"{width} is not a width of budget {budget.compute:g} ({widths})",
                 "pick one of that budget's widths")
        r = min(r_values) if d.get("r") is None else integer("seed_noise.r", d["r"])
        if r not in r_values:
            fail("seed_noise.r", f"{r} is not in r {list(r_values)}", "pick one of the sweep's r values")
        seeds = _int_list("seed_noise.seeds", d["seeds"]) if "seeds" in d else (seed + 1,)
        if seed in seeds:
            fail("seed_noise.seeds", f"lists the recipe's own seed {seed}", "list other seeds, e.g. [1, 2]")
        return cls(budget=budget.compute, width=width, r=r, seeds=seeds)


def _seed_noise(value: Any, budgets: tuple[Budget, ...], r_values: tuple[int, ...], seed: int) -> tuple[SeedNoise, ...]:
    """`seed_noise:` is one cell (a mapping) or a list of them; the same cell twice is refused."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    cells = tuple(SeedNoise.from_dict(item, budgets, r_values, seed) for item in items)
    keys = [(c.budget, c.width, c.r) for c in cells]
    if len(set(keys)) != len(keys):
        fail("seed_noise", f"names the same cell twice: {keys}", "list each (budget, width, r) once, with all its seeds")
    return cells


@dataclass(frozen=True)
class SweepSpec:
    name: str
    storage: str
    model: ModelFamily
    budgets: tuple[Budget, ...]
    r: tuple[int, ...]
    data: str = "default"
    variants: tuple[Variant, ...] = (Variant("baseline"),)
    recipe: tuple[tuple[str, Any], ...] = ()
    lr: LRRule = field(default_factory=lambda: LRRule(value=3e-3))
    resources: Resources = field(default_factory=Resources)
    concurrency: int | None = None  # trials at once; None ("auto") = cluster resources / per-trial resources
    fit: FitOptions = field(default_factory=FitOptions)
    adaptive: Adaptive | None = None  # None: run the whole grid
    seed_noise: tuple[SeedNoise, ...] = ()  # baseline cells trained again under other seeds; (): one seed per cell

    TOP = ("name", "storage", "data", "model", "budgets", "r", "variants", "recipe", "lr", "resources",
           "concurrency", "fit", "adaptive", "seed_noise")

    @property
    def recipe_dict(self) -> dict[str, Any]:
        return dict(self.recipe)

    @property
    def baseline(self) -> Variant:
        """The variant the main law is fitted on: `baseline` if named so, else the first."""
        return next((v for v in self.variants if v.name == "baseline"), self.variants[0])

    @property
    def optuna_storage(self) -> str:
        search = self.lr.search
        if search is not None and search.storage:
            return search.storage
        if "://" in self.storage:
            # Every Optuna call runs in the sweep driver, so a SQLite file on the driver's disk serves a URI store
            # (resume from the same head node); give lr.search.storage an RDB URL to share the study wider.
            return f"sqlite:///{Path.home() / '.cache' / 'looplaw' / 'optuna' / (self.name + '.db')}"
        return f"sqlite:///{Path(self.storage).resolve() / 'optuna.db'}"

    @classmethod
    def from_dict(cls, d: Any) -> "SweepSpec":
        d = _mapping("spec", d, cls.TOP)
        for key in ("name", "storage", "model", "budgets", "r"):
            if key not in d:
                fail(key, "missing", f"add `{key}:` to the sweep spec (see tuning/configs/laptop.yaml)")
        name = d["name"]
        if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
            fail("name", f"must be a non-empty word without slashes or spaces, got {name!r}", "write name: my-sweep")
        storage = d["storage"]
        if not isinstance(storage, str) or not storage:
            fail("storage", f"must be a folder or a pyarrow.fs URI, got {storage!r}", "write storage: results/my-sweep")
        data = d.get("data", "default")
        if not isinstance(data, str) or not data:
            fail("data", f"must be 'default' or a prepared data folder, got {data!r}", "write data: default")
        if not isinstance(d["budgets"], (list, tuple)) or not d["budgets"]:
            fail("budgets", f"must be a non-empty list, got {d['budgets']!r}",
                 "write budgets: [{compute: 1.0e18, widths: [6, 8]}, ...]")
        budgets = tuple(Budget.from_dict(f"budgets[{i}]", b) for i, b in enumerate(d["budgets"]))
        computes = [b.compute for b in budgets]
        if len(set(computes)) != len(computes):
            fail("budgets", f"compute values repeat: {computes}", "merge the widths of equal budgets into one entry")
        r_values = _int_list("r", d["r"])
        variants_raw = d.get("variants") or {"baseline": {}}
        if not isinstance(variants_raw, Mapping):
            fail("variants", f"must be a mapping name -> overrides, got {variants_raw!r}",
                 "write variants: {baseline: {}, truncated: {bptt_k: ceil(r/2)}}")
        variants = []
        for vname, vd in variants_raw.items():
            if not isinstance(vname, str) or not vname.replace("_", "").replace("-", "").isalnum():
                fail("variants", f"name {vname!r} must be a word", "use names like baseline, truncated")
            if vname in ("seed_noise", "lr_search"):
                fail("variants", f"{vname!r} is the label of the sweep's own {vname.replace('_', ' ')} runs",
                     "name the variant otherwise")
            v = Variant.from_dict(vname, vd)
            for r in v.r or ():
                if r not in r_values:
                    fail(f"variants.{vname}.r", f"{r} is not in the sweep's r values {list(r_values)}",
                         "list a subset of r:")
            for c in v.budgets or ():
                if not any(math.isclose(c, b, rel_tol=1e-9) for b in computes):
                    fail(f"variants.{vname}.budgets", f"{c:g} is not one of the budgets {computes}",
                         "list compute values from budgets:")
            variants.append(v)
        recipe = _mapping("recipe", d.get("recipe"), RECIPE_KEYS)
        if "optim" in recipe and isinstance(recipe["optim"], Mapping) and "lr" in recipe["optim"]:
            fail("recipe.optim.lr", "is set by the LR rule", "move it to lr: {rule: fixed, value: ...}")
        if "micro_batch" in recipe:
            recipe["micro_batch"] = _micro_batch(recipe["micro_batch"])
        lr = _mapping("lr", d.get("lr", {"rule": "fixed", "value": 3e-3}))
        if isinstance(recipe.get("optim"), Mapping) and recipe["optim"].get("optimizer") == "muonh":
            # The recipe transfers its LRs itself (training.recipe); a second transfer would apply them twice.
            transfer = _mapping("lr.transfer", lr.get("transfer"))
            if any(number(f"lr.transfer.{k}", v, positive=False, parse=True) for k, v in transfer.items() if k != "reference_width"):
                fail("lr.transfer", "does not apply to optimizer muonh, which transfers lr by the study's rules "
                     "(batch, tokens) itself", "drop lr.transfer; lr.value is the matrix LR at the study's reference")
            lr["transfer"] = {"width_exponent": 0.0}
        concurrency = d.get("concurrency", "auto")
        if concurrency in (None, "auto"):
            concurrency = None
        else:
            concurrency = integer("concurrency", concurrency)
        spec = cls(name=name, storage=storage, data=data, model=ModelFamily.from_dict(d["model"]), budgets=budgets,
                   r=r_values, variants=tuple(variants), recipe=tuple(sorted(recipe.items())),
                   lr=LRRule.from_dict(lr),
                   resources=Resources.from_dict(d.get("resources")), concurrency=concurrency,
                   fit=FitOptions.from_dict(d.get("fit")),
                   adaptive=None if d.get("adaptive") is None else Adaptive.from_dict(d["adaptive"]),
                   seed_noise=_seed_noise(d.get("seed_noise"), budgets, r_values,
                                          integer("recipe.seed", recipe.get("seed", 0), minimum=0)))
        if spec.adaptive is not None:
            if len(variants) > 1:
                names = [v.name for v in variants]
                fail("adaptive", f"plans the baseline law alone, but the spec has variants {names}",
                     "drop the other variants, or run them as a grid in a second spec")
            if len(r_values) < 2:
                fail("r", f"an adaptive sweep pins phi, which needs two r values or more, got {list(r_values)}",
                     "write r: [1, 2, 4, 8]")
        search = spec.lr.search
        if search is not None:
            if search.budget is not None and not any(math.isclose(search.budget, c, rel_tol=1e-9) for c in computes):
                fail("lr.search.budget", f"{search.budget:g} is not one of the budgets {computes}",
                     "pick a compute value from budgets: (usually the smallest)")
            if search.r is not None and search.r not in r_values:
                fail("lr.search.r", f"{search.r} is not in r {list(r_values)}", "pick one of the sweep's r values")
        return spec

    @classmethod
    def from_yaml(cls, path: str | Path, storage: str | None = None) -> "SweepSpec":
        """`storage` overrides the spec's, before validation."""
        import yaml

        path = Path(path)
        if not path.is_file():
            fail("config", f"file {str(path)!r} not found", "pass a sweep spec, e.g. tuning/configs/laptop.yaml")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            fail("config", f"{path} is not valid YAML ({exc})", "fix the YAML syntax")
        data = data or {}
        if storage and isinstance(data, dict):
            data = {**data, "storage": storage}
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "SweepSpec":
        return dataclasses.replace(self, **changes)
