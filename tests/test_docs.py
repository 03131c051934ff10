"""The documentation site builds with no warnings (`mkdocs build --strict`), and its generated
pages hold what they are generated from: every sub-command's help, the sub-packages' API."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name.split(".")[0]) is None
            or importlib.util.find_spec(name) is None]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _missing()
    if missing:
        pytest.skip(f"the docs need mkdocs, mkdocs-material, mkdocstrings and mkdocstrings-python; missing: {', '.join(missing)}")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def test_cli_reference_is_the_parsers_help(site: Path) -> None:
    from lipmargin.cli import build_parser

    page = (site / "reference" / "cli" / "index.html").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert len(commands) >= 5
    for name, sub in commands.items():
        assert f"usage: lipmargin {name}" in page, name
        for action in sub._actions:  # every option of every command is on the page
            for flag in action.option_strings:
                assert flag in page, f"{name} {flag}"


@pytest.mark.parametrize("package, name", [("certify", "certify"), ("losses", "cll_loss"), ("data", "load_dataset")])
def test_api_pages_render_the_package_exports(site: Path, package: str, name: str) -> None:
    page = (site / "reference" / package / "index.html").read_text()
    assert f'id="lipmargin.{package}.{name}"' in page


def test_doctest_blocks_become_code_blocks() -> None:
    spec = importlib.util.spec_from_file_location("docs_hook_docstrings", ROOT / "docs" / "hooks" / "docstrings.py")
    if importlib.util.find_spec("griffe") is None:
        pytest.skip("griffe (from mkdocstrings-python) is not installed")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Radius of :func:`~lipmargin.certify.certify`.\n\n>>> 1 + 1\n2\n\nLoading it::\n\n    m = load()\n    m(x)\n\nEnd."
    assert module.to_markdown(text).split("\n") == [
        "Radius of `lipmargin.certify.certify`.", "",
        "```pycon", ">>> 1 + 1", "2", "```", "",
        "Loading it:", "",
        "```python", "m = load()", "m(x)", "```", "",
        "End.",
    ]
