"""Figures from results: certified accuracy vs eps, radius histograms, training curves, decision
regions of 2-D classifiers, sweep curves.

Every function takes numbers (tensors, arrays, the dicts ``lipmargin.train`` writes) and returns a
:class:`matplotlib.figure.Figure`; none reads files or prints.  Figures are built with ``Figure()``,
not ``pyplot``: no backend is selected and no global figure registry fills up, and ``savefig``
renders through Agg.  matplotlib is the optional extra ``[plot]``, imported only when a function is
called, so ``import lipmargin.report.plots`` works without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lipmargin.certify import certified_fraction

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "certified_accuracy_steps",
    "certified_accuracy_curve",
    "radius_histogram",
    "training_curves",
    "decision_regions",
    "sweep_curves",
]

ArrayLike = Tensor | np.ndarray | Sequence[float]

#: Swept parameters drawn on a log x axis whatever their values (CLL's p spans decades).
LOG_SCALE_PARAMS = frozenset({"loss.p", "optim.lr", "loss.lipschitz_penalty", "optim.weight_decay"})

_INSTALL_HINT = "pip install matplotlib (or pip install -e '.[plot]' in a lipmargin checkout)"


def _new_figure(**kwargs: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"lipmargin's plots need matplotlib: {_INSTALL_HINT}") from None
    return Figure(layout="constrained", **kwargs)


def _numpy(x: ArrayLike, dtype: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _radius_and_correct(radius: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    r = _numpy(radius, np.float64).reshape(-1)
    c = _numpy(correct, bool).reshape(-1)
    if r.shape != c.shape:
        raise ValueError(f"radius and correct must have the same length; got {r.size} and {c.size}")
    if np.isnan(r).any():
        raise ValueError("radius contains NaN; certified radii are numbers >= 0 or inf")
    return r, c


def _class_color(c: int) -> str:
    # tab10 keeps a class the same colour in the regions, the points and the legend.
    return f"C{c % 10}"


# --------------------------------------------------------------------------------------------
# Certified accuracy vs eps, radius histogram
# --------------------------------------------------------------------------------------------


def certified_accuracy_steps(radius: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The certified-accuracy curve as steps: ``(eps, accuracy)``, both ``(M,)``.

    ``accuracy[k]`` is the fraction of all samples with ``correct`` and ``radius > eps[k]`` (strict,
    computed by :func:`lipmargin.certify.certified_fraction`); it holds on ``[eps[k], eps[k + 1])``.
    ``eps`` runs from 0 to the largest finite radius of a correct sample (1 when there is none).
    """
    r, c = _radius_and_correct(radius, correct)
    hits = r[c]  # (n_correct,) radii of the samples that can be certified
    finite = hits[np.isfinite(hits)]
    end = float(finite.max()) if finite.size else 1.0
    eps = np.unique(np.concatenate([[0.0], finite[finite > 0], [end]]))  # (M,)
    # THE certified-accuracy formula, evaluated at every step of the curve.
    accuracy = certified_fraction(torch.from_numpy(r), torch.from_numpy(c), torch.from_numpy(eps)).numpy()
    return eps, accuracy


