"""What people expect of an installed package: metadata, extras, --version, helpful --help."""

from __future__ import annotations

import argparse
import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest

import simclr_kit
from simclr_kit.cli.parser import build_parser
from simclr_kit.cli import main

# Flags whose absence has no single default to state: the dataset (required by some commands,
# recorded in the run for others) and the run to resume.
NO_DEFAULT = {"--data", "--resume"}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_and_metadata(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"simclr-kit {simclr_kit.__version__}"
    meta = metadata.metadata("simclr-kit")
    assert meta["Version"] == simclr_kit.__version__
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"dev", "tensorboard", "wandb"} <= extras
    requires = " ".join(meta.get_all("Requires-Dist") or [])
    assert "matplotlib" in requires  # plots are part of every report: a core dependency


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_states_its_default(name):
    missing = []
    for action in subcommands()[name]._actions:
        if (not action.option_strings or action.required or action.nargs == 0
                or action.help == argparse.SUPPRESS or set(action.option_strings) & NO_DEFAULT):
            continue
        if "default" not in (action.help or "").lower():
            missing.append(action.option_strings[0])
    assert not missing, f"simclr {name}: --help gives no default for {missing}"


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """Every ``simclr ...`` command in the README's code blocks, continuation lines joined."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks
             for line in block.replace("\\\n", " ").splitlines()]
    return [line.removeprefix("$ ") for line in lines if line.startswith(("simclr ", "$ simclr "))]


def test_readme_commands_use_what_a_user_has_and_parse():
    """The examples name a hub dataset or the user's own folders (a clone has no ../shared),
    and each one parses with today's flags."""
    commands = readme_commands()
    assert len(commands) >= 15
    assert [c for c in commands if "../shared" in c] == []
    parser = build_parser()
    for command in commands:
        words = shlex.split(command)[1:]
        words = words[:next((i for i, w in enumerate(words) if w in (">", "|", "&&")),
                            len(words))]  # the shell's part of the line
        args, extra = parser.parse_known_args(words)
        assert extra == [], command


def test_the_readme_table_script_runs_the_readmes_commands():
    """bench/mini_table.py regenerates the README's cifar10-mini table: it must run the very
    commands the README shows above it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mini_table", README.parent / "bench" / "mini_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shown = [shlex.split(c) for c in readme_commands() if "runs/mini" in c]
    assert shown == [["simclr", *(w.format(data="cifar10-mini/") for w in command)]
                     for command in (script.PRETRAIN, script.EVALUATE)]
