"""What every command module shares: the command registry, exit codes, one-line errors, progress
and the arguments several commands take.  Imports neither torch nor the heavy parts of lipmargin."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["COMMANDS", "EXIT_USAGE", "command", "err", "make_progress", "no_args",
           "config_args", "checkpoint_arg", "checkpoint_text"]

EXIT_USAGE = 2

CommandFn = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]
COMMANDS: dict[str, tuple[CommandFn, Configure, str]] = {}


def command(name: str, help_text: str, configure: Configure) -> Callable[[CommandFn], CommandFn]:
    """Register a sub-command: ``configure(parser)`` adds its arguments, the function runs it."""

    def decorator(fn: CommandFn) -> CommandFn:
        COMMANDS[name] = (fn, configure, help_text)
        return fn

    return decorator


def no_args(p: argparse.ArgumentParser) -> None:
    return None


def err(message: str) -> None:
    print(f"lipmargin: error: {message}", file=sys.stderr)


def make_progress(args: argparse.Namespace, enabled: bool = True) -> Any:
    """The progress display for a command: silent with --quiet, a line every --progress-every
    seconds when stderr is not a terminal."""
    from lipmargin.cli.progress import Progress

    return Progress(sys.stderr, enabled=enabled and not args.quiet, every=args.progress_every)


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (applied on top of --preset)")
    p.add_argument("--preset", help="named preset (see `lipmargin presets`); default digits-cll")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set loss.eps=0.5 (repeatable)")


def checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="NAME|PATH",
                   help="use this checkpoint instead of the newest: a name in the run's checkpoints/ "
                        "(epoch-000001) or a path to a checkpoint's .json / .safetensors file")


def checkpoint_text(ref: Any) -> str:
    return f"checkpoint {ref.path} (epoch {ref.epoch}, sha256 {ref.sha256})"
