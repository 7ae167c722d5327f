"""python -m pytest tests/unit/test_cli.py  (python -m train <command>: the operator commands in one place; fast)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.__main__ import COMMANDS

REPO = Path(__file__).resolve().parents[2]


def python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def run(*args: str) -> subprocess.CompletedProcess:
    """python -m ARGS..."""
    return python("-m", *args)


@pytest.mark.parametrize("args", [[], ["--help"]])
def test_help_lists_every_command_with_a_description(args):
    result = run("train", *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in COMMANDS:
        line = next((line for line in lines if line.strip().startswith(name + " ")), None)
        assert line is not None and len(line.split()) > len(name.split()), f"{name!r} missing from:\n{result.stdout}"


def test_every_command_names_a_module_that_runs_as_python_dash_m():
    for name, (module, _) in COMMANDS.items():
        path = REPO / Path(*module.split("."))
        if (path / "__main__.py").is_file():
            continue  # a package with its own __main__.py
        assert 'if __name__ == "__main__":' in path.with_suffix(".py").read_text(), (name, module)


def test_help_does_not_import_torch():
    code = "import sys; from train.__main__ import main; main([]); print('torch' in sys.modules)"
    result = python("-c", code)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout + result.stderr


@pytest.mark.parametrize("args", [["frobnicate"], ["launch", "frobnicate"]])
def test_an_unknown_command_is_one_line_naming_it_and_exit_2(args):
    result = run("train", *args, "--x")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and repr(" ".join(args)) in lines[0], result.stderr


def test_a_command_gets_its_arguments_unchanged():
    direct, dispatched = run("train.models", "list", "--seq-len", "128"), run("train", "models", "list", "--seq-len", "128")
    assert direct.returncode == dispatched.returncode == 0, dispatched.stderr
    assert dispatched.stdout == direct.stdout and "tiny-qwen3" in direct.stdout


def test_a_command_keeps_its_exit_status_and_error():
    direct, dispatched = run("train.models", "info", "no-such-model"), run("train", "models", "info", "no-such-model")
    assert dispatched.returncode == direct.returncode == 2
    assert dispatched.stderr == direct.stderr and dispatched.stdout == direct.stdout


def test_a_two_word_command_dispatches_to_its_module():
    direct, dispatched = run("train.launch.conf"), run("train", "launch", "conf")
    assert direct.returncode == dispatched.returncode == 0, dispatched.stderr
    assert dispatched.stdout == direct.stdout and dispatched.stdout
