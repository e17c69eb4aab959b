"""One pretraining run as a frozen, validated config (model, data, optimiser, budget, resources).

Everything is checked here, before Ray starts, so a typo costs a traceback naming the field, not a cluster start.
Imports no torch: the sweep builds and hashes thousands of these on the driver.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from models.accounting import flops_per_token, tokens_for_compute
from models.config import LoopedConfig
from models.validate import fail, integer, number


SCHEDULES = ("linear", "wsd")

OPTIMIZERS = ("adamw", "muonh")

# Per-optimizer defaults of the fields left unset (None): AdamW as before; MuonH's AdamW half and clipping as the
# study (betas 0.8/0.95, eps 1e-10, no clipping).
_DEFAULTS = {
    "adamw": {"embed_lr_mult": 1.0, "norm_lr_mult": 1.0, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0},
    "muonh": {"beta1": 0.8, "beta2": 0.95, "eps": 1e-10, "grad_clip": 0.0},
}


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer recipe and a warmup-free schedule down to `final_lr_frac` of the peak.

    `schedule`: "linear" decays from the first step to the last (the study's); "wsd" (warmup-stable-decay without
    warmup) holds the peak and decays linearly over the last `cooldown_frac` of the steps, so cooldowns can branch
    off the stable phase at several horizons (RunConfig.horizons; Hägele et al. 2024).

    `adamw`: one AdamW; `lr` is the peak LR of the block matrices and the LM head, embeddings and
    norms/scalars/hyper-connection lanes use multiples of it so that one number transfers across sizes; only the
    block matrices are decayed.
    `muonh`: the study's recipe (training.recipe): MuonH on every 2-D block matrix, AdamW on the rest with the
    study's LRs; `lr` is the matrix LR at the study's reference point (0.014), which the run transfers to its own
    batch and token count by the study's rules. The multiples and weight decay do not apply.
    """

    optimizer: str = "adamw"
    lr: float = 3e-3
    embed_lr_mult: float | None = None  # adamw only (default 1)
    norm_lr_mult: float | None = None  # adamw only (default 1)
    weight_decay: float = 0.0  # adamw: block matrices only; decaying gains, lanes or the head hurts small LMs
    beta1: float | None = None  # AdamW (muonh: its AdamW half); default 0.9 (adamw) / 0.8 (muonh)
    beta2: float | None = None  # default 0.95
    eps: float | None = None  # default 1e-8 (adamw) / 1e-10 (muonh)
    grad_clip: float | None = None  # 0 disables; default 1.0 (adamw) / 0 (muonh, as the study)
    final_lr_frac: float = 0.1
    schedule: str = "linear"
    cooldown_frac: float = 0.2  # wsd: share of a horizon's steps spent decaying

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            fail("optim.optimizer", f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "muonh":
            for name in ("embed_lr_mult", "norm_lr_mult"):
                if getattr(self, name) is not None:
                    fail(f"optim.{name}", "does not apply to muonh (its AdamW groups take the study's LRs)",
                         "drop it, or use optimizer: adamw")
            if self.weight_decay:
                fail("optim.weight_decay", "muonh decays nothing (its matrices stay on their initial Frobenius "
                     "sphere)", "drop it, or use optimizer: adamw")
        for name, value in _DEFAULTS[self.optimizer].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: resolve the default once, at the edge
        number("optim.lr", self.lr)
        if self.optimizer == "adamw":
            number("optim.embed_lr_mult", self.embed_lr_mult)
            number("optim.norm_lr_mult", self.norm_lr_mult)
        number("optim.weight_decay", self.weight_decay, allow_zero=True)
        number("optim.eps", self.eps)
        number("optim.grad_clip", self.grad_clip, allow_zero=True)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                fail(f"optim.{name}", f"must be in [0, 1), got {value!r}", "use e.g. 0.9 / 0.95")
        if not (isinstance(self.final_lr_frac, (int, float)) and 0 <= self.final_lr_frac <= 1):
            fail("optim.final_lr_frac", f"must be in [0, 1], got {self.final_lr_frac!r}", "use e.g. 0.1")
        if self.schedule not in SCHEDULES:
            fail("optim.schedule", f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        if not (isinstance(self.cooldown_frac, (int, float)) and 0 < self.cooldown_frac <= 1):
            fail("optim.cooldown_frac", f"must be in (0, 1], got {self.cooldown_frac!r}", "use e.g. 0.2")

    def cooldown_start(self, total_steps: int) -> int:
        """First step of the decay: 0 for linear; for wsd the stable phase ends `cooldown_frac` before the end."""
        if self.schedule == "linear":
            return 0
        return total_steps - max(1, round(self.cooldown_frac * total_steps))

    def lr_multiplier(self, step: int, total_steps: int) -> float:
        """Peak until the decay starts, then linearly down to final_lr_frac at the last step: a pure function of the
        step and the horizon, so resume is exact and a cooldown branch is the same run as one trained to its horizon."""
        start = self.cooldown_start(total_steps)
        span = total_steps - 1 - start
        if step < start or span <= 0:
            return 1.0 if step < start or total_steps <= 1 else self.final_lr_frac
        return 1.0 - (1.0 - self.final_lr_frac) * min(step - start, span) / span


# The run id's rule (see RunConfig): bump only to re-key every stored run on purpose.
RUN_ID_SCHEMA = 2
# What is trained and measured, and how the training state is laid out (a checkpoint written under one ZeRO stage,
# worker count or micro-batch cannot resume under another). Everything else (labels, storage, retries, eval and
# checkpoint cadence, CPUs per worker) leaves the run id alone.
EXPERIMENT_FIELDS = ("model", "size", "data", "optim", "compute", "tokens", "batch_tokens", "seed", "val_tokens",
                     "spike_factor", "micro_batch", "zero_stage", "num_workers", "use_gpu")


def _declared_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    """JSON-ready and canonical: 1e15 and 10**15 hash alike, a nested config keeps only its non-default fields."""
    if dataclasses.is_dataclass(value):
        return _identity(value, [f.name for f in dataclasses.fields(value)])
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() else float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    raise TypeError(f"run id: cannot hash a {type(value).__name__} ({value!r})")


def _identity(obj: Any, names: Iterable[str]) -> dict[str, Any]:
    """The named fields of a dataclass whose values differ from their declared defaults (required ones always)."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    out = {}
    for name in names:
        value, default = _plain(getattr(obj, name)), _declared_default(fields[name])
        if default is None and isinstance(obj, OptimConfig):  # resolved per optimizer: that value is the default
            default = _DEFAULTS[obj.optimizer].get(name, default)
        if default is dataclasses.MISSING or value != _plain(default):  # compared as plain data: a nested
            out[name] = value  # config of a newer class, or 10**12 for 1e12, is still the default
    return out


_FAMILIES = ("explicit", "reference", "tiny")



@dataclass(frozen=True)
class RunConfig:
    """One run. Its `run_id` names it in the results store and Ray storage, so a rerun finds what is done.

    The run id rule: `d<d_model>-r<r>-<hash>`, the hash over RUN_ID_SCHEMA and the EXPERIMENT_FIELDS of this
    config, where a field (and, inside `model` and `optim`, every nested field) counts only when it differs from
    its declared default. So a new field added with a default (to LoopedConfig, OptimConfig or here) leaves every
    stored run's id alone; a new top-level field that changes what is trained goes into EXPERIMENT_FIELDS. Never
    change a declared default (runs stored at the old default would take the new one's id): add a field instead,
    or bump RUN_ID_SCHEMA to re-key every run on purpose.
    """

    model: LoopedConfig
    size: int | None = None  # reference size s (d = ceil(64*s/128)*128); None for other families
    data: str = "default"  # "default" (embedded corpus, prepared on demand) or a prepared data dir
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: float | None = None  # training FLOPs budget C ...
    tokens: int | None = None  # ... or token budget D: exactly one of the two
    batch_tokens: int = 65536
    micro_batch: int = 8
    zero_stage: int = 2
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    seed: int = 0
    storage: str = "results"  # results store + Ray Train storage + TensorBoard (local path or pyarrow.fs URI)
    eval_every: int = 50
    log_every: int = 10  # steps between host syncs: loss and grad norm reach the host (and the guard) this often
    compile: bool | None = None  # torch.compile the model; None: on GPU only (inductor on CPU costs more than it saves)
    val_tokens: int = 65536
    spike_factor: float = 4.0  # loss > spike_factor x running mean => diverged
    max_failures: int = 2
    checkpoint_every: int = 100  # steps; a checkpoint is also written at the end
    # Test-time depths: held-out loss at these r after training (looped models only); None: 1, 2, ..., 2r.
    eval_depths: tuple[int, ...] | None = None
    # Multi-horizon (optim.schedule: wsd): budgets below the run's own, in its unit (FLOPs or tokens), at which a
    # cooldown branches off the stable phase; each branch's final loss is a row of its own.
    horizons: tuple[float, ...] | None = None
    name: str = ""
    sweep: str = ""
    variant: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.model, LoopedConfig):
            fail("model", f"must be a LoopedConfig, got {type(self.model).__name__}", "build it with RunConfig.from_dict")
        if self.size is not None:
            integer("model.size", self.size)
        if not isinstance(self.data, str) or not self.data:
            fail("data", f"must be 'default' or a prepared data dir, got {self.data!r}",
                 "use data: default or the --out dir of `python -m training.prepare`")
        if not isinstance(self.optim, OptimConfig):
            fail("optim", f"must be an OptimConfig, got {type(self.optim).__name__}", "build it with RunConfig.from_dict")
        if (self.compute is None) == (self.tokens is None):
            fail("budget", "give exactly one of compute (FLOPs) and tokens",
                 "set budget: {compute: 1e15} or budget: {tokens: 1000000}")
        if self.compute is not None:
            number("budget.compute", self.compute)
        if self.tokens is not None:
            integer("budget.tokens", self.tokens)
        integer("batch_tokens", self.batch_tokens)
        integer("micro_batch", self.micro_batch)
        if self.zero_stage not in (0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            fail("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage!r}", "use e.g. zero_stage: 2")
        integer("resources.num_workers", self.num_workers)
        number("resources.cpus_per_worker", self.cpus_per_worker)
        if not isinstance(self.use_gpu, bool):
            fail("resources.use_gpu", f"must be true or false, got {self.use_gpu!r}", "use true or false")
        integer("seed", self.seed, minimum=0)
        if not isinstance(self.storage, str) or not self.storage:
            fail("storage", f"must be a path or URI, got {self.storage!r}", "use e.g. storage: results")
        integer("eval_every", self.eval_every)
        integer("log_every", self.log_every)
        if self.compile is not None and not isinstance(self.compile, bool):
            fail("compile", f"must be true, false or null (auto: on GPU only), got {self.compile!r}",
                 "use compile: true / false, or leave it out")
        integer("checkpoint_every", self.checkpoint_every)
        integer("val_tokens", self.val_tokens)
        number("spike_factor", self.spike_factor)
        if self.spike_factor <= 1:
            fail("spike_factor", f"must be > 1, got {self.spike_factor!r}", "use e.g. 4.0")
        integer("max_failures", self.max_failures, minimum=-1)
        if self.eval_depths is not None:
            object.__setattr__(self, "eval_depths", _depth_list(self.eval_depths))
        for name in ("name", "sweep", "variant"):
            if not isinstance(getattr(self, name), str):
                fail(name, f"must be a string, got {getattr(self, name)!r}", "quote it in the YAML")

        per_step = self.micro_batch * self.model.seq_len * self.num_workers
        if self.batch_tokens % per_step:
            fail("batch_tokens", f"{self.batch_tokens} is not a multiple of micro_batch*seq_len*num_workers = "
                 f"{self.micro_batch}*{self.model.seq_len}*{self.num_workers} = {per_step}",
                 f"use a multiple of {per_step}, e.g. {per_step * max(1, round(self.batch_tokens / per_step))}")
        if self.val_tokens < self.model.seq_len * self.num_workers:
            fail("val_tokens", f"{self.val_tokens} is less than one sequence per worker "
                 f"({self.model.seq_len}*{self.num_workers})", f"use >= {self.model.seq_len * self.num_workers}")
        if self.steps < 1:
            fail("budget", f"the budget buys {self.target_tokens:.3g} tokens, less than one batch of "
                 f"{self.batch_tokens}", "raise the budget or lower batch_tokens")
        if self.horizons is not None:
            object.__setattr__(self, "horizons", self._checked_horizons())

    def _checked_horizons(self) -> tuple[float, ...]:
        if self.optim.schedule != "wsd":
            fail("horizons", "cooldown branches need the wsd schedule", "set optim: {schedule: wsd} or drop horizons")
        if self.optim.optimizer == "muonh":
            fail("horizons", "muonh sets its LR from the run's token count, so a branch would not be the run trained "
                 "to its horizon", "train each horizon as its own run, or use optimizer: adamw")
        if not isinstance(self.horizons, (list, tuple)) or not self.horizons:
            fail("horizons", f"must be a non-empty list of budgets, got {self.horizons!r}", "e.g. horizons: [2.5e14]")
        budget = self.compute if self.compute is not None else self.tokens
        unit = "compute" if self.compute is not None else "tokens"
        values = tuple(sorted({number("horizons", h, positive=False, parse=True) for h in self.horizons}))
        for h in values:
            if not (isinstance(h, (int, float)) and 0 < h < budget):
                fail("horizons", f"{h!r} is not between 0 and the run's budget ({unit} {budget:.4g})",
                     f"give budgets in the run's unit ({unit}) below its own")
            steps = self.branch_config(h).steps
            if steps < 1 or self.optim.cooldown_start(steps) < 1:
                fail("horizons", f"{h:.4g} buys {steps} steps, too few for a stable phase and a cooldown",
                     "raise it or lower batch_tokens")
        return values

    # ---- derived -------------------------------------------------------------------------------------------
    def compile_enabled(self, on_gpu: bool) -> bool:
        return on_gpu if self.compile is None else self.compile

    @property
    def grad_accum(self) -> int:
        return self.batch_tokens // (self.micro_batch * self.model.seq_len * self.num_workers)

    @property
    def flops_per_token(self) -> float:
        return flops_per_token(self.model)

    @property
    def target_tokens(self) -> float:
        return float(self.tokens) if self.tokens is not None else tokens_for_compute(self.model, self.compute)

    @property
    def steps(self) -> int:
        """Optimizer steps: budget / batch, rounded to the nearest whole step (C / (F * batch_tokens) for a FLOP budget)."""
        return int(round(self.target_tokens / self.batch_tokens))

    @property
    def train_tokens(self) -> int:
        """Tokens the run trains on: whole steps of batch_tokens (the budget, rounded)."""
        return self.steps * self.batch_tokens

    @property
    def depths(self) -> tuple[int, ...]:
        """The r values the finished model is evaluated at: none for r = 1 (nothing recurs), else `eval_depths`
        (default 1..2r) with the trained r always among them, so the depth table meets the final loss."""
        r = self.model.r
        if r == 1:
            return ()
        return tuple(sorted(set(self.eval_depths or range(1, 2 * r + 1)) | {r}))

    def branch_config(self, horizon: float) -> "RunConfig":
        """The run trained to `horizon` alone: a wsd cooldown branch follows its trajectory exactly (same seed, data
        order and LR until its cooldown), so the branch's row carries that run's id."""
        budget = {"compute": float(horizon)} if self.compute is not None else {"tokens": int(horizon)}
        return dataclasses.replace(self, horizons=None, **budget, **{k: None for k in ("compute", "tokens")
                                                                      if k not in budget})

    def branch_at(self, steps: int) -> "RunConfig":
        """The cooldown branch that ends at `steps` (one of `horizon_steps` before the last)."""
        for h in self.horizons or ():
            branch = self.branch_config(h)
            if branch.steps == steps:
                return branch
        raise ValueError(f"horizons: no cooldown branch of {self.run_id} ends at step {steps}")

    @property
    def horizon_steps(self) -> list[int]:
        """Steps at which each cooldown branch ends, then the run's own last step."""
        return [self.branch_config(h).steps for h in (self.horizons or ())] + [self.steps]

    @property
    def run_id(self) -> str:
        """Content hash of the fields that define the experiment (the rule is in the class docstring)."""
        content = {"schema": RUN_ID_SCHEMA, **_identity(self, EXPERIMENT_FIELDS)}
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
        return f"d{self.model.d_model}-r{self.model.r}-{digest}"

    # ---- (de)serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Canonical nested form; `from_dict(to_dict())` round-trips."""
        return {
            "model": {"family": "explicit", "size": self.size, **self.model.to_dict()},
            "data": self.data,
            "optim": dataclasses.asdict(self.optim),
            "budget": {"compute": self.compute, "tokens": self.tokens},
            "batch_tokens": self.batch_tokens,
            "micro_batch": self.micro_batch,
            "zero_stage": self.zero_stage,
            "resources": {"num_workers": self.num_workers, "cpus_per_worker": self.cpus_per_worker,
                          "use_gpu": self.use_gpu},
            "seed": self.seed,
            "storage": self.storage,
            "eval_every": self.eval_every,
            "log_every": self.log_every,
            "compile": self.compile,
            "val_tokens": self.val_tokens,
            "spike_factor": self.spike_factor,
            "max_failures": self.max_failures,
            "checkpoint_every": self.checkpoint_every,
            "eval_depths": None if self.eval_depths is None else list(self.eval_depths),
            "horizons": None if self.horizons is None else list(self.horizons),
            "name": self.name,
            "sweep": self.sweep,
            "variant": self.variant,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Nested sections (model, optim, budget, resources) as in the YAML; budget/resources keys may also be top-level."""
        if not isinstance(data, dict):
            fail("config", f"must be a mapping, got {type(data).__name__}", "write the YAML as key: value pairs")
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} | {"budget", "resources"}
        unknown = sorted(set(data) - known)
        if unknown:
            fail(unknown[0], "unknown field", f"valid top-level fields are {sorted(known - {'size'})}")
        if "model" not in data:
            fail("model", "missing", "add a model section, e.g. model: {family: tiny, r: 2}")
        model, size = _model_from_dict(data.pop("model"))
        kwargs: dict[str, Any] = {"model": model, "size": size}
        if "size" in data:
            fail("size", "belongs in the model section", "write model: {family: reference, size: 12, ...}")
        optim = data.pop("optim", {}) or {}
        if isinstance(optim, OptimConfig):
            kwargs["optim"] = optim
        else:
            kwargs["optim"] = _build(OptimConfig, optim, "optim")
        for section, keys in (("budget", ("compute", "tokens")),
                              ("resources", ("num_workers", "cpus_per_worker", "use_gpu"))):
            values = data.pop(section, {}) or {}
            if not isinstance(values, dict):
                fail(section, f"must be a mapping, got {values!r}", f"write {section}: {{{keys[0]}: ...}}")
            extra = sorted(set(values) - set(keys))
            if extra:
                fail(f"{section}.{extra[0]}", "unknown field", f"valid fields are {list(keys)}")
            for key in keys:
                if key in values and key in data:
                    fail(key, f"given both at top level and in {section}", "give it once")
                if key in values:
                    kwargs[key] = values[key]
        kwargs.update(data)
        if kwargs.get("compute") is not None:
            kwargs["compute"] = number("budget.compute", kwargs["compute"], parse=True)
        if kwargs.get("tokens") is not None:
            tokens = number("budget.tokens", kwargs["tokens"], parse=True)
            kwargs["tokens"] = int(tokens) if float(tokens).is_integer() else tokens
        if "cpus_per_worker" in kwargs:
            kwargs["cpus_per_worker"] = number("resources.cpus_per_worker", kwargs["cpus_per_worker"], parse=True)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            fail("config", f"file {str(path)!r} not found", "pass the path of a run YAML, e.g. training/configs/tiny.yaml")
        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                fail("config", f"{path} is not valid YAML ({exc})", "fix the YAML syntax")
        return cls.from_dict(data or {})

    def replace(self, **changes: Any) -> "RunConfig":
        """Copy with changes. `model=` / `optim=` take a config or a dict of field overrides, e.g.
        `cfg.replace(optim={"lr": 1e-3}, model={"r": 2}, tokens=10**6)`; setting one budget clears the other."""
        if isinstance(changes.get("model"), dict):
            overrides = dict(changes["model"])
            if "size" in overrides:
                changes.setdefault("size", overrides.pop("size"))
            changes["model"] = self.model.replace(**overrides)
        if isinstance(changes.get("optim"), dict):
            changes["optim"] = _build(OptimConfig, {**dataclasses.asdict(self.optim), **changes["optim"]}, "optim")
        if changes.get("compute") is not None and "tokens" not in changes:
            changes["tokens"] = None
        if changes.get("tokens") is not None and "compute" not in changes:
            changes["compute"] = None
        return dataclasses.replace(self, **changes)


def _depth_list(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        fail("eval_depths", f"must be a non-empty list of recurrence counts, got {value!r}",
             "write e.g. eval_depths: [1, 2, 4, 8], or leave it out for 1..2r")
    for r in value:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            fail("eval_depths", f"every evaluation r must be an integer >= 1, got {r!r} in {list(value)}",
                 "drop it: r = 0 runs no recurrence (the model needs at least one)")
    return tuple(sorted(set(value)))


def _build(cls: type, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        fail(section, f"must be a mapping, got {values!r}", f"write {section}: {{key: value}}")
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(values) - known)
    if extra:
        fail(f"{section}.{extra[0]}", "unknown field", f"valid fields are {sorted(known)}")
    # A field's type is the string "str" under postponed annotations and the class str otherwise (make_dataclass).
    text = {f.name for f in dataclasses.fields(cls) if f.type in ("str", str)}
    values = {k: (number(f"{section}.{k}", v, positive=False, parse=True) if isinstance(v, str) and k not in text else v) for k, v in values.items()}
    return cls(**values)


def _model_from_dict(spec: Any) -> tuple[LoopedConfig, int | None]:
    """`family: reference` (size, r, ...), `family: tiny` (r, d_model, ...) or `family: explicit` (every field)."""
    if isinstance(spec, LoopedConfig):
        return spec, None
    if not isinstance(spec, dict):
        fail("model", f"must be a mapping, got {spec!r}", "write model: {family: tiny, r: 2}")
    spec = dict(spec)
    family = spec.pop("family", "explicit")
    size = spec.pop("size", None)
    if family not in _FAMILIES:
        fail("model.family", f"unknown family {family!r}", f"use one of {', '.join(_FAMILIES)}")
    try:
        if family == "reference":
            if size is None or "r" not in spec:
                fail("model.size", "the reference family needs size and r", "write model: {family: reference, size: 12, r: 4}")
            return LoopedConfig.reference(size=size, **spec), size
        if family == "tiny":
            return LoopedConfig.tiny(**spec), size
        known = {f.name for f in dataclasses.fields(LoopedConfig)}
        extra = sorted(set(spec) - known)
        if extra:
            fail(f"model.{extra[0]}", "unknown field", f"valid fields are {sorted(known)} (plus family, size)")
        return LoopedConfig.from_dict(spec), size
    except TypeError as exc:  # an unknown keyword for the family constructor
        fail("model", str(exc), f"check the field names of the {family} family")
    raise AssertionError("unreachable")
