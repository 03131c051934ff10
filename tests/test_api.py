"""The public API: every exported name resolves, and importing the package is silent."""

from __future__ import annotations

import subprocess
import sys

import lipmargin


def test_every_name_in_all_resolves() -> None:
    assert len(lipmargin.__all__) == len(set(lipmargin.__all__)), "duplicate names in __all__"
    for name in lipmargin.__all__:
        assert getattr(lipmargin, name, None) is not None, f"lipmargin.{name} is in __all__ but does not resolve"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict = {}
    exec("from lipmargin import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(lipmargin.__all__)


def test_version() -> None:
    parts = lipmargin.__version__.split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts[:2])


def test_import_prints_nothing_and_installs_no_handlers() -> None:
    code = (
        "import logging, warnings\n"
        "warnings.simplefilter('error')\n"
        "import lipmargin, lipmargin.cli\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
        "assert logging.getLogger('lipmargin').handlers == []\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ""


def test_module_entry_point_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "lipmargin", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"lipmargin {lipmargin.__version__}"
