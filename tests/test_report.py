"""Figures (lipmargin.report.plots) and Markdown reports (lipmargin.report)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from lipmargin import cli, report

from lipmargin.report import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FIGURES = ("certified_accuracy.png", "radius_histogram.png", "training_curves.png", "decision_regions.png")


def _by_gid(ax, gid: str) -> list:
    return [a for a in [*ax.lines, *ax.collections, *ax.images, *ax.patches] if a.get_gid() == gid]


def _contour_vertices(ax, gid: str) -> np.ndarray:
    paths = [p for cs in _by_gid(ax, gid) for p in cs.get_paths() if len(p.vertices)]
    assert paths, f"no {gid} contour drawn"
    return np.concatenate([p.vertices for p in paths])  # (V, 2)


def _assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is suspiciously small ({len(data)} bytes)"


def _image_links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


@pytest.fixture(scope="module")
def moons_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """Two tiny two-moons runs (2 epochs) that differ in CLL's p."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for p in (0.75, 0.01):
        out = root / f"p{p}"
        argv = ["train", "--preset", "moons-cll", "--set", "train.epochs=2", "--set", f"loss.p={p}"]
        assert cli.main([*argv, "--out", str(out), "--quiet"]) == 0
        if not (out / "certificates.csv").exists():
            # Older fit() versions: write what the report reads, from the run's own checkpoint.
            certs = report.load_certificates(out)
            lines = ["index,target,prediction,radius"]
            lines += [f"{i},{t},{c},{r!r}" for i, (t, c, r) in enumerate(zip(certs.target, certs.prediction, certs.radius.tolist()))]
            (out / "certificates.csv").write_text("\n".join(lines) + "\n")
        runs[p] = out
    return runs


# --------------------------------------------------------------------------------------------
# matplotlib stays optional
# --------------------------------------------------------------------------------------------


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, lipmargin.report.plots, lipmargin.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_matplotlib_raises_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib \(or pip install -e '\.\[plot\]'"):
        plots.radius_histogram([0.1, 0.2], [True, True])
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ImportError, match=r"pip install matplotlib \(or pip install -e '\.\[plot\]'"):
        report.write_run_report(tmp_path)


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def test_certified_accuracy_curve_is_the_certified_accuracy_step_function() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 500
    radius = torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 + 1e-3  # (n,) all > 0
    radius[:7] = torch.inf
    target = torch.randint(0, 3, (n,), generator=gen)
    prediction = torch.where(torch.rand(n, generator=gen) < 0.8, target, (target + 1) % 3)
    correct = prediction == target
    fig = plots.certified_accuracy_curve(radius, correct, eps_marks=[0.5, 1.0])
    ax = fig.axes[0]
    (line,) = _by_gid(ax, "certified-accuracy")
    x, y = (np.asarray(v, dtype=np.float64) for v in line.get_data())
    assert line.get_drawstyle() == "steps-post"
    assert x[0] == 0.0 and y[0] == pytest.approx(float(correct.double().mean()))
    assert np.all(np.diff(x) > 0) and np.all(np.diff(y) <= 0)
    assert x[-1] == pytest.approx(float(radius[correct & radius.isfinite()].max()))
    assert y[-1] == pytest.approx(float((correct & radius.isinf()).double().mean()))  # inf: certified at every eps
    # Read as a step function, the curve is the certified accuracy at every eps, counted here
    # sample by sample from its definition (correct and radius > eps, strict).
    probe = torch.rand(200, generator=gen, dtype=torch.float64).mul(x[-1]).tolist() + radius[:50].tolist()
    pairs = list(zip(radius.tolist(), correct.tolist()))
    for e in (e for e in probe if e <= x[-1]):
        acc = sum(1 for r, ok in pairs if ok and r > e) / n
        assert y[np.searchsorted(x, e, side="right") - 1] == pytest.approx(acc, abs=1e-15), e
    marks = sorted(float(l.get_xdata()[0]) for l in ax.lines if len(set(l.get_xdata())) == 1 and len(l.get_xdata()) == 2)
    assert marks == [0.5, 1.0]


def test_radius_histogram_counts_correct_finite_radii() -> None:
    radius = np.array([0.1, 0.2, 0.2, np.inf, 0.5, np.inf, 0.05, 0.3])
    correct = np.array([True, True, False, True, True, False, True, True])
    fig = plots.radius_histogram(radius, correct, bins=7)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == int((correct & np.isfinite(radius)).sum()) == 5
    assert "1 infinite" in ax.get_title()


