"""Which class an `injection:` names: a built-in short name, an entry point a package registers, or an import path.

    injection: concat                       # built-in (models.builtin_counts.BUILTIN)
    injection: gated                        # entry point `gated` in the group `looplaw.injections`
    injection: my_pkg.loops:GatedInjection  # import path, module:Class

Torch-free: a built-in resolves to its declared costs without importing its module; a plugin's class is imported
(it is its own declaration). Import paths resolve as under `python -m`: installed packages, then the current working
directory (appended to sys.path, so it never shadows an installed package). Ray workers import the same path: a
driver's ray.init puts its working directory on every worker's sys.path (tests/test_plugin_ray.py trains a plugin
that lives only there), and `ray job submit --working-dir .` ships that directory to a cluster's nodes. Every failure
is a ValueError naming `LoopedConfig.injection` and the fix.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from models.builtin_counts import BUILTIN
from models.injection_contract import InjectionContract
from models.validate import fail

ENTRY_POINT_GROUP = "looplaw.injections"
FIELD = "LoopedConfig.injection"
# The base a plugin subclasses, named rather than imported: it lives with torch, and this module must not need it.
BASE = ("models.injection", "Injection")
HELP = "see README 'Bring your own loop'"


def is_builtin(name: str) -> bool:
    return name in BUILTIN


def _import(path: str, where: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        fail(FIELD, f"{where} {path!r} is not of the form package.module:Class",
             f"write e.g. my_pkg.loops:Gated; {HELP}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # as `python -m` from here would find it; appended, so it shadows nothing installed
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        fail(FIELD, f"cannot import {module_name!r} for {path!r} ({exc})",
             "install the package, or run from the folder that holds it, or add that folder to PYTHONPATH")
    except Exception as exc:  # the plugin's own module failed while importing: say which and how
        fail(FIELD, f"importing {module_name!r} for {path!r} raised {type(exc).__name__}: {exc}",
             "fix that module (import it in Python to see the traceback)")
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            fail(FIELD, f"module {module_name!r} has no attribute {attr!r}", "check the class name after the colon")
        obj = getattr(obj, part)
    return obj


def _entry_point(name: str) -> Any:
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found and "." in name:
        fail(FIELD, f"unknown mode {name!r}", f"an import path names the class after a colon, e.g. {name}:MyInjection")
    if not found:
        fail(FIELD, f"unknown mode {name!r}", f"use one of {', '.join(BUILTIN)}, an entry point of the group "
             f"{ENTRY_POINT_GROUP!r}, or an import path package.module:Class ({HELP})")
    try:
        return found[0].load()
    except Exception as exc:
        fail(FIELD, f"entry point {name!r} ({found[0].value}) failed to load: {type(exc).__name__}: {exc}",
             "fix or reinstall the package that registers it")
    raise AssertionError("unreachable")


def _is_injection(cls: type) -> bool:
    return any((base.__module__, base.__qualname__) == BASE for base in cls.__mro__)


@lru_cache(maxsize=None)
def contract(name: str) -> type[InjectionContract]:
    """The class whose classmethods declare `name`'s costs (cached: a sweep builds thousands of configs)."""
    if not isinstance(name, str) or not name:
        fail(FIELD, f"must be a mode name or an import path, got {name!r}", f"use one of {', '.join(BUILTIN)}")
    if name in BUILTIN:
        return BUILTIN[name]
    cls = _import(name, "import path") if ":" in name else _entry_point(name)
    if not inspect.isclass(cls):
        fail(FIELD, f"{name!r} is not a class (it is a {type(cls).__name__})",
             f"name a subclass of models.injection.Injection; {HELP}")
    if not _is_injection(cls):
        fail(FIELD, f"{name!r} ({cls.__module__}.{cls.__qualname__}) is not a subclass of models.injection.Injection",
             f"subclass it and implement the contract; {HELP}")
    for method in ("param_count", "macs_per_token"):
        if not any(method in vars(klass) for klass in cls.__mro__ if klass is not InjectionContract):
            fail(FIELD, f"{cls.__qualname__} does not declare {method}",
                 f"add a classmethod {method}(cls, cfg, **args); {HELP}")
    return cls


def module_class(name: str) -> type:
    """The torch module class `name` builds (imports it; for a plugin, the class itself)."""
    cls = contract(name)
    return _import(cls.module_path, "built-in module") if name in BUILTIN else cls


def check_args(name: str, args: dict[str, Any]) -> None:
    """`injection_args` must bind to the declared costs and, for a plugin, to its constructor (cfg, **args)."""
    cls = contract(name)
    callables = [("param_count", cls.param_count), ("macs_per_token", cls.macs_per_token)]
    if name not in BUILTIN:
        callables.append(("__init__", cls.__init__))
    for label, fn in callables:
        try:
            # A constructor binds self too; a classmethod binds cls already.
            inspect.signature(fn).bind(*((None, None) if label == "__init__" else (None,)), **args)
        except TypeError as exc:
            accepted = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls", "cfg")]
            fix = (f"give only its keyword arguments {accepted}" if accepted
                   else f"{name} takes no injection_args: drop them")
            fail("LoopedConfig.injection_args", f"{args!r} do not fit {cls.__qualname__}.{label} ({exc})", fix)
