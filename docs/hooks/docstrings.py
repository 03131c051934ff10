"""Griffe extension for the API pages: lipmargin's docstrings are prose with reStructuredText
touches, shown here as Markdown.

- a bare doctest block (lines from ``>>>`` to the next blank line) becomes a ``pycon`` code block
  (Markdown would read ``>>>`` as nested quotes);
- an indented literal block introduced by ``::`` becomes a ``python`` code block;
- Sphinx roles (``:func:`x```, ``:class:`~a.b```, ...) become inline code.

Only the rendered page changes; the docstrings (and the doctests run by pytest) stay as written.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|const|ref|term):`~?([^`]+)`")


def _fence(lines: list[str], start: int, language: str, indent: str) -> tuple[list[str], int]:
    """The block of ``lines`` from ``start`` to the next blank line (doctest) as a fenced block."""
    out = [f"{indent}```{language}"]
    i = start
    while i < len(lines) and lines[i].strip():
        out.append(lines[i])
        i += 1
    out.append(f"{indent}```")
    return out, i


def _literal(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """An rST literal block: the lines after ``::`` indented deeper than ``base`` (blank lines inside)."""
    block: list[str] = []
    i = start
    while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > base):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
        i -= 1
    body = [line for line in block]
    cut = min((len(line) - len(line.lstrip()) for line in body if line.strip()), default=0)
    pad = " " * base
    return [f"{pad}```python", *(pad + line[cut:] if line.strip() else "" for line in body), f"{pad}```"], i


def to_markdown(text: str) -> str:
    """``text`` (a docstring) with doctests and literal blocks fenced and Sphinx roles as code."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith("```"):
            in_fence = not in_fence
            out.append(line)
            i += 1
        elif in_fence:
            out.append(line)
            i += 1
        elif stripped.startswith(">>>"):
            if out and out[-1].strip():
                out.append("")
            block, i = _fence(lines, i, "pycon", line[: len(line) - len(stripped)])
            out += block
        elif line.rstrip().endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            base = len(line) - len(stripped)
            head = line.rstrip()[:-1]  # "Loading it::" -> "Loading it:"
            out += [_ROLE.sub(r"`\1`", head), ""]
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and len(lines[j]) - len(lines[j].lstrip()) > base:
                block, i = _literal(lines, j, base)
                out += block
            else:
                i += 1
        else:
            out.append(_ROLE.sub(r"`\1`", line))
            i += 1
    return "\n".join(out)


class ProseDocstrings(griffe.Extension):
    """Rewrites every loaded object's docstring with :func:`to_markdown` before it is parsed."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
