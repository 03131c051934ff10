"""The Markdown report of a sweep folder (``results.json`` written by ``lipmargin sweep``), and
:func:`write_report`, which picks the run or the sweep report from what a folder holds."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lipmargin.report import plots
from lipmargin.report._common import REPORT_NAME, _fmt, _link, _md_cell, _read_json, _require_matplotlib, _save
from lipmargin.report.run import _write_run_report, write_run_report

__all__ = ["write_report", "write_sweep_report"]


def _pm(stat: Mapping[str, Any] | None, fmt: str) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    mean = float(stat["mean"])
    std = stat.get("std")
    if std is None or not math.isfinite(float(std)):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(float(std), fmt)}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def _cell_title(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) or "(no parameters)"


def _check_results(results: Any, path: Path) -> None:
    if not isinstance(results, Mapping):
        raise ValueError(f"{path}: expected a JSON object with grid, seeds and cells")
    for key in ("grid", "cells"):
        if key not in results:
            raise ValueError(f"{path}: missing key {key!r}; a sweep's results.json has grid, seeds, eval_eps and cells")
    for i, cell in enumerate(results["cells"]):
        for key in ("params", "runs"):
            if key not in cell:
                raise ValueError(f"{path}: cell {i} has no {key!r}")


def write_sweep_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *, checkpoint: str | None = None) -> Path:
    """Write ``report.md`` for a sweep folder: the results table, one ``sweep_<param>.png`` per
    swept parameter, and a section per cell linking the figures of each of its runs.

    Each run gets its own run report (:func:`write_run_report`), in the run folder or, with
    ``out_dir``, under ``out_dir`` at the run's relative path.  Returns the path of ``report.md``.
    """
    from lipmargin.certify import radius_text

    sweep = Path(sweep_dir)
    results_path = sweep / "results.json"
    if not results_path.is_file():
        raise ValueError(f"{sweep} is not a sweep folder: expected results.json written by lipmargin sweep")
    results = _read_json(results_path)
    _check_results(results, results_path)
    _require_matplotlib()
    out = Path(out_dir) if out_dir is not None else sweep
    out.mkdir(parents=True, exist_ok=True)
    cells: list[Mapping[str, Any]] = results["cells"]
    grid: Mapping[str, Sequence[Any]] = results["grid"]
    params = list(grid)
    eps_keys = [str(e) for e in results.get("eval_eps", [])] or sorted(
        {e for c in cells for e in c.get("certified_accuracy", {})}, key=float
    )

    lines = [f"# Sweep report: {sweep.resolve().name}", ""]
    grid_text = "; ".join(f"`{k}` ∈ {{{', '.join(_fmt(v) for v in vals)}}}" for k, vals in grid.items())
    lines += [f"Grid: {grid_text or '(none)'}. Seeds: {', '.join(map(str, results.get('seeds', []))) or '?'}.", ""]
    lines += ["## Results (mean ± std over seeds)", ""]
    header = [*params, "n", "clean accuracy", *(f"certified @ ε={radius_text(float(e))}" for e in eps_keys), "Lipschitz"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in cells:
        row = [_fmt(cell["params"].get(p, "")) for p in params]
        row += [str(cell.get("n", len(cell["runs"]))), _pm(cell.get("clean_accuracy"), ".4f")]
        row += [_pm(cell.get("certified_accuracy", {}).get(e), ".4f") for e in eps_keys]
        row += [_pm(cell.get("lipschitz"), ".4g")]
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    lines.append("")

    figures = []
    for p in params:
        # A curve needs at least two values of the parameter to say anything.
        if len({str(c["params"].get(p)) for c in cells}) < 2:
            continue
        file = f"sweep_{_safe_name(p)}.png"
        _save(plots.sweep_curves(cells, p), out / file)
        figures.append((file, p))
    if figures:
        lines += ["## Figures", ""]
        for file, p in figures:
            lines += [f"![accuracy and Lipschitz constant vs {p}]({_link(out / file, out)})", ""]

    lines += ["## Cells", ""]
    for cell in cells:
        lines += [f"### {_cell_title(cell['params'])}", ""]
        first_regions: Path | None = None
        for rel in cell["runs"]:
            run = sweep / rel
            if not (run / "summary.json").is_file():
                lines.append(f"- `{rel}`: no summary.json (the run did not finish); no report")
                continue
            run_out = run if out_dir is None else out / rel
            report = _write_run_report(run, run_out, checkpoint)
            links = [f"[report]({_link(report.path, out)})"]
            links += [f"[{caption.split(';')[0].lower()}]({_link(run_out / f, out)})" for f, caption in report.figures]
            lines.append(f"- `{rel}`: " + " · ".join(links))
            if first_regions is None and any(f == "decision_regions.png" for f, _ in report.figures):
                first_regions = run_out / "decision_regions.png"
        lines.append("")
        if first_regions is not None:
            lines += [f"![decision regions, {_cell_title(cell['params'])}]({_link(first_regions, out)})", ""]

    path = out / REPORT_NAME
    path.write_text("\n".join(lines))
    return path


def write_report(path: str | Path, out_dir: str | Path | None = None, *, checkpoint: str | Path | None = None) -> Path:
    """Write the report of a sweep folder (``results.json``) or a run folder (``summary.json``)."""
    folder = Path(path)
    if (folder / "results.json").is_file():
        return write_sweep_report(folder, out_dir, checkpoint=None if checkpoint is None else str(checkpoint))
    if (folder / "summary.json").is_file():
        return write_run_report(folder, out_dir, checkpoint=checkpoint)
    raise ValueError(
        f"{folder} is neither a run folder (summary.json from lipmargin train) nor a sweep folder "
        f"(results.json from lipmargin sweep)"
    )
