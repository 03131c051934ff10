"""Markdown reports with figures for a run folder or a sweep folder.

``write_report(path)`` looks at what the folder holds: ``summary.json`` (a run written by
:func:`lipmargin.train.fit`) or ``results.json`` (a sweep written by ``lipmargin sweep``).  It
saves PNGs drawn by :mod:`lipmargin.report.plots` next to a ``report.md`` and returns that file's path;
nothing is printed.  matplotlib (the ``[plot]`` extra) is needed only when a report is written.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
import torch
import yaml
from torch import Tensor

from lipmargin.report import plots

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Certificates", "load_certificates", "read_certificates", "write_report", "write_run_report", "write_sweep_report"]

REPORT_NAME = "report.md"
_DPI = 130


@dataclass
class _RunReport:
    path: Path
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)


@dataclass(frozen=True)
class Certificates:
    """Per-sample results of a run's final evaluation (``certificates.csv``)."""

    target: np.ndarray  # (N,) int64
    prediction: np.ndarray  # (N,) int64
    radius: np.ndarray  # (N,) float64, may hold inf
    source: str  # where the numbers came from, for the report

    @property
    def correct(self) -> np.ndarray:
        return self.prediction == self.target


# --------------------------------------------------------------------------------------------
# Reading a run folder
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill; fit rewrites the file on resume the same way
        if isinstance(rec, dict) and "epoch" in rec:
            records.append(rec)
    return records


