"""`looplaw COMMAND`: the console entry point pyproject installs dispatches to each module's own main."""
import json
import tomllib
from pathlib import Path

import pytest

from tuning import cli

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_installs_the_looplaw_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["looplaw"].partition(":")
    assert (module, func) == ("tuning.cli", "main") and callable(getattr(cli, func))
    assert set(cli.COMMANDS) >= {"sweep", "run", "prepare", "plan", "fit", "compare", "query", "plot"}


def test_analysis_commands_pass_through(capsys):
    assert cli.main(["query", "reference", "effective", "--n-once", "4.27e8", "--n-rec", "4e8", "--r", "4", "--json"]) == 0
    value = json.loads(capsys.readouterr().out)["value"]
    assert value / (4.27e8 + 4e8) == pytest.approx(1.43, abs=0.01)  # the README's reference number


@pytest.mark.parametrize("command, flag", [("sweep", "--config"), ("run", "--config"), ("prepare", "--input"),
                                           ("fit", "--bootstrap"), ("plot", "--law"), ("plan", "--simulate"),
                                           ("compare", "--variant")])
def test_each_command_is_its_modules_own_parser(command, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0 and flag in capsys.readouterr().out


def test_bad_input_is_refused_before_anything_starts(tmp_path, capsys):
    assert cli.main([]) == 2 and "usage: looplaw" in capsys.readouterr().err
    assert cli.main(["train"]) == 2 and "command: unknown 'train'" in capsys.readouterr().err
    assert cli.main(["sweep", "--config", str(tmp_path / "missing.yaml")]) == 2  # spec validated before Ray
    assert "missing.yaml" in capsys.readouterr().err
