"""The ``lipmargin`` command line: the only place in the package that prints.

Every command is a function of parsed arguments returning an exit code; ``main(argv)`` is what the
console script and the tests call.  Expected failures (bad config, missing data, damaged
checkpoint, a run folder that would be overwritten, out of memory) print one line to stderr and
return 2; ``--debug`` shows the traceback instead.

Building the parser imports neither torch nor the heavy parts of lipmargin (each command imports
what it needs when it runs), so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

# Importing a command module registers its commands (in this order in --help); none imports torch.
from lipmargin.cli import train_cmd, certify_cmd, sweep_cmd, audit_cmd, export_cmd, listing  # noqa: F401
from lipmargin.cli.common import COMMANDS, EXIT_USAGE, err

__all__ = ["build_parser", "main", "entry"]


def build_parser() -> argparse.ArgumentParser:
    from lipmargin._version import __version__

    parser = argparse.ArgumentParser(prog="lipmargin", description="Certified L2-robust classifiers with CLL.")
    parser.add_argument("--version", action="version", version=f"lipmargin {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the cores no other process is busy on, from /proc; "
                             "OMP_NUM_THREADS, when set, is respected)")
    _output_args(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, configure, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        _output_args(sp, argparse.SUPPRESS)
        configure(sp)
    return parser


def _output_args(p: argparse.ArgumentParser, default: Any) -> None:
    """--quiet and --progress-every, before or after the command name (``default`` SUPPRESS on the
    sub-commands, so that they do not reset a value given before the command)."""
    p.add_argument("--quiet", action="store_true", default=False if default is None else default,
                   help="no progress output (train: no result table either)")
    p.add_argument("--progress-every", type=_seconds, default=30.0 if default is None else default, metavar="SECONDS",
                   help="when stderr is not a terminal, a progress line every SECONDS (default 30)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0; got {text}")
    return value


def _expected_errors() -> tuple[type[BaseException], ...]:
    from lipmargin.checkpoint import CheckpointError
    from lipmargin.config import ConfigError
    from lipmargin.data import DatasetError
    from lipmargin.train import RunExistsError
    from lipmargin.sweep import SweepError
    from lipmargin.train import TrainingError

    # ValueError: any other invalid argument met deeper in the library (its messages name the
    # argument); OSError: a folder that cannot be written, a full disk.
    return (ConfigError, DatasetError, CheckpointError, TrainingError, SweepError, RunExistsError, ValueError, OSError)


#: Per command, the knobs that lower memory use (named in the out-of-memory message).
_MEMORY_KNOBS = {
    "train": "a smaller --set train.batch_size=N (or --set eval.batch_size=N), or --set train.device=cpu",
    "sweep": "a smaller --set train.batch_size=N, fewer --jobs, or --set train.device=cpu",
    "certify": "--device cpu, or a smaller eval.batch_size in the run's config.yaml",
    "audit": "a smaller --n, --lobo-pairs, or --device cpu",
    "export": "a smaller --batch-size",
    "report": "a smaller eval.batch_size in the run's config.yaml",
}


def _out_of_memory(e: BaseException) -> bool:
    """torch.OutOfMemoryError (a RuntimeError), CPU allocator failures and MemoryError."""
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _memory_message(command: str, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(first) > 160:
        first = first[:157] + "..."
    knobs = _MEMORY_KNOBS.get(command, "a smaller batch size or another --device")
    return f"out of memory ({first}); try {knobs}"


def _set_threads(threads: int | None) -> str | None:
    """Set torch's CPU threads: ``--threads``, else OMP_NUM_THREADS when set (torch reads it itself),
    else :func:`lipmargin.threads.auto_threads`.  Returns an error message for a bad value."""
    import os

    if threads is not None and threads < 1:
        return f"--threads must be >= 1; got {threads}"
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        from lipmargin.threads import auto_threads

        threads = auto_threads()
    import torch

    torch.set_num_threads(threads)  # the CLI owns the process; the library never does this
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code (2: bad input,
    said in one line on stderr; with ``--debug`` the traceback instead).

    >>> main(["--version"])
    lipmargin 0.1.0
    0
    >>> main(["models", "--no-such-flag"])  # argparse's usage message goes to stderr
    2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its usage message
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    fn = COMMANDS[args.command][0]
    debug = bool(getattr(args, "debug", False))
    problem = _set_threads(args.threads)
    if problem:
        err(problem)
        return EXIT_USAGE
    try:
        return fn(args)
    except (MemoryError, RuntimeError) as e:
        if debug or not (_out_of_memory(e) or isinstance(e, _expected_errors())):
            raise
        err(_memory_message(args.command, e) if _out_of_memory(e) else _first_line(e))
        return EXIT_USAGE
    except (ValueError, OSError, ImportError) as e:  # bad input (the library's errors subclass ValueError), a missing extra
        if debug:
            raise
        err(_first_line(e))
        return EXIT_USAGE
    except _expected_errors() as e:
        if debug:
            raise
        err(_first_line(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        err("interrupted")
        return 130


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def entry() -> None:
    sys.exit(main())
