"""Figures for docs/results.md from finished run folders (matplotlib; run with the repo's venv).

    python experiments/figures.py --fmnist RUNS/fm --moons RUNS/cpu/moons-slack --digits RUNS/digits --out docs/figures

- ``fmnist-cra-eps{0.15,0.5}.png``: certified accuracy against the radius (sound bounds, 10,000 test
  images, seed 0) of CLL, GloRo and CE + Lipschitz penalty trained at that eps.
- ``fmnist25-cra-eps{0.15,0.5}.png``: the same for issue 19's 25-epoch comparison (``--fmnist-converged``:
  CLL, GloRo with both gradient variants, HKR through deel-torchlip, CE + penalty, CLL on AOL-S).
- ``digits-cra.png``: certified accuracy against the radius of the validated CLL and GloRo digits
  models (seed 0, the 360 test images; ``--digits`` names a folder holding the ``cll`` and
  ``gloro`` sweeps).
- ``moons-p{p}.png``: the decision regions of the seed-0 two-moons model of each slack p, with the
  band of points not certified at eps 0.15 (sound bound).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from lipmargin.report import plots  # noqa: E402
from lipmargin.report import load_certificates  # noqa: E402
from lipmargin.report.run import _decision_regions_figure  # noqa: E402

RADII = [36 / 255, 72 / 255, 108 / 255, 0.5, 1.0]


def cra_figure(runs: dict[str, Path], title: str, path: Path) -> None:
    """Certified accuracy against the radius of each named run folder (sound bounds), as a PNG."""
    fig = plots._new_figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for k, (name, run) in enumerate(runs.items()):
        certs = load_certificates(run)
        correct = certs.target == certs.prediction
        x, y = plots.certified_accuracy_steps(certs.radius, correct)
        ax.plot(x, y, drawstyle="steps-post", color=f"C{k}", lw=1.8, label=f"{name} (clean {correct.mean():.1%})")
    for r in RADII:
        ax.axvline(r, color="0.6", ls=":", lw=0.8)
    ax.set_xlim(0, 1.3)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("ε (L2 radius, pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (sound bound)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def fmnist(root: Path, out: Path) -> None:
    runs = {
        0.15: {"CLL": "cll-eps0.15/cells/base", "GloRo": "gloro/cells/loss.eps=0.15", "CE + penalty": "ce/cells/base"},
        0.5: {"CLL": "cll-eps0.5/cells/base", "GloRo": "gloro/cells/loss.eps=0.5", "CE + penalty": "ce/cells/base"},
    }
    for eps, methods in runs.items():
        cra_figure({name: root / rel / "seed-0" for name, rel in methods.items()},
                   f"Fashion-MNIST 4C3F, trained at eps {eps} (seed 0, 10,000 test images)", out / f"fmnist-cra-eps{eps}.png")


def fmnist_converged(root: Path, out: Path) -> None:
    """Issue 19's comparison at 25 epochs (seed 0 of each final; the losses that have finished)."""
    for eps in (0.15, 0.5):
        runs = {
            "CLL": root / f"cll-eps{eps}/cells/base/seed-0",
            "GloRo": root / f"gloro/cells/loss.eps={eps}/seed-0",
            "GloRo, authors' gradients": root / f"gloro-authors/cells/loss.eps={eps}/seed-0",
            "HKR (deel-torchlip)": root / f"hkr-eps{eps}/seed-0",
            "CE + penalty": root / "ce/cells/base/seed-0",
            "CLL on aol-s": root / f"aol-s-cll-eps{eps}/cells/base/seed-0",
        }
        runs = {name: run for name, run in runs.items() if (run / "certificates.csv").is_file()}
        cra_figure(runs, f"Fashion-MNIST, 25 epochs on 10,000 images, trained at eps {eps} (seed 0)",
                   out / f"fmnist25-cra-eps{eps}.png")


def digits(root: Path, out: Path) -> None:
    runs = {label: next((root / name / "cells").iterdir()) / "seed-0" for name, label in (("cll", "CLL"), ("gloro", "GloRo"))}
    cra_figure(runs, "8x8 digits 2C2F, trained at eps 0.5, validated settings (seed 0, 360 test images)", out / "digits-cra.png")


def moons(root: Path, out: Path) -> None:
    for cell in sorted((root / "cells").iterdir()):
        p = cell.name.split("=", 1)[1]
        fig = _decision_regions_figure(cell / "seed-0", 0.15)
        if isinstance(fig, str):
            raise SystemExit(f"{cell}: {fig}")
        fig.axes[0].set_title(f"two moons, CLL eps 0.15, p {p} (seed 0)")
        fig.savefig(out / f"moons-p{p}.png", dpi=90, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmnist", type=Path)
    ap.add_argument("--fmnist-converged", type=Path, help="the issue-19 folder (docs/results/fmnist-25ep layout)")
    ap.add_argument("--moons", type=Path)
    ap.add_argument("--digits", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fmnist:
        fmnist(args.fmnist, args.out)
    if args.fmnist_converged:
        fmnist_converged(args.fmnist_converged, args.out)
    if args.moons:
        moons(args.moons, args.out)
    if args.digits:
        digits(args.digits, args.out)


if __name__ == "__main__":
    main()
