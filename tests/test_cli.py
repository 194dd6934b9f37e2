"""The `aha` command table stays in sync with the stage modules."""

import dataclasses
import importlib
import subprocess
import sys

import pytest

from ahamoment import cli
from ahamoment import config as cfglib


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_command_table_matches_stage_modules(name):
    cmd = cli.COMMANDS[name]
    module = importlib.import_module(f"ahamoment.stages.{cmd.module}")
    assert dataclasses.is_dataclass(getattr(module, cmd.config))
    assert callable(getattr(module, cmd.function))
    assert callable(module.main)  # python -m ahamoment.stages.X


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_help_lists_every_field_with_its_doc(name, capsys):
    config_cls, _ = cli.load_stage(cli.COMMANDS[name])
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(config_cls):
        assert "--" + f.name.replace("_", "-") in out
        first_words = " ".join(cfglib.field_docs(config_cls)[f.name].split()[:3])
        assert first_words in out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_bad_flag_value_is_a_clear_error(capsys):
    assert cli.main(["zero", "--group-size", "1"]) == 2
    assert "group_size" in capsys.readouterr().out


def test_module_entry_point_runs():
    res = subprocess.run(
        [sys.executable, "-m", "ahamoment.stages.zero", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "--prompts-per-step" in res.stdout


def test_two_word_command_is_the_hyphenated_one(capsys):
    # `aha distill generate --help` is `aha distill-generate --help`
    with pytest.raises(SystemExit) as e:
        cli.main(["distill", "generate", "--help"])
    assert e.value.code == 0
    assert "--teacher" in capsys.readouterr().out


def test_launch_reads_its_trainer_flags_as_aha_zero_does(capsys):
    from ahamoment.stages.launch import LaunchConfig, trainer_config

    cfg = trainer_config(LaunchConfig(zero_args="--steps 7 --recipe recipes/zero-countdown.yaml"))
    assert (cfg.steps, cfg.group_size) == (7, 8)  # the flag over the recipe
    with pytest.raises(SystemExit) as e:  # a typo stops before any server starts
        trainer_config(LaunchConfig(zero_args="--stepz 7"))
    assert e.value.code == 2 and "did you mean --steps" in capsys.readouterr().out
