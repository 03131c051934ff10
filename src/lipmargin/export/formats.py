"""Export file formats: a registry of savers (TorchScript, torch.export, ONNX) and their metadata.

Each :class:`ExportFormat` writes a :class:`~lipmargin.export.predictor.CertifiedPredictor` to a
file, says how a fresh process loads it (``loader``, run by :mod:`lipmargin.export.check`) and
adds the checkpoint record (:data:`METADATA_NAME`) to it.  Register more with
:func:`register_export_format`.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lipmargin.export.predictor import CertifiedPredictor

__all__ = [
    "EXPORT_FORMATS",
    "METADATA_NAME",
    "ExportFormat",
    "get_format",
    "read_export_metadata",
    "register_export_format",
]

SaveFn = Callable[[CertifiedPredictor, Tensor, Path], None]
#: ``write_metadata(path, metadata)`` adds ``metadata`` (str -> str) to a file ``save`` wrote.
MetadataFn = Callable[[Path, dict[str, str]], None]

_EXTRA_HINT = "pip install onnx onnxscript onnxruntime (or pip install -e '.[export]' in a lipmargin checkout)"

#: The name of the metadata in an exported file: an extra file in TorchScript / torch-export
#: archives (JSON text), absent in ONNX, whose ``metadata_props`` hold the same keys and values.
METADATA_NAME = "lipmargin.json"


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a file written by :func:`lipmargin.export.export_certified` (any registered format)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    extra = {METADATA_NAME: ""}
    if path.suffix == ".pt2":
        torch.export.load(str(path), extra_files=extra)
    else:
        with warnings.catch_warnings():  # recent torch flags torch.jit as deprecated; the file is one
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    # Formats registered without write_metadata have no record; an empty dict says so.
    text = extra[METADATA_NAME]
    return dict(json.loads(text)) if text else {}


@dataclass(frozen=True)
class ExportFormat:
    """A registered file format.

    ``save(predictor, example_input, path)`` writes the file; ``requires()`` raises ImportError
    when a package the format needs is missing (called before any work); ``loader`` is Python
    source run in the checking process with ``torch`` imported and ``model_path`` set: it must
    define ``predict(x: Tensor) -> (label, radius)`` and ``runtime`` (a string naming what loaded it).
    ``dtype`` is the arithmetic of the exported graph.  ``write_metadata(path, metadata)``, when
    given, adds the checkpoint's name and SHA-256 to the saved file (before the check, so the
    check runs the final file).
    """

    name: str
    suffix: str
    save: SaveFn
    requires: Callable[[], None]
    loader: str
    description: str
    dtype: torch.dtype = torch.float64
    write_metadata: MetadataFn | None = None


#: Registry of export formats; filled by :func:`register_export_format`.
EXPORT_FORMATS: dict[str, ExportFormat] = {}


def _nothing_required() -> None:
    return None


def register_export_format(
    name: str,
    *,
    suffix: str,
    loader: str,
    requires: Callable[[], None] = _nothing_required,
    description: str = "",
    dtype: torch.dtype = torch.float64,
    write_metadata: MetadataFn | None = None,
) -> Callable[[SaveFn], SaveFn]:
    """Decorator: register ``save(predictor, example_input, path)`` as format ``name``."""

    def decorator(save: SaveFn) -> SaveFn:
        EXPORT_FORMATS[name] = ExportFormat(name, suffix, save, requires, loader, description, dtype, write_metadata)
        return save

    return decorator


_TORCHSCRIPT_LOADER = """
predict = torch.jit.load(model_path, map_location="cpu")
runtime = "torch.jit.load (torch " + torch.__version__ + ")"
"""


def _jit_load(path: Path) -> Any:
    with warnings.catch_warnings():  # recent torch flags torch.jit as deprecated; the file is one
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _rewrite(path: Path, write: Callable[[Path], None]) -> None:
    """Write a new version of ``path`` next to it, then replace it (never reading and writing one file)."""
    # Same suffix: torch.export.save warns about an archive name not ending in .pt2.
    tmp = path.with_name(f"{path.stem}.meta-tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def _torchscript_metadata(path: Path, metadata: dict[str, str]) -> None:
    module = _jit_load(path)
    extra = {METADATA_NAME: json.dumps(metadata, sort_keys=True)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        _rewrite(path, lambda tmp: torch.jit.save(module, str(tmp), _extra_files=extra))


@register_export_format(
    "torchscript", suffix=".pt", loader=_TORCHSCRIPT_LOADER, description="TorchScript; load with torch.jit.load",
    write_metadata=_torchscript_metadata,
)
def _save_torchscript(predictor: CertifiedPredictor, example: Tensor, path: Path) -> None:
    # Traced, not scripted: the predictor has no data-dependent Python control flow, and the only
    # size the trace bakes in is the class count, so the TracerWarnings it may raise are expected
    # (the check runs other batch sizes).
    # Recent torch (2.13 here) flags torch.jit as deprecated; the caller asked for TorchScript by
    # name (the torch-export format is its successor), so that warning says nothing new here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        traced = torch.jit.trace(predictor, (example,), check_trace=False)
        torch.jit.save(traced, str(path))


def _exported_program(predictor: CertifiedPredictor, example: Tensor) -> torch.export.ExportedProgram:
    # min=1: the example has batch 2 only so that the exporter does not specialise on 1.
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(predictor, (example,), dynamic_shapes={"x": {0: batch}})


_TORCH_EXPORT_LOADER = """
predict = torch.export.load(model_path).module()
runtime = "torch.export.load (torch " + torch.__version__ + ")"
"""


def _torch_export_metadata(path: Path, metadata: dict[str, str]) -> None:
    program = torch.export.load(str(path))
    extra = {METADATA_NAME: json.dumps(metadata, sort_keys=True)}
    _rewrite(path, lambda tmp: torch.export.save(program, str(tmp), extra_files=extra))


@register_export_format(
    "torch-export", suffix=".pt2", loader=_TORCH_EXPORT_LOADER,
    description="torch.export ExportedProgram; load with torch.export.load(path).module()",
    write_metadata=_torch_export_metadata,
)
def _save_torch_export(predictor: CertifiedPredictor, example: Tensor, path: Path) -> None:
    torch.export.save(_exported_program(predictor, example), str(path))


_ONNX_LOADER = """
import numpy as np
import onnxruntime

