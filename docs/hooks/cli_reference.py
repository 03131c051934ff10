"""MkDocs hook: render the command-line reference from ``lipmargin.cli.build_parser`` at build time.

A page holding the line ``<!-- lipmargin-cli-reference -->`` gets, in its place, the help of
``lipmargin`` and of every sub-command, exactly as ``lipmargin COMMAND --help`` prints it (no
hand-written copy to go stale).  The parser is imported from this checkout's ``src/`` (building
the parser does not import torch).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- lipmargin-cli-reference -->"
WIDTH = "100"  # argparse wraps help at $COLUMNS: fixed, so the page does not depend on the terminal
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Python >= 3.14 may colour help text on a terminal


def _import_build_parser(config: Any) -> Any:
    src = str(Path(config["config_file_path"]).resolve().parent / "src")
    if src not in sys.path:
        sys.path.insert(0, src)  # document this checkout, not another installed lipmargin
    from lipmargin.cli import build_parser

    return build_parser


def _help(parser: argparse.ArgumentParser) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        return _ANSI.sub("", parser.format_help()).rstrip()
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public accessor for sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render(build_parser: Any) -> str:
    """Markdown for the whole CLI: the top-level help, then one section per sub-command."""
    parser = build_parser()
    parts = [
        "## lipmargin",
        "",
        "Options before the command name (`--threads`, `--debug`, `--quiet`, `--progress-every`) apply to every command.",
        "",
        "```text",
        _help(parser),
        "```",
    ]
    for name, sub in _subcommands(parser).items():
        parts += ["", f"## lipmargin {name}", "", "```text", _help(sub), "```"]
    return "\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render(_import_build_parser(config)))
