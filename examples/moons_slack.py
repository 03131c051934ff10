"""The two-moons slack figure: how CLL's slack ``p`` shapes the decision boundary.

Trains the ``moons-cll`` preset (an MLP with MaxMin activations, CLL at eps 0.15) once per value of
the slack ``p``, then draws each model's decision regions with the certified radius of every point
of the plane (from lipmargin's sound bound) and the band where it is below eps.  A large ``p``
tolerates many margin violations: a smooth boundary, a small Lipschitz constant; a small ``p``
fits the data tightly with a larger constant (the paper's Figure 1).

    python examples/moons_slack.py --epochs 400 --out moons-slack.png          # a few minutes on a CPU
    python examples/moons_slack.py --epochs 3 --p 0.75,0.01 --out quick.png     # a smoke run

The runs are ordinary run folders (``--runs DIR`` keeps them): ``lipmargin certify DIR/p0.01``
certifies one, ``lipmargin report DIR/p0.01`` writes its report.  Needs matplotlib (``[plot]``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import lipmargin
from lipmargin.data import load_dataset, to_float

EPS = 0.15  # the preset's training and evaluation radius


def train_runs(p_values: list[float], epochs: int, runs: Path, *, seed: int = 0) -> dict[float, Path]:
    """One run folder per ``p`` (the moons-cll preset with ``loss.p`` and ``train.epochs`` set)."""
    folders = {}
    for p in p_values:
        cfg = lipmargin.load_config(
            preset="moons-cll",
            overrides=[f"loss.p={p}", f"train.epochs={epochs}", f"train.seed={seed}", "data.test_size=2000"],
        )
        folders[p] = runs / f"p{p:g}"
        lipmargin.fit(cfg, folders[p], overwrite=True)
    return folders


def region_map(model: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and sound certified radius at every grid point ``(len(ys), len(xs))``."""
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)  # (G, 2)
    # The target does not matter for the radius; the prediction is its own label here.
    result = lipmargin.certify(model, [(points, torch.zeros(len(points), dtype=torch.long))], [], input_shape=(2,))
    return result.prediction.reshape(gx.shape), result.radius.reshape(gx.shape)


def draw(folders: dict[float, Path], out: Path, resolution: int = 160) -> dict[float, dict[str, float]]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    train = load_dataset("moons", split="train")
    points, labels = to_float(train.inputs), train.labels
    xs = torch.linspace(-1.6, 2.6, resolution)
    ys = torch.linspace(-1.1, 1.6, resolution)
    fig, axes = plt.subplots(1, len(folders), figsize=(4 * len(folders), 3.2), squeeze=False)
    stats = {}
    for ax, (p, folder) in zip(axes[0], folders.items()):
        run = lipmargin.open_run(folder)
        prediction, radius = region_map(run.model, xs, ys)
        test = load_dataset("moons", split="test")
        n = 2000
        result = lipmargin.certify(run.model, [(to_float(test.inputs[:n]), test.labels[:n])], [EPS], input_shape=(2,))
        stats[p] = {"clean": result.clean_accuracy, "certified": result.certified_accuracy[EPS], "lipschitz": result.lipschitz}
        ax.contourf(xs, ys, prediction.double(), levels=[-0.5, 0.5, 1.5], colors=["#cfe0f3", "#f6d5c8"])
        ax.contourf(xs, ys, radius.clamp(max=1.0), levels=[0.0, EPS], colors=["#9a9a9a"], alpha=0.55)  # not certified at eps
        ax.contour(xs, ys, prediction.double(), levels=[0.5], colors="k", linewidths=1.0)
        ax.scatter(points[:400, 0], points[:400, 1], c=labels[:400], cmap="coolwarm", s=4, linewidths=0)
        ax.set_title(f"p = {p:g}: certified {stats[p]['certified']:.2f}, L = {stats[p]['lipschitz']:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"CLL on two moons: grey = certified radius below eps {EPS}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return stats


def main(argv: list[str] | None = None) -> dict[float, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", default="0.75,0.25,0.01,0.0001", help="comma-separated slack values (2 to 4 of them)")
    ap.add_argument("--epochs", type=int, default=400, help="epochs per model (3 for a smoke run)")
    ap.add_argument("--out", default="moons-slack.png", help="the figure (PNG)")
    ap.add_argument("--runs", default=None, help="keep the run folders here (default: a temporary folder)")
    args = ap.parse_args(argv)
    p_values = [float(v) for v in args.p.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs) if args.runs else Path(tmp)
        stats = draw(train_runs(p_values, args.epochs, runs), Path(args.out))
    for p, s in stats.items():
        print(f"p {p:<8g} clean {s['clean']:.3f}  certified@{EPS} {s['certified']:.3f}  Lipschitz bound {s['lipschitz']:.3f}")
    print(f"figure -> {args.out}")
    return stats


if __name__ == "__main__":
    main()