# ONNX Runtime's CPU provider: the runtime the float32 allowance is stated for.
session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
runtime = "onnxruntime " + onnxruntime.__version__ + " (CPUExecutionProvider)"


def predict(x):
    label, radius = session.run(None, {"x": x.numpy()})
    return torch.from_numpy(np.asarray(label)), torch.from_numpy(np.asarray(radius))
"""


def _require_onnx() -> None:
    missing = []
    try:
        import onnx  # noqa: F401  (availability check only)
    except ImportError:
        missing.append("onnx")
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter translates with it)
    except ImportError:
        missing.append("onnxscript")
    try:
        import onnxruntime  # noqa: F401  (the export's own check runs the file with it)
    except ImportError:
        missing.append("onnxruntime")
    if missing:
        raise ImportError(
            f"ONNX export needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: {_EXTRA_HINT}"
        )


def _onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    _rewrite(path, lambda tmp: onnx.save(proto, str(tmp)))


@register_export_format(
    "onnx", suffix=".onnx", loader=_ONNX_LOADER, requires=_require_onnx, dtype=torch.float32,
    description="ONNX (float32 graph with a float32 rounding allowance, runs in ONNX Runtime); needs the [export] extra",
    write_metadata=_onnx_metadata,
)
def _save_onnx(predictor: CertifiedPredictor, example: Tensor, path: Path) -> None:
    torch.onnx.export(
        _exported_program(predictor, example),
        (example,),
        str(path),
        input_names=["x"],
        output_names=["label", "radius"],
        external_data=False,  # one self-contained file
        dynamo=True,
    )


def get_format(name: str) -> ExportFormat:
    """The registered format ``name``; ``ValueError`` listing the formats otherwise.

    >>> get_format("onnx").suffix, get_format("torchscript").dtype
    ('.onnx', torch.float64)
    >>> get_format("tflite")
    Traceback (most recent call last):
    ...
    ValueError: unknown export format 'tflite'; choose one of onnx, torch-export, torchscript
    """
    fmt = EXPORT_FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown export format {name!r}; choose one of {', '.join(sorted(EXPORT_FORMATS))}")
    return fmt

