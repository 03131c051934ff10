"""``export_certified``: write a model as a checked, self-contained certified predictor file.

Works on a model in memory; it never opens a run folder (``lipmargin export RUN_DIR`` opens the
run with :func:`lipmargin.train.open_run` and passes the model, its checkpoint record and its
test inputs here).  For a run folder in Python::

    from lipmargin.data import load_dataset
    from lipmargin.export import export_certified
    from lipmargin.train import open_run

    run = open_run("runs/digits", "cpu")
    test = load_dataset(run.config.data.name, run.config.data.root, "test")
    export_certified(run.model, "torchscript", "digits.pt", test_inputs=test.inputs, checkpoint=run.checkpoint)
"""
from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lipmargin._io import fsync_directory
from lipmargin.certify import ModelBound, certify, model_bound
from lipmargin.checkpoint import CheckpointRef
from lipmargin.data import to_float
from lipmargin.export.check import ExportError, check_against_certify, run_fresh_process
from lipmargin.export.formats import get_format
from lipmargin.export.predictor import build_predictor, exportable_parts

if TYPE_CHECKING:
    from lipmargin.models import LipschitzNet

__all__ = ["ExportResult", "export_certified", "export_metadata"]


def export_metadata(checkpoint: CheckpointRef | None, fmt: str) -> dict[str, str]:
    """The metadata written into an exported file: its format and which checkpoint it was built from.

    ``checkpoint_sha256`` is the SHA-256 of the checkpoint's ``.safetensors`` file bytes (what
    ``sha256sum`` prints); ``checkpoint_file`` its name; ``checkpoint_epoch`` its epoch.  Without
    a checkpoint (a model exported from memory) those three keys are absent.

    >>> sorted(export_metadata(None, "torchscript"))
    ['format', 'lipmargin_version']
    """
    from lipmargin._version import __version__

    named = {} if checkpoint is None else {
        "checkpoint_file": checkpoint.path.name,
        "checkpoint_epoch": str(checkpoint.epoch),
        "checkpoint_sha256": checkpoint.sha256,
    }
    return {**named, "format": fmt, "lipmargin_version": __version__}


