"""The export's check: run the written file in a fresh Python process and compare it with certify().

:func:`check_against_certify` is the one-sided comparison (every radius <= certify()'s, the label
equal wherever certify() certifies a positive radius); :func:`run_fresh_process` loads a file with
nothing but torch (and the format's runtime) and runs it on given inputs.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lipmargin.export.formats import ExportFormat

__all__ = ["ExportError", "check_against_certify", "run_fresh_process"]


class ExportError(ValueError):
    """The export failed or its check found a mismatch; the message is one line."""


_CHECK_SCRIPT = """
import sys

import torch

model_path, inputs_path, result_path = sys.argv[1], sys.argv[2], sys.argv[3]
batch_size, threads = int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
{loader}
inputs = torch.load(inputs_path, weights_only=True)
labels, radii = [], []
with torch.no_grad():
    for i in range(0, inputs.shape[0], batch_size):
        x = inputs[i : i + batch_size]
        # what lipmargin.data.to_float does: uint8 images / 255, other data as float32
        x = x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)
        label, radius = predict(x)
        labels.append(label.to(torch.int64))
        radii.append(radius.to(torch.float64))
empty = inputs.shape[0] == 0
torch.save(
    {{
        "label": torch.zeros(0, dtype=torch.int64) if empty else torch.cat(labels),
        "radius": torch.zeros(0, dtype=torch.float64) if empty else torch.cat(radii),
        "runtime": runtime,
        "lipmargin_imported": any(m == "lipmargin" or m.startswith("lipmargin.") for m in sys.modules),
    }},
    result_path,
)
"""


def run_fresh_process(fmt: ExportFormat, model_path: Path, inputs: Tensor, batch_size: int, work: Path) -> dict[str, Any]:
    """Load ``model_path`` in a new interpreter (``-I``: no PYTHONPATH, no user site) and run it."""
    inputs_path, result_path = work / "inputs.pt", work / "result.pt"
    torch.save(inputs.contiguous(), inputs_path)
    script = _CHECK_SCRIPT.format(loader=fmt.loader)
    # The caller's thread count: the same speed, and the same reduction order as certify() here.
    threads = str(torch.get_num_threads())
    argv = [sys.executable, "-I", "-c", script, str(model_path), str(inputs_path), str(result_path), str(batch_size), threads]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ExportError(f"check failed: a fresh Python process could not run the exported {fmt.name} file: {last}")
    result = torch.load(result_path, weights_only=True)
    if result["lipmargin_imported"]:
        raise ExportError(f"check failed: loading the exported {fmt.name} file imported lipmargin; it is not self-contained")
    return result


def _deflation(radius: Tensor, reference: Tensor) -> Tensor:
    """``(r_ref - r) / r_ref`` per sample for ``r <= r_ref``, in ``[0, 1]``: 0 where equal (also
    ``0 == 0`` and ``inf == inf``), 1 where an infinite reference radius became finite."""
    rel = (reference - radius) / reference
    rel = torch.where(torch.isinf(reference) & torch.isfinite(radius), torch.ones_like(rel), rel)
    return torch.where(radius == reference, torch.zeros_like(rel), rel)


def check_against_certify(label: Tensor, radius: Tensor, ref_label: Tensor, ref_radius: Tensor, what: str) -> float:
    """The one-sided check: every radius <= certify()'s, labels equal wherever certify's radius > 0.

    Returns the largest relative deflation ``(r_certify - r) / r_certify`` (in ``[0, 1]``); raises
    :class:`ExportError` (one line) otherwise.

    >>> import torch
    >>> ref_label, ref_radius = torch.tensor([0, 1]), torch.tensor([0.5, 0.0], dtype=torch.float64)
    >>> check_against_certify(torch.tensor([0, 0]), torch.tensor([0.25, 0.0], dtype=torch.float64), ref_label, ref_radius, "f")
    0.5
    >>> check_against_certify(torch.tensor([0, 1]), torch.tensor([0.75, 0.0], dtype=torch.float64), ref_label, ref_radius, "f")
    Traceback (most recent call last):
    ...
    lipmargin.export.check.ExportError: check failed: f claims a larger radius than certify() for 1 of 2 test samples (first: sample 0, 0.75 > 0.5)
    """
    n = int(ref_radius.numel())
    if label.shape != ref_label.shape or radius.shape != ref_radius.shape:
        raise ExportError(
            f"check failed: {what} returned {tuple(label.shape)} labels and {tuple(radius.shape)} radii "
            f"for {n} test samples"
        )
    larger = ~(radius <= ref_radius)  # nan counts as larger
    if bool(larger.any()):
        i = int(larger.nonzero()[0])
        raise ExportError(
            f"check failed: {what} claims a larger radius than certify() for {int(larger.sum())} of {n} "
            f"test samples (first: sample {i}, {float(radius[i])!r} > {float(ref_radius[i])!r})"
        )
    wrong = (label != ref_label) & (ref_radius > 0)
    if bool(wrong.any()):
        raise ExportError(
            f"check failed: {what} predicts a different label than certify() for {int(wrong.sum())} of "
            f"{n} test samples that certify() certifies at a positive radius"
        )
    return float(_deflation(radius, ref_radius).max()) if n else 0.0