def read_certificates(path: str | Path) -> Certificates:
    """Read ``certificates.csv`` (``index,target,prediction,radius``; ``inf`` allowed)."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        expected = {"target", "prediction", "radius"}
        if reader.fieldnames is None or not expected <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns index,target,prediction,radius; got {reader.fieldnames}")
        rows = [(int(r["target"]), int(r["prediction"]), float(r["radius"])) for r in reader]
    arr = np.array(rows, dtype=np.float64).reshape(-1, 3)  # (N, 3)
    return Certificates(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2], path.name)


def load_certificates(run_dir: str | Path, *, checkpoint: str | Path | None = None) -> Certificates:
    """The per-sample radii of a run's final evaluation.

    Read from ``certificates.csv``; for a run folder without it, the final evaluation is run again
    from the newest checkpoint (or ``checkpoint``, see :func:`lipmargin.train.open_run`) with the
    run's bound method (``summary.json``'s ``bound_method``).
    Raises :class:`~lipmargin.checkpoint.CheckpointError` when neither is there.
    """
    run = Path(run_dir)
    if (run / "certificates.csv").is_file() and checkpoint is None:
        return read_certificates(run / "certificates.csv")
    method = str(_read_json(run / "summary.json").get("bound_method", "sound")) if (run / "summary.json").is_file() else "sound"
    return _recompute(run, method, [], checkpoint)[0]


def _recompute(
    run: Path, method: str, eps: Sequence[float], checkpoint: str | Path | None
) -> tuple[Certificates, dict[str, Any]]:
    """Evaluate a checkpoint of ``run`` again: its certificates and its metrics (as in summary.json)."""
    from lipmargin.train import evaluate, load_run_data, metrics_record, open_run

    loaded = open_run(run, checkpoint=checkpoint)
    data = load_run_data(loaded.config)
    result = evaluate(loaded.model, data.eval, list(eps), method=method, batch_size=loaded.config.eval.batch_size)
    certs = Certificates(
        result.target.numpy().astype(np.int64),
        result.prediction.numpy().astype(np.int64),
        result.radius.numpy().astype(np.float64),
        f"recomputed from the {loaded.checkpoint.name} checkpoint with the {method} bound",
    )
    return certs, {**metrics_record(result), "eval_split": data.eval_split}


def _eval_eps(summary: Mapping[str, Any]) -> list[float]:
    return sorted(float(k) for k in summary.get("certified_accuracy", {}))


# --------------------------------------------------------------------------------------------
# Run report
# --------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=_DPI)


def _decision_regions_figure(run: Path, eps: float, checkpoint: str | Path | None = None) -> Figure | str:
    """The decision-regions figure of a 2-D run, or why there is none (a sentence)."""
    from lipmargin.certify import certified_radius, model_bound
    from lipmargin.checkpoint import CheckpointError
    from lipmargin.data import load_dataset
    from lipmargin.train import load_run

    try:
        cfg, model, _ = load_run(run, checkpoint=checkpoint)
    except CheckpointError as e:
        return f"decision regions not drawn: {e}"
    if model.in_shape != (2,):
        return ""  # not 2-D data: the figure does not apply
    # The band must be one the model is guaranteed to respect, so it uses the sound bound even
    # when the run's metrics used the power-iteration estimate.
    bound = model_bound(model, "sound")
    m64 = copy.deepcopy(model).to(torch.float64).eval()

    @torch.no_grad()
    def predict(grid: Tensor) -> tuple[Tensor, Tensor]:
        logits = m64(grid.to(torch.float64))  # (N, C)
        radius, prediction = certified_radius(logits, bound.pairwise)
        return prediction, radius

    train = load_dataset(cfg.data.name, cfg.data.root, "train")
    return plots.decision_regions(predict, train.inputs, train.labels, eps)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _link(target: Path, base: Path) -> str:
    """A Markdown link target for ``target`` relative to the folder ``base`` (URL-quoted)."""
    rel = Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()
    return quote(rel, safe="/=.-_~")


def _require_matplotlib() -> None:
    # Checked before any work, so a missing extra fails at once, not after a recomputation.
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("lipmargin reports need matplotlib: pip install matplotlib (or pip install -e '.[plot]' in a lipmargin checkout)") from None


def _config_table(cfg: Mapping[str, Any]) -> list[str]:
    lines = ["| section | settings |", "|---|---|"]
    for section, values in cfg.items():
        if not isinstance(values, Mapping):
            continue  # the description, shown above the table
        settings = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        lines.append(f"| {section} | {_md_cell(settings)} |")
    return lines


def _metrics_table(summary: Mapping[str, Any], certs: Certificates | None) -> list[str]:
    method = summary.get("bound_method", "?")
    # Principle 2: say whether the Lipschitz numbers (hence the certificates) are guaranteed.
    kind = "guaranteed upper bound" if method == "sound" else "estimate, not a guaranteed bound"
    rows = [("clean accuracy", f"{summary['clean_accuracy']:.4f}")]
    for key in sorted(summary.get("certified_accuracy", {}), key=float):
        rows.append((f"certified accuracy @ ε={key}", f"{summary['certified_accuracy'][key]:.4f}"))
    if "lipschitz" in summary:
        rows.append((f"Lipschitz K·max‖Wᵢ−Wⱼ‖ ({method}: {kind})", f"{summary['lipschitz']:.6g}"))
    if "lipschitz_features" in summary:
        rows.append((f"Lipschitz of the features K ({method})", f"{summary['lipschitz_features']:.6g}"))
    if certs is not None:
        hits = certs.radius[certs.correct]
        if hits.size:
            rows.append(("median certified radius of correct samples", f"{float(np.median(hits)):.4g}"))
    rows.append(("evaluated on", f"{summary.get('num_samples', '?')} {summary.get('eval_split', '')} samples".strip()))
    for key, name in (("epochs", "epochs"), ("num_parameters", "parameters"), ("seed", "seed")):
        if key in summary:
            rows.append((name, f"{summary[key]:,}" if isinstance(summary[key], int) else str(summary[key])))
    if "train_seconds" in summary:
        rows.append(("training time", f"{float(summary['train_seconds']):.1f} s"))
    return ["| metric | value |", "|---|---|", *(f"| {_md_cell(a)} | {_md_cell(b)} |" for a, b in rows)]


def _checkpoint_of(run: Path, checkpoint: str | Path | None) -> Any:
    """The :class:`~lipmargin.checkpoint.CheckpointRef` the report is about; ``None`` for a run folder
    without checkpoints.  A damaged newest checkpoint raises (no fallback to an older one)."""
    from lipmargin.checkpoint import resolve_checkpoint

    folder = run / "checkpoints"
    if checkpoint is None and not (folder.is_dir() and any(folder.glob("epoch-*"))):
        return None
    return resolve_checkpoint(folder, checkpoint).ref


def _write_run_report(run_dir: str | Path, out_dir: str | Path | None = None, checkpoint: str | Path | None = None) -> _RunReport:
    run = Path(run_dir)
    if not (run / "summary.json").is_file():
        raise ValueError(f"{run} is not a run folder: expected summary.json written by lipmargin train")
    _require_matplotlib()
    ref = _checkpoint_of(run, checkpoint)
    out = Path(out_dir) if out_dir is not None else run
    out.mkdir(parents=True, exist_ok=True)
    summary = _read_json(run / "summary.json")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    records = _read_metrics(run / "metrics.jsonl")
    eps = _eval_eps(summary)
    notes: list[str] = []

    from lipmargin.checkpoint import CheckpointError

    certs: Certificates | None = None
    recorded = summary.get("checkpoint") if isinstance(summary.get("checkpoint"), Mapping) else None
    other = recorded is not None and recorded.get("sha256") != getattr(ref, "sha256", None)
    if ref is not None and (other or (recorded is None and checkpoint is not None)):
        # summary.json and certificates.csv belong to other (or unnamed) weights: evaluate these again.
        method = str(summary.get("bound_method", "sound"))
        certs, metrics = _recompute(run, method, eps, ref.path)
        described = f"{recorded.get('path', '?')} (epoch {recorded.get('epoch', '?')})" if recorded else "no checkpoint"
        notes.append(
            f"The metrics and radii are those of {ref.name}, recomputed with the {method} bound; summary.json "
            f"names {described}."
        )
        summary = {**summary, **metrics}
    else:
        if ref is None:
            notes.append("The run folder holds no checkpoint: the numbers cannot be traced to weights.")
        elif recorded is None:
            notes.append("summary.json does not name the checkpoint its metrics belong to (written by an older lipmargin).")
        try:
            certs = load_certificates(run)
        except CheckpointError as e:
            notes.append(f"No certificates.csv and no usable checkpoint, so no radius figures: {e}")

    report = _RunReport(out / REPORT_NAME)
    if certs is not None:
        _save(plots.certified_accuracy_curve(certs.radius, certs.correct, eps), out / "certified_accuracy.png")
        report.figures.append(("certified_accuracy.png", "Certified accuracy vs ε"))
        _save(plots.radius_histogram(certs.radius, certs.correct, eps), out / "radius_histogram.png")
        report.figures.append(("radius_histogram.png", "Certified radii of the correct samples"))
    if records:
        _save(plots.training_curves(records), out / "training_curves.png")
        report.figures.append(("training_curves.png", "Training curves"))
    else:
        notes.append("metrics.jsonl is missing or empty: no training curves.")
    band_eps = eps[0] if eps else float(cfg.get("loss", {}).get("eps", 0.0))  # the strictest evaluated radius
    regions = _decision_regions_figure(run, band_eps, ref.path if ref is not None else None)
    if isinstance(regions, str):
        if regions:
            notes.append(regions)
    else:
        _save(regions, out / "decision_regions.png")
        report.figures.append(
            ("decision_regions.png", f"Decision regions; grey band: sound certified radius ≤ ε = {band_eps:g}")
        )

    name = run.resolve().name
    lines = [f"# Run report: {name}", ""]
    if cfg.get("description"):
        lines += [str(cfg["description"]), ""]
    lines += [
        f"Run folder: `{run}`. Model `{summary.get('model', '?')}`, loss `{summary.get('loss', '?')}`, "
        f"dataset `{summary.get('dataset', '?')}`.",
        "",
    ]
    if ref is not None:
        lines += [
            f"Weights: `{_md_cell(ref.to_dict(relative_to=run)['path'])}` (epoch {ref.epoch}), SHA-256 "
            f"`{ref.sha256}` (of that file's bytes; `sha256sum` prints the same).",
            "",
        ]
    lines += [
        "## Configuration",
        "",
        *_config_table(cfg),
        "",
        "## Final metrics",
        "",
        *_metrics_table(summary, certs),
        "",
    ]
    if certs is not None:
        lines += [f"Per-sample radii: {certs.source}.", ""]
    lines += ["## Figures", ""]
    for file, caption in report.figures:
        lines += [f"### {caption}", "", f"![{caption}]({_link(out / file, out)})", ""]
    if any(f == "decision_regions.png" for f, _ in report.figures):
        lines += [
            "The decision-regions band uses the sound per-layer bounds (`certify.model_bound(model, "
            "\"sound\")`); points inside it are not certified at ε.",
            "",
        ]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    report.path.write_text("\n".join(lines))
    return report


def write_run_report(run_dir: str | Path, out_dir: str | Path | None = None, *, checkpoint: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs for a run folder into ``out_dir`` (default: the run folder).

    Figures: ``certified_accuracy.png`` and ``radius_histogram.png`` (from ``certificates.csv``, or
    recomputed from the checkpoint when the file is absent), ``training_curves.png`` (from
    ``metrics.jsonl``) and, for 2-D data, ``decision_regions.png`` with the band of sound certified
    radius <= the smallest evaluation eps (the training eps when none).  Returns the path of ``report.md``.

    The report names the checkpoint file, epoch and SHA-256 it describes: the run's newest
    checkpoint, or ``checkpoint`` (a name such as ``epoch-000001`` or a path).  A damaged newest
    checkpoint raises :class:`~lipmargin.checkpoint.DamagedCheckpointError`.  When the described
    checkpoint is not the one ``summary.json`` names, its metrics and radii are recomputed.
    """
    return _write_run_report(run_dir, out_dir, checkpoint).path


# --------------------------------------------------------------------------------------------
# Sweep report
# --------------------------------------------------------------------------------------------


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
    header = [*params, "n", "clean accuracy", *(f"certified @ ε={e}" for e in eps_keys), "Lipschitz"]
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


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


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