def _publish(staged: Path, out: Path) -> None:
    """Move the checked file to ``out`` atomically and durably (same folder: a rename).

    The file was written by ``torch`` / ``onnx`` into the staging path and keeps the mode they gave it.
    """
    with staged.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(staged, out)
    fsync_directory(out.parent)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_certified` wrote and how it was checked.

    ``num_samples`` test samples were run through the written file in a fresh process (0 with
    ``check=False``); ``max_relative_difference`` is the largest ``|r - r_certify| / |r_certify|``
    over them (``None`` without a check): how much the file's radii are deflated below certify()'s
    (they are never larger); ``lipschitz`` is the baked sound bound's largest entry.
    """

    path: Path
    format: str
    num_samples: int
    max_relative_difference: float | None
    lipschitz: float
    epoch: int | None  # the checkpoint's epoch (None for a model exported without a checkpoint)
    runtime: str | None  # what loaded the file in the check
    checkpoint: CheckpointRef | None = None  # the weights exported (also in the file's metadata)


def export_certified(
    model: LipschitzNet | nn.Module,
    fmt: str,
    out: str | Path,
    *,
    test_inputs: Tensor | None = None,
    check: bool = True,
    batch_size: int = 1000,
    bound: ModelBound | None = None,
    checkpoint: CheckpointRef | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> ExportResult:
    """Export ``model`` as a certified predictor in format ``fmt`` (see :mod:`lipmargin.export`).

    Args:
        model: a :class:`lipmargin.models.LipschitzNet` (or a module with its ``features``,
            ``head``, ``in_shape``, ``num_classes``), e.g. ``open_run(run_dir).model``; it is
            copied, never changed.
        fmt: a name in :data:`EXPORT_FORMATS`: ``torchscript``, ``torch-export`` or ``onnx``.
        out: the file to write; it appears only after the check passed (written atomically).
        test_inputs: ``(N, *in_shape)`` inputs the check runs on, as a dataset stores them
            (``load_dataset(...).inputs``: uint8 images are divided by 255 as
            :func:`lipmargin.data.to_float` does); required with ``check=True``.
        check: load the file in a fresh process and compare it with ``certify`` on
            ``test_inputs``: every radius must be <= certify()'s and the label equal wherever
            certify()'s radius is positive (:func:`check_against_certify`).
        batch_size: samples per forward pass in the check.
        bound: the sound bound to bake in; it must be of the model's current weights (a stale
            bound is refused); default: ``model_bound(model, "sound")``.
        checkpoint: the checkpoint the weights came from (``open_run(...).checkpoint``); the
            file's metadata (:func:`read_export_metadata`) names it and its SHA-256.
        on_event: receives ``{"event": "export", "stage": text}`` as each stage begins.

    Raises:
        ValueError: unknown format, bad ``batch_size``, no ``test_inputs`` for the check, or an
            unsound or stale ``bound``.
        ImportError: the format needs an extra that is not installed.
        ExportError: a layer without an export conversion, or the check failed (nothing is
            written, an existing ``out`` is left alone).

    >>> import tempfile
    >>> import warnings
    >>> import torch
    >>> from pathlib import Path
    >>> from torch import nn
    >>> from lipmargin.certify import certify
    >>> from lipmargin.export import read_export_metadata
    >>> from lipmargin.models import LipschitzNet
    >>> _ = torch.manual_seed(0)
    >>> model = LipschitzNet(nn.Sequential(nn.Linear(2, 4), nn.ReLU()), nn.Linear(4, 3), (2,))
    >>> x = torch.rand(16, 2)
    >>> with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():  # check=False: no second process
    ...     warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 flags torch.jit as deprecated
    ...     result = export_certified(model, "torchscript", Path(tmp) / "m.pt", check=False)
    ...     metadata = read_export_metadata(result.path)
    ...     label, radius = torch.jit.load(str(result.path))(x)  # what a user runs, with torch only
    >>> result.format, metadata["format"], label.shape, radius.dtype
    ('torchscript', 'torchscript', torch.Size([16]), torch.float64)
    >>> reference = certify(model, [(x, label)], [])
    >>> bool(torch.equal(label, reference.prediction)), bool((radius <= reference.radius).all())
    (True, True)

    With ``test_inputs=x`` (and the default ``check=True``) the same comparison runs on the
    written file in a fresh Python process before the file appears; ``result.num_samples`` says
    on how many inputs.
    """
    exporter = get_format(fmt)
    exporter.requires()
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if check and test_inputs is None:
        raise ValueError("check=True needs test_inputs (e.g. load_dataset(name, root, 'test').inputs); or pass check=False")
    # Absolute: the check process runs inside the staging folder, where a relative path would
    # point somewhere else.
    out = Path(out).absolute()
    emit = on_event or (lambda event: None)
    model = copy.deepcopy(model).to("cpu")  # the caller's model stays where it is
    try:
        _, _, in_shape, _ = exportable_parts(model)
        if bound is None:
            emit({"event": "export", "stage": "computing the sound bound"})
            bound = model_bound(model, "sound", input_shape=in_shape)
        predictor = build_predictor(model, bound, exporter.dtype)
    except TypeError as e:  # a layer or model export cannot convert (named in the message)
        raise ExportError(str(e)) from None
    example = torch.zeros(2, *in_shape, dtype=torch.float32)  # batch 2: no exporter may specialise on 1

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp).resolve()  # the check runs with cwd=work: every path it gets must be absolute
        staged = work / f"model{exporter.suffix}"
        emit({"event": "export", "stage": f"writing the {fmt} file"})
        exporter.save(predictor, example, staged)
        if exporter.write_metadata is not None:
            exporter.write_metadata(staged, export_metadata(checkpoint, fmt))
        num_samples, max_rel, runtime = 0, None, None
        if check:
            assert test_inputs is not None  # checked above
            if tuple(test_inputs.shape[1:]) != in_shape:
                raise ExportError(f"test inputs have shape {tuple(test_inputs.shape[1:])} but the model expects {in_shape}")
            # The reference recomputes the sound bound itself, so a wrong baked bound is caught.
            n = int(test_inputs.shape[0])
            batches = [
                (to_float(test_inputs[i : i + batch_size]), torch.zeros(len(test_inputs[i : i + batch_size]), dtype=torch.long))
                for i in range(0, n, batch_size)
            ]
            emit({"event": "export", "stage": f"certifying the {n} test samples for the check"})
            reference = certify(model, batches, [], method="sound", input_shape=in_shape)
            emit({"event": "export", "stage": f"running the {fmt} file on them in a fresh process"})
            result = run_fresh_process(exporter, staged, test_inputs, batch_size, work)
            runtime = str(result["runtime"])
            num_samples = reference.num_samples
            max_rel = check_against_certify(
                result["label"], result["radius"], reference.prediction, reference.radius, f"the exported {fmt} file"
            )
        _publish(staged, out)
    return ExportResult(
        path=out,
        format=fmt,
        num_samples=num_samples,
        max_relative_difference=max_rel,
        lipschitz=bound.lipschitz,
        epoch=checkpoint.epoch if checkpoint is not None else None,
        runtime=runtime,
        checkpoint=checkpoint,
    )