def test_decision_regions_boundary_and_band_of_a_linear_classifier() -> None:
    # f = x1 - 0.3 is 1-Lipschitz: the radius is exactly the distance to the line x1 = 0.3.
    def predict(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert grid.shape[1] == 2 and grid.dtype == torch.float64
        return (grid[:, 0] > 0.3).long(), (grid[:, 0] - 0.3).abs()

    gen = torch.Generator().manual_seed(0)
    points = torch.rand(300, 2, generator=gen) * 2 - 1
    labels = (points[:, 0] > 0.3).long()
    eps = 0.2
    fig = plots.decision_regions(predict, points, labels, eps, bounds=(-1.0, 1.0, -1.0, 1.0), resolution=101)
    ax = fig.axes[0]
    (image,) = _by_gid(ax, "class-regions")
    classes = np.asarray(image.get_array())  # (R, R), rows along x2
    xs = np.linspace(-1.0, 1.0, 101)
    np.testing.assert_array_equal(classes, np.broadcast_to((xs > 0.3).astype(int), (101, 101)))
    boundary = _contour_vertices(ax, "decision-boundary")
    np.testing.assert_allclose(boundary[:, 0], 0.3, atol=1e-9)
    assert np.ptp(boundary[:, 1]) == pytest.approx(2.0)  # the whole height of the box
    edge = _contour_vertices(ax, "margin-edge")
    np.testing.assert_allclose(np.abs(edge[:, 0] - 0.3), eps, atol=1e-9)
    band = _contour_vertices(ax, "margin-band")
    assert band[:, 0].min() == pytest.approx(0.3 - eps) and band[:, 0].max() == pytest.approx(0.3 + eps)


def test_decision_regions_three_classes_draw_every_boundary() -> None:
    def predict(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = grid[:, 0]
        cls = (x > 0.0).long() + (x > 1.0).long()
        return cls, torch.minimum(x.abs(), (x - 1.0).abs())

    points = torch.tensor([[-0.5, 0.0], [0.5, 0.0], [1.5, 0.0]])
    fig = plots.decision_regions(predict, points, torch.tensor([0, 1, 2]), 0.1, bounds=(-1.0, 2.0, -1.0, 1.0), resolution=61)
    lines = _contour_vertices(fig.axes[0], "decision-boundary")[:, 0]
    assert set(np.round(lines, 9)) == {0.0, 1.0}


def test_sweep_curves_plot_means_on_a_log_axis() -> None:
    cells = [
        {"params": {"loss.p": p}, "n": 2, "clean_accuracy": {"mean": m, "std": 0.01},
         "certified_accuracy": {"0.15": {"mean": m - 0.1, "std": 0.02}}, "lipschitz": {"mean": 10 / p, "std": 1.0}}
        for p, m in ((0.75, 0.9), (0.01, 0.95), (0.1, 0.92))
    ]
    fig = plots.sweep_curves(cells, "loss.p")
    ax_acc, ax_lip = fig.axes
    assert ax_acc.get_xscale() == "log" and ax_lip.get_yscale() == "log"
    series = {c.get_label(): c.lines[0] for c in ax_acc.containers}  # errorbar: (data line, caps, bars)
    assert set(series) == {"clean", "certified ε=0.15"}
    np.testing.assert_allclose(series["clean"].get_xdata(), [0.01, 0.1, 0.75])
    np.testing.assert_allclose(series["clean"].get_ydata(), [0.95, 0.92, 0.9])
    np.testing.assert_allclose(series["certified ε=0.15"].get_ydata(), [0.85, 0.82, 0.8])
    np.testing.assert_allclose(ax_lip.containers[0].lines[0].get_ydata(), [1000.0, 100.0, 10 / 0.75])


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------


def test_run_report_writes_and_links_every_figure(moons_runs: dict[float, Path], tmp_path: Path) -> None:
    run = moons_runs[0.01]
    path = report.write_report(run, tmp_path / "out")
    assert path == tmp_path / "out" / "report.md"
    text = path.read_text()
    links = _image_links(text)
    for name in RUN_FIGURES:
        _assert_png(tmp_path / "out" / name)
        assert name in links
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['clean_accuracy']:.4f}" in text
    assert "certified accuracy @ ε=0.15" in text
    assert not (run / "report.md").exists()  # out_dir given: the run folder is left alone


def test_certificates_recomputed_without_csv(moons_runs: dict[float, Path], tmp_path: Path) -> None:
    run = moons_runs[0.75]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "certificates.csv").unlink()
    written = report.read_certificates(run / "certificates.csv")
    again = report.load_certificates(copy)
    np.testing.assert_array_equal(again.prediction, written.prediction)
    np.testing.assert_array_equal(again.target, written.target)
    np.testing.assert_allclose(again.radius, written.radius, rtol=1e-6)
    assert "recomputed" in again.source


def test_sweep_report(moons_runs: dict[float, Path], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cells = []
    for p, run in moons_runs.items():
        rel = f"cells/loss.p={p}/seed-0"
        shutil.copytree(run, sweep / rel)
        s = json.loads((run / "summary.json").read_text())
        cells.append({
            "params": {"loss.p": p}, "runs": [rel], "n": 1,
            "clean_accuracy": {"mean": s["clean_accuracy"], "std": 0.0},
            "certified_accuracy": {"0.15": {"mean": s["certified_accuracy"]["0.15"], "std": 0.0}},
            "lipschitz": {"mean": s["lipschitz"], "std": 0.0},
        })
    results = {"grid": {"loss.p": [0.75, 0.01]}, "seeds": [0], "eval_eps": ["0.15"], "cells": cells}
    (sweep / "results.json").write_text(json.dumps(results))

    path = report.write_report(sweep)
    assert path == sweep / "report.md"
    text = path.read_text()
    _assert_png(sweep / "sweep_loss.p.png")
    assert "sweep_loss.p.png" in _image_links(text)
    assert "### loss.p=0.75" in text and "### loss.p=0.01" in text
    assert text.count(" ± ") >= 6  # clean, certified, Lipschitz for each cell
    for cell in cells:
        run = sweep / cell["runs"][0]
        assert (run / "report.md").is_file()
        _assert_png(run / "decision_regions.png")
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert any(t.endswith("decision_regions.png") for t in targets)
    for t in targets:
        assert (sweep / t).is_file(), t


def test_write_report_rejects_other_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))) as info:
        report.write_report(tmp_path)
    assert "summary.json" in str(info.value) and "results.json" in str(info.value)
