"""The Markdown report of one run folder (``summary.json`` written by :func:`lipmargin.train.fit`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import Tensor

from lipmargin.report import plots
from lipmargin.report._common import REPORT_NAME, _eval_eps, _fmt, _link, _md_cell, _read_json, _read_metrics, _require_matplotlib, _save
from lipmargin.report.certificates import Certificates, _recompute, load_certificates

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["write_run_report"]


@dataclass
class _RunReport:
    path: Path
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)


def _decision_regions_figure(run: Path, eps: float, checkpoint: str | Path | None = None) -> Figure | str:
    """The decision-regions figure of a 2-D run, or why there is none (a sentence)."""
    from lipmargin.certify import certify, model_bound
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

    def predict(grid: Tensor) -> tuple[Tensor, Tensor]:
        # The radii certify() gives (float64 copy, rounding allowance): the same path as the metrics.
        unlabelled = torch.zeros(grid.shape[0], dtype=torch.long)  # certify needs targets; unused here
        result = certify(model, [(grid, unlabelled)], [], bound=bound)
        return result.prediction, result.radius

    train = load_dataset(cfg.data.name, cfg.data.root, "train")
    return plots.decision_regions(predict, train.inputs, train.labels, eps)


def _config_table(cfg: Mapping[str, Any]) -> list[str]:
    lines = ["| section | settings |", "|---|---|"]
    for section, values in cfg.items():
        if not isinstance(values, Mapping):
            continue  # the description, shown above the table
        settings = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        lines.append(f"| {section} | {_md_cell(settings)} |")
    return lines


def _metrics_table(summary: Mapping[str, Any], certs: Certificates | None) -> list[str]:
    from lipmargin.certify import radius_text

    method = summary.get("bound_method", "?")
    # Principle 2: say whether the Lipschitz numbers (hence the certificates) are guaranteed.
    kind = "guaranteed upper bound" if method == "sound" else "estimate, not a guaranteed bound"
    rows = [("clean accuracy", f"{summary['clean_accuracy']:.4f}")]
    for key in sorted(summary.get("certified_accuracy", {}), key=float):
        rows.append((f"certified accuracy @ ε={radius_text(float(key))}", f"{summary['certified_accuracy'][key]:.4f}"))
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
