"""`looplaw COMMAND ...`: one console command for the platform, installed by `pip install -e .`.

    looplaw sweep   [--config SPEC] [--storage DIR]        = python tuning/sweep.py ...
    looplaw run     --config RUN.yaml [--storage DIR]      = python -m training.run ...
    looplaw prepare --input SRC --out DIR ...              = python -m training.prepare ...
    looplaw plan SPEC [--suggest] [--simulate N]           = python -m tuning.plan ...
    looplaw fit | compare | query | plot | depth ...       = python -m analysis fit | compare | query | plot | depth ...
    looplaw eval STORE --tasks T1,T2 [--depths 1,2,4,8]    = python -m analysis eval ...   (the eval extra)
    looplaw lmeval --model looplaw --model_args run=...    = python -m analysis lmeval ... (lm-eval's command)

Each command is its module's own `main`, imported only when asked for (a query never imports Ray or torch); the
script and `python -m` forms keep working (`ray job submit` uses `python tuning/sweep.py`).
"""
from __future__ import annotations

import importlib
import sys

# command -> (module whose main() runs it, whether that main takes the command name as its first argument)
COMMANDS: dict[str, tuple[str, bool]] = {
    "sweep": ("tuning.sweep", False),
    "run": ("training.run", False),
    "prepare": ("training.prepare", False),
    "plan": ("tuning.plan", False),
    "fit": ("analysis.cli", True),
    "compare": ("analysis.cli", True),
    "query": ("analysis.cli", True),
    "plot": ("analysis.cli", True),
    "depth": ("analysis.cli", True),
    "eval": ("analysis.cli", True),
    "lmeval": ("analysis.cli", True),
}


def usage() -> str:
    return __doc__.split("\n\n")[1] if __doc__ else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: looplaw {{{','.join(COMMANDS)}}} ...\n\n{usage()}", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: command: unknown {command!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, takes_command = COMMANDS[command]
    return importlib.import_module(module).main([command, *rest] if takes_command else rest)


if __name__ == "__main__":
    sys.exit(main())
