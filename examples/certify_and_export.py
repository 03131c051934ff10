"""Certify a trained model, export it as a self-contained certified predictor, and use the file.

1. train the ``digits-cll`` preset briefly (or pass ``--run DIR`` to use a run you already have);
2. certify it with the sound bound (``lipmargin.certify``);
3. export it with the export API: ``build_predictor`` bakes the sound pairwise bound into a
   predictor whose ``forward(x)`` returns ``(label, radius)``, and a registered format
   (``EXPORT_FORMATS``: TorchScript here) writes it to a file;
4. load the file with plain ``torch.jit.load`` -- as a deployment would, without lipmargin -- and
   check its answers against step 2: every radius <= certify()'s, the same label wherever
   certify()'s radius is positive.

    python examples/certify_and_export.py --epochs 20 --out digits-certified.pt
    python examples/certify_and_export.py --run runs/demo --out demo.pt        # after `make demo`

``lipmargin export RUN --format torchscript --out FILE`` does steps 3-4 from the command line (it
runs the check in a fresh process on the whole test split and writes the file only if it passes).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import lipmargin
from lipmargin.data import load_dataset, to_float
from lipmargin.export import EXPORT_FORMATS, build_predictor

EPS = (36 / 255, 72 / 255, 0.5)


def train_digits(epochs: int, out: Path) -> Path:
    cfg = lipmargin.load_config(preset="digits-cll", overrides=[f"train.epochs={epochs}"])
    lipmargin.fit(cfg, out, overwrite=True)
    return out


def export_torchscript(model: torch.nn.Module, bound: lipmargin.ModelBound, input_shape: tuple[int, ...], path: Path) -> Path:
    """Write ``model`` with ``bound`` (sound, of these weights) baked in as a TorchScript file."""
    fmt = EXPORT_FORMATS["torchscript"]
    predictor = build_predictor(model, bound, fmt.dtype)
    example = torch.zeros(2, *input_shape)  # an example batch for tracing
    fmt.save(predictor, example, path)
    return path


def check_file(path: Path, inputs: torch.Tensor, reference: lipmargin.CertifyResult) -> dict[str, float]:
    """Run the exported file on ``inputs``; compare with ``certify``'s labels and radii."""
    deployed = torch.jit.load(str(path))  # needs only torch
    label, radius = deployed(inputs)  # (N,) int64, (N,) float64
    if not bool((radius <= reference.radius).all()):
        raise AssertionError("an exported radius exceeds certify()'s")
    certified = reference.radius > 0
    if not torch.equal(label[certified], reference.prediction[certified]):
        raise AssertionError("the exported label differs from certify()'s on a certified sample")
    shrink = 1 - radius[certified] / reference.radius[certified]  # the file's rounding allowance
    return {
        "samples": float(len(inputs)),
        "certified_samples": float(certified.sum()),
        "max_relative_deflation": float(shrink.max()) if shrink.numel() else 0.0,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="an existing run folder (default: train digits-cll now)")
    ap.add_argument("--epochs", type=int, default=20, help="epochs when training here (1 for a smoke run)")
    ap.add_argument("--out", default="digits-certified.pt", help="the exported TorchScript file")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run) if args.run else train_digits(args.epochs, Path(tmp) / "run")
        run = lipmargin.open_run(run_dir)  # the model of the newest checkpoint, and which weights those are
        model = run.model.eval()

    test = load_dataset("digits", split="test")
    inputs, target = to_float(test.inputs), test.labels
    input_shape = tuple(inputs.shape[1:])
    result = lipmargin.certify(model, [(inputs, target)], EPS, input_shape=input_shape, checkpoint=run.checkpoint)
    print(f"certify: clean {result.clean_accuracy:.3f}, certified {', '.join(f'{a:.3f}@{e:.3f}' for e, a in result.certified_accuracy.items())}")

    path = export_torchscript(model, result.bound, input_shape, Path(args.out))
    check = check_file(path, inputs, result)
    print(
        f"exported {path}: on {check['samples']:.0f} test images the file's radii are <= certify()'s "
        f"(at most {check['max_relative_deflation']:.1e} smaller), labels equal on {check['certified_samples']:.0f} certified ones"
    )
    return check


if __name__ == "__main__":
    main()
