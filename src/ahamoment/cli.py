"""The `aha` console script: one subcommand per pipeline stage.

Every stage takes ``--recipe FILE.yaml`` plus one flag per config field; ``aha STAGE --help``
lists them with their documentation. Each stage also runs as ``python -m ahamoment.stages.X``.

A bad flag, recipe, data file or an I/O failure (disk full, read-only run directory) ends the
command with one ``error:`` line that says where and what, and a non-zero status (2 for bad
input, 1 for I/O), never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

from ahamoment import __version__, atomic
from ahamoment import config as cfglib

MAX_ERROR_CHARS = 600
"""An error line is cut here: a message quoting a huge value stays one readable line."""


@dataclass(frozen=True)
class Command:
    module: str
    """Module under ahamoment.stages holding the config class and the stage function."""
    config: str
    function: str
    summary: str


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        "pretrain",
        "PretrainConfig",
        "pretrain",
        "Build the embedded tiny base model: synthetic noisy-trace corpus, BPE tokenizer, Llama.",
    ),
    "zero": Command(
        "zero",
        "ZeroConfig",
        "zero",
        "R1-Zero: GRPO on a base model with rule-based rewards (correctness + format).",
    ),
    "r1": Command(
        "r1",
        "R1Config",
        "r1",
        "DeepSeek-R1's four stages (cold start, reasoning RL, rejection sampling + SFT, final RL) "
        "against R1-Zero.",
    ),
    "eval": Command(
        "eval",
        "EvalConfig",
        "evaluate_model",
        "Evaluate a model or an OpenAI-compatible endpoint: pass@1, cons@k, pass@k, greedy; "
        "budget forcing.",
    ),
    "serve": Command(
        "serve",
        "ServeConfig",
        "serve",
        "Serve a model on an OpenAI-compatible chat API (reasoning_content; visible or hidden).",
    ),
    "sft": Command(
        "sft",
        "SFTConfig",
        "sft",
        "Supervised fine-tuning on prompt/completion or chat JSONL; loss on completions only.",
    ),
    "distill-generate": Command(
        "distill",
        "DistillGenerateConfig",
        "distill_generate",
        "Verified reasoning traces from a teacher (local model or chat endpoint), resumable.",
    ),
    "distill": Command(
        "distill",
        "DistillConfig",
        "distill",
        "Distillation vs RL on a small student: SFT on teacher traces against GRPO.",
    ),
    "launch": Command(
        "launch",
        "LaunchConfig",
        "launch",
        "Asynchronous RL on one machine: rollout servers (`aha serve`) and the `aha zero` "
        "trainer, weights pushed after every step.",
    ),
    "report": Command(
        "report",
        "ReportConfig",
        "report",
        "Curves (overlaid across runs), the aha moment and samples as one self-contained HTML page.",
    ),
}


def load_stage(cmd: Command) -> tuple[type, Callable[..., Any]]:
    """The stage's config dataclass and its entry function."""
    import importlib

    module = importlib.import_module(f"ahamoment.stages.{cmd.module}")
    return getattr(module, cmd.config), getattr(module, cmd.function)


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line with a "did you mean" for a mistyped flag."""

    def error(self, message: str) -> NoReturn:
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hint = ""
        for typo in re.findall(r"(?<!\S)--[\w-]+", message):
            if typo not in flags and (close := difflib.get_close_matches(typo, flags, n=1)):
                hint = f"; did you mean {close[0]}?"
                break
        print(f"error: {self.prog}: command line: {message}{hint}", file=sys.stdout)
        raise SystemExit(2)


def _error(console: Console, message: str) -> None:
    """One ``error:`` line (never wrapped, never read as markup, never huge)."""
    line = " ".join(message.split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[:MAX_ERROR_CHARS] + " ..."
    console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)


def _parser(name: str, cmd: Command, config_cls: type) -> argparse.ArgumentParser:
    doc = (sys.modules[config_cls.__module__].__doc__ or "").strip()
    parser = _Parser(
        prog=f"aha {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every option is also a field of a --recipe YAML file (field_name: value); "
        "flags win over the recipe, the recipe over the defaults.",
    )
    parser.add_argument(
        "--recipe",
        metavar="FILE",
        help="YAML recipe (recipes/*.yaml); flags given here override it",
    )
    cfglib.add_arguments(parser, config_cls)
    if positional := getattr(config_cls, "positional", ""):  # e.g. `aha report RUN_DIR...`
        parser.add_argument(positional, nargs="*", default=argparse.SUPPRESS, metavar="RUN_DIR")
    return parser


def stage_config(name: str, argv: list[str] | None, **overrides: Any) -> Any:
    """The config ``aha NAME ARGV`` runs (``overrides`` on top of its flags); a bad flag exits
    with one line, a bad value raises ``cfglib.ConfigError``."""
    cmd = COMMANDS[name]
    config_cls, _ = load_stage(cmd)
    args = vars(_parser(name, cmd, config_cls).parse_args(argv))
    recipe = args.pop("recipe", None)
    return cfglib.build(config_cls, recipe, **(args | overrides))


def run_stage(name: str, argv: list[str] | None) -> int:
    _, fn = load_stage(COMMANDS[name])
    console = Console(stderr=False)
    try:
        cfg = stage_config(name, argv)
    except cfglib.ConfigError as e:
        _error(console, str(e))
        return 2
    try:
        result = fn(cfg, console=console)
    except (FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        _error(console, atomic.describe(e))
        return 2
    except ValueError as e:  # bad data (DataError names the file and the line) or settings
        _error(console, str(e))
        return 2
    except OSError as e:  # disk full, read-only or unwritable run directory, ...
        _error(console, atomic.describe(e))
        return 1
    except KeyboardInterrupt:
        console.print(
            f"[yellow]Interrupted.[/] Progress is saved: run the same `aha {name}` again to resume."
        )
        return 130
    if name == "pretrain":
        console.print(f"base model: {result}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _Parser(
        prog="aha",
        description="ahamoment: the DeepSeek-R1 recipe end to end, on a laptop or a cluster.",
        epilog="Run `aha COMMAND --help` for a command's options.",
    )
    top.add_argument("--version", action="version", version=f"ahamoment {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=cmd.summary, add_help=False)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        top.parse_args(argv or ["--help"])
        return 0
    if len(argv) > 1 and f"{argv[0]}-{argv[1]}" in COMMANDS:  # `aha distill generate`
        argv = [f"{argv[0]}-{argv[1]}", *argv[2:]]
    if argv[0] not in COMMANDS:
        top.parse_args(argv[:1])  # prints the usage error with the choices
        return 2
    return run_stage(argv[0], argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
