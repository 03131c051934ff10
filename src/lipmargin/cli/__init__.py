"""The ``lipmargin`` command line: the only place in the package that prints.

``main(argv) -> int`` is what the console script (``lipmargin.cli:entry``) and the tests call.
Building the parser imports neither torch nor the heavy parts of lipmargin, so ``--help`` and
argument errors answer at once; each command imports what it needs when it runs.

Modules: :mod:`~lipmargin.cli.main` (build_parser, main, entry, error handling and exit codes,
threads), :mod:`~lipmargin.cli.common` (the command registry, one-line errors, shared arguments),
:mod:`~lipmargin.cli.targets` (a run folder or ``--model FILE.py:FACTORY`` to certify, ``--eps``),
one module per command group: :mod:`~lipmargin.cli.train_cmd`, :mod:`~lipmargin.cli.certify_cmd`,
:mod:`~lipmargin.cli.sweep_cmd` (sweep, report), :mod:`~lipmargin.cli.audit_cmd`,
:mod:`~lipmargin.cli.export_cmd`, :mod:`~lipmargin.cli.listing` (presets, models, datasets);
:mod:`~lipmargin.cli.progress` (progress lines on stderr), :mod:`~lipmargin.cli.user_model`
(loading ``--model`` / ``--weights``).
"""

from __future__ import annotations

from lipmargin.cli.common import COMMANDS, EXIT_USAGE
from lipmargin.cli.main import build_parser, entry, main

__all__ = ["COMMANDS", "EXIT_USAGE", "build_parser", "entry", "main"]