def certified_accuracy_curve(
    radius: ArrayLike, correct: ArrayLike, eps_marks: Sequence[float] | None = None
) -> Figure:
    """Certified accuracy as a function of eps, with the evaluation radii ``eps_marks`` marked.

    Args:
        radius: ``(N,)`` certified radii (``inf`` allowed).
        correct: ``(N,)`` whether each prediction is right.
        eps_marks: radii to mark with a vertical line and their accuracy.
    """
    r, c = _radius_and_correct(radius, correct)
    eps, accuracy = certified_accuracy_steps(r, c)
    fig = _new_figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.plot(eps, accuracy, drawstyle="steps-post", color="C0", lw=1.8, label="certified accuracy", gid="certified-accuracy")
    clean = float(c.mean()) if c.size else 0.0
    marks = [float(e) for e in eps_marks or ()]
    # The same formula as the curve, so each mark sits on it.
    mark_acc = certified_fraction(torch.from_numpy(r), torch.from_numpy(c), marks).tolist()
    for k, (e, acc) in enumerate(zip(marks, mark_acc)):
        ax.axvline(e, color="0.45", ls=":", lw=1.0, label="evaluation ε" if k == 0 else None)
        ax.plot([e], [acc], "o", color="C3", ms=5, zorder=3)
        # Below and right of the point: the curve never rises to the right, so the text sits in
        # the empty area under it and clear of the title even at 100 %.
        ax.annotate(
            f"ε={e:g}: {acc:.1%}", (e, acc), xytext=(8, -16), textcoords="offset points", fontsize=9, color="C3",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )
    right = max([float(eps[-1]), *[float(e) for e in eps_marks or ()]])
    ax.set_xlim(0.0, right * 1.02 if right > 0 else 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("ε (L2 radius in input space)")
    ax.set_ylabel("certified accuracy (correct and radius > ε)")
    ax.set_title(f"Certified accuracy vs ε ({r.size:,} samples, clean accuracy {clean:.1%})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return fig


def radius_histogram(
    radius: ArrayLike, correct: ArrayLike, eps_marks: Sequence[float] | None = None, bins: int = 50
) -> Figure:
    """Histogram of the finite certified radii of correctly classified samples.

    Infinite radii cannot be binned; their count is given in the title.  ``eps_marks`` draws the
    evaluation radii: the correct samples left of a mark are the ones not certified there.
    """
    r, c = _radius_and_correct(radius, correct)
    hits = r[c]
    finite = hits[np.isfinite(hits)]
    n_inf = int(hits.size - finite.size)
    fig = _new_figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    if finite.size:
        ax.hist(finite, bins=bins, color="C0", alpha=0.85, edgecolor="white", linewidth=0.4, gid="radius-histogram")
    else:
        ax.text(0.5, 0.5, "no finite radii", transform=ax.transAxes, ha="center", va="center")
    for k, e in enumerate(eps_marks or ()):
        ax.axvline(e, color="C3", ls=":", lw=1.2, label="evaluation ε" if k == 0 else None)
    if eps_marks:
        ax.legend(loc="upper right")
    inf_text = f"{n_inf:,} infinite, not shown" if n_inf else "none infinite"
    ax.set_title(f"Certified radii of {hits.size:,} correctly classified samples ({inf_text})")
    ax.set_xlabel("certified radius (L2, input space)")
    ax.set_ylabel("samples")
    ax.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def training_curves(records: Sequence[Mapping[str, Any]]) -> Figure:
    """Four panels from the per-epoch records of ``metrics.jsonl``.

    Train loss, train accuracy, the feature Lipschitz estimate K (product of
    ``lipschitz_per_layer``, log scale; the evaluated pairwise constant as markers) and clean /
    certified accuracy at the evaluated epochs.
    """
    if not records:
        raise ValueError("training_curves needs at least one epoch record")
    epoch = np.array([int(r["epoch"]) for r in records])
    fig = _new_figure(figsize=(10.0, 7.0))
    (ax_loss, ax_acc), (ax_k, ax_eval) = fig.subplots(2, 2, sharex=True)

    ax_loss.plot(epoch, [float(r["train_loss"]) for r in records], color="C0")
    ax_loss.set_title("training loss")
    ax_loss.set_ylabel("loss")

    ax_acc.plot(epoch, [float(r["train_accuracy"]) for r in records], color="C0")
    ax_acc.set_title("training accuracy (running, during each epoch)")
    ax_acc.set_ylabel("accuracy")

    with_k = [r for r in records if r.get("lipschitz_per_layer")]
    if with_k:
        k = [math.prod(float(v) for v in r["lipschitz_per_layer"]) for r in with_k]
        ax_k.plot([int(r["epoch"]) for r in with_k], k, color="C0", label="K features (power iteration)")
    evaluated = [r for r in records if "clean_accuracy" in r]
    with_pairwise = [r for r in evaluated if "lipschitz" in r]
    if with_pairwise:
        method = with_pairwise[-1].get("bound_method", "?")
        ax_k.plot(
            [int(r["epoch"]) for r in with_pairwise], [float(r["lipschitz"]) for r in with_pairwise],
            "s", color="C1", ms=5, label=f"K·max‖Wᵢ−Wⱼ‖ at evaluation ({method})",
        )
    ax_k.set_yscale("log")
    ax_k.set_title("Lipschitz constant")
    ax_k.set_ylabel("K (log scale)")
    if with_k or with_pairwise:
        ax_k.legend(loc="best", fontsize=8)

    if evaluated:
        ev_epoch = [int(r["epoch"]) for r in evaluated]
        ax_eval.plot(ev_epoch, [float(r["clean_accuracy"]) for r in evaluated], "o-", color="C0", label="clean")
        keys = sorted({e for r in evaluated for e in r.get("certified_accuracy", {})}, key=float)
        for i, key in enumerate(keys):
            pts = [(int(r["epoch"]), float(r["certified_accuracy"][key])) for r in evaluated if key in r.get("certified_accuracy", {})]
            ax_eval.plot(*zip(*pts), "o-", color=f"C{i + 1}", label=f"certified, ε={key}")
        ax_eval.legend(loc="best", fontsize=8)
        split = evaluated[-1].get("eval_split", "evaluation")
        ax_eval.set_title(f"accuracy on the {split} set")
    else:
        ax_eval.text(0.5, 0.5, "no evaluated epochs", transform=ax_eval.transAxes, ha="center", va="center")
        ax_eval.set_title("evaluation")
    ax_eval.set_ylabel("accuracy")
    ax_eval.set_ylim(0.0, 1.02)

    for ax in (ax_loss, ax_acc, ax_k, ax_eval):
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax_eval.xaxis.set_major_locator(MaxNLocator(integer=True))  # shared x: epochs are whole
    for ax in (ax_k, ax_eval):
        ax.set_xlabel("epoch")
    return fig


# --------------------------------------------------------------------------------------------
# Decision regions of a 2-D classifier
# --------------------------------------------------------------------------------------------


def decision_regions(
    predict: Callable[[Tensor], tuple[Tensor, Tensor]],
    points: ArrayLike,
    labels: ArrayLike,
    eps: float,
    bounds: tuple[float, float, float, float] | None = None,
    resolution: int = 300,
    *,
    max_points: int = 600,
    seed: int = 0,
) -> Figure:
    """Predicted class regions, the decision boundary and the certified-margin band of a 2-D model.

    Like the two-moons figure of the CLL paper: the grey band is where the certified radius is
    ``<= eps``, the inputs that are *not* certified at ``eps``; a model with a calibrated margin
    has a band about ``eps`` wide on each side of its boundary.

    Args:
        predict: ``grid (N, 2) float64 -> (prediction (N,), radius (N,))``.
        points: ``(M, 2)`` data points; a random subsample of ``max_points`` is drawn.
        labels: ``(M,)`` their classes (the colour of each point).
        eps: radius of the band.
        bounds: ``(x_min, x_max, y_min, y_max)``; default: the data's box with a margin.
        resolution: grid points per axis.
    """
    xy = _numpy(points, np.float64)
    y = _numpy(labels, np.int64).reshape(-1)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != y.size:
        raise ValueError(f"points must be (M, 2) with M labels; got points {xy.shape} and {y.size} labels")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    if bounds is None:
        lo, hi = xy.min(0), xy.max(0)  # (2,)
        pad = 0.12 * float((hi - lo).max()) + eps
        bounds = (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)
    x_min, x_max, y_min, y_max = (float(b) for b in bounds)
    xs = np.linspace(x_min, x_max, resolution)
    ys = np.linspace(y_min, y_max, resolution)
    gx, gy = np.meshgrid(xs, ys)  # (R, R) each; row i is ys[i]
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], axis=1))  # (R*R, 2) float64
    prediction, radius = predict(grid)
    pred = _numpy(prediction, np.int64).reshape(resolution, resolution)  # (R, R)
    rad = _numpy(radius, np.float64).reshape(resolution, resolution)  # (R, R)
    # contourf cannot take inf (a pair with a zero bound); any value above eps draws the same.
    rad = np.where(np.isfinite(rad), rad, 2.0 * eps + 1.0)
    num_classes = int(max(pred.max(), y.max(initial=0))) + 1

    from matplotlib.colors import ListedColormap, to_rgb
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    # Equal axis scales (distances are L2 radii), so the figure takes the box's aspect; the extra
    # width holds the legend, the extra height the title and labels.
    axes_width = 6.0
    height = min(max(axes_width * (y_max - y_min) / (x_max - x_min), 2.5), 9.0) + 1.0
    fig = _new_figure(figsize=(axes_width + 3.2, height))
    ax = fig.add_subplot()
    # Pale class colours for the regions, so the points (full colour) stand out on them.
    pale = [tuple(0.6 + 0.4 * np.array(to_rgb(_class_color(c)))) for c in range(num_classes)]
    ax.imshow(
        pred, origin="lower", extent=(x_min, x_max, y_min, y_max), cmap=ListedColormap(pale),
        vmin=-0.5, vmax=num_classes - 0.5, interpolation="nearest", aspect="equal", gid="class-regions",
    )
    # The radius is continuous (margin / Lipschitz bound), so its level set gives a smooth band.
    ax.contourf(xs, ys, rad, levels=[-1.0, eps], colors=["0.25"], alpha=0.35, gid="margin-band")
    ax.contour(xs, ys, rad, levels=[eps], colors=["0.3"], linewidths=0.8, linestyles="--", gid="margin-edge")
    # The boundary is the zero level of a signed radius (+ inside class c, - outside): it is
    # continuous, so the line is as smooth as the band instead of following the grid's steps.
    classes = [1] if num_classes == 2 else [c for c in range(num_classes) if (pred == c).any() and (pred != c).any()]
    for c in classes:
        signed = np.where(pred == c, rad, -rad)  # (R, R)
        if signed.min() < 0 < signed.max():
            ax.contour(xs, ys, signed, levels=[0.0], colors="k", linewidths=1.6, gid="decision-boundary")

    rng = np.random.default_rng(seed)
    shown = rng.choice(y.size, size=min(max_points, y.size), replace=False) if y.size else np.zeros(0, np.int64)
    for c in range(num_classes):
        sel = shown[y[shown] == c]
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, color=_class_color(c), edgecolors="white", linewidths=0.3, zorder=3)

    handles = [Patch(facecolor=pale[c], edgecolor="0.6", label=f"predicted class {c}") for c in range(num_classes)]
    handles += [Line2D([], [], ls="", marker="o", color=_class_color(c), label=f"data, class {c}") for c in range(num_classes)]
    handles += [
        Line2D([], [], color="k", lw=1.6, label="decision boundary"),
        Patch(facecolor="0.25", alpha=0.35, edgecolor="0.3", ls="--", label=f"radius ≤ ε = {eps:g}\n(not certified)"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False)
    ax.set_xlim(x_min, x_max)
    ax.set_ylim(y_min, y_max)
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")
    ax.set_title(f"Decision regions and certified-margin band (ε = {eps:g}; {shown.size} of {y.size} points shown)")
    return fig


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mean_std(stats: Sequence[Mapping[str, Any] | None]) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` arrays of ``{"mean", "std"}`` entries; a missing cell is NaN (a gap)."""
    mean = np.full(len(stats), np.nan)
    std = np.zeros(len(stats))
    for i, stat in enumerate(stats):
        if stat and stat.get("mean") is not None:
            mean[i] = float(stat["mean"])
            s = stat.get("std")
            # A single seed has no spread: no error bar rather than NaN.
            std[i] = float(s) if s is not None and math.isfinite(float(s)) else 0.0
    return mean, std


def sweep_curves(cells: Sequence[Mapping[str, Any]], param: str) -> Figure:
    """Accuracy (clean, certified per eps) and the Lipschitz constant vs the swept ``param``.

    ``cells`` are the entries of a sweep's ``results.json``: ``params``, ``n``, and ``{"mean",
    "std"}`` for ``clean_accuracy``, ``certified_accuracy[eps]`` and ``lipschitz``.  Error bars are
    one std over seeds.  Cells that differ in other swept parameters are drawn as separate lines.
    ``param`` goes on a log axis when it is in :data:`LOG_SCALE_PARAMS` or its positive values span
    a factor of 10 or more; parameters that are not numbers are drawn as categories.
    """
    if not cells:
        raise ValueError("sweep_curves needs at least one cell")
    missing = [i for i, c in enumerate(cells) if param not in c.get("params", {})]
    if missing:
        raise ValueError(f"parameter {param!r} is not in the params of cells {missing}")
    values = [c["params"][param] for c in cells]
    numeric = all(_is_number(v) for v in values)
    # Categories keep their order of first appearance in the grid.
    order = list(dict.fromkeys(str(v) for v in values))

    def position(cell: Mapping[str, Any]) -> float:
        v = cell["params"][param]
        return float(v) if numeric else float(order.index(str(v)))

    groups: dict[tuple[tuple[str, str], ...], list[Mapping[str, Any]]] = {}
    for c in cells:
        rest = tuple(sorted((k, str(v)) for k, v in c["params"].items() if k != param))
        groups.setdefault(rest, []).append(c)
    eps_keys = sorted({e for c in cells for e in c.get("certified_accuracy", {})}, key=float)

    fig = _new_figure(figsize=(11.0, 4.4))
    ax_acc, ax_lip = fig.subplots(1, 2)
    markers = "osD^v<>p"
    for g, (rest, members) in enumerate(groups.items()):
        members = sorted(members, key=position)
        x = np.array([position(c) for c in members])
        suffix = f" ({', '.join(f'{k}={v}' for k, v in rest)})" if rest else ""
        style = {"marker": markers[g % len(markers)], "capsize": 3, "ls": "-" if g == 0 else "--", "ms": 5}
        m, s = _mean_std([c.get("clean_accuracy") for c in members])
        ax_acc.errorbar(x, m, yerr=s, color="C0", label=f"clean{suffix}", **style)
        for i, key in enumerate(eps_keys):
            m, s = _mean_std([c.get("certified_accuracy", {}).get(key) for c in members])
            ax_acc.errorbar(x, m, yerr=s, color=f"C{i + 1}", label=f"certified ε={key}{suffix}", **style)
        m, s = _mean_std([c.get("lipschitz") for c in members])
        ax_lip.errorbar(x, m, yerr=s, color="C0", label=f"Lipschitz{suffix}" if rest else None, **style)

    positive = numeric and all(float(v) > 0 for v in values)
    spread = positive and max(float(v) for v in values) >= 10 * min(float(v) for v in values)
    from matplotlib.ticker import NullLocator

    distinct = sorted({float(v) for v in values}) if numeric else []
    for ax in (ax_acc, ax_lip):
        if positive and (param in LOG_SCALE_PARAMS or spread):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(order)), order)
        elif len(distinct) <= 8:
            # A grid has few values: tick exactly those, not the decades between them.
            ax.set_xticks(distinct, [f"{v:g}" for v in distinct])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(param)
        ax.grid(alpha=0.3, which="both")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title(f"accuracy vs {param}")
    ax_acc.legend(loc="best", fontsize=8)
    ax_lip.set_yscale("log")
    ax_lip.set_ylabel("Lipschitz constant K·max‖Wᵢ−Wⱼ‖")
    ax_lip.set_title(f"Lipschitz constant vs {param}")
    if len(groups) > 1:
        ax_lip.legend(loc="best", fontsize=8)
    counts = sorted({int(c.get("n", 0)) for c in cells})
    n_text = f"n = {counts[0]} per cell" if len(counts) == 1 else f"n = {counts[0]}..{counts[-1]} per cell"
    fig.suptitle(f"Sweep over {param}: mean ± std over seeds ({n_text})")
    return fig
