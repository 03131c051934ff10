"""Export a trained model as a self-contained certified predictor (TorchScript, torch.export or ONNX).

The exported model maps a batch of inputs to ``(label (B,) int64, radius (B,) float64)``: the
prediction and a certified L2 radius, ``min_{j != c} (f_c - f_j - k sqrt(2) err) / L[c, j]``
with the model's *sound* pairwise Lipschitz matrix ``L`` baked in as a constant and ``err`` a
proven bound of the floating-point error of the file's own forward pass, computed inside the graph
(:mod:`lipmargin.export.allowance`; ``k`` = 3 in float64, 2 in float32, :data:`ALLOWANCE_MULTIPLE`);
every rounding of the radius formula is directed downwards, so the file's radius is never larger
than the radius of the exact network nor than certify()'s.  It needs neither lipmargin nor the
run folder.

Loading it (TorchScript, float64 graph; only ``torch`` is imported)::

    import torch
    m = torch.jit.load("model.pt")
    label, radius = m(x)  # x: (B, *in_shape) float pixels in [0, 1], as in training

Loading it (torch-export, float64 graph; the successor of TorchScript)::

    m = torch.export.load("model.pt2").module()
    label, radius = m(x)

Loading it (ONNX, float32 graph; input ``x`` float32, outputs ``label`` and ``radius``)::

    import onnxruntime as ort
    label, radius = ort.InferenceSession("model.onnx").run(None, {"x": x_numpy})

Every file names the weights it was built from (see :data:`METADATA_NAME`): TorchScript and
torch-export files hold an extra file ``lipmargin.json``, ONNX files the same keys as
``metadata_props``.  Reading it::

    extra = {"lipmargin.json": ""}
    torch.jit.load("model.pt", _extra_files=extra)            # or torch.export.load(path, extra_files=extra)
    json.loads(extra["lipmargin.json"])["checkpoint_sha256"]  # == sha256sum of the .safetensors file
    {p.key: p.value for p in onnx.load("model.onnx").metadata_props}

The ONNX graph computes in float32 (ONNX Runtime's CPU provider has no float64 ``Conv``) and its
radius is deflated by the float32 allowance, about ``2**29`` times certify()'s float64 one.

Assumptions of the allowance: IEEE 754 arithmetic in the graph's dtype (round to nearest, no
denormals-are-zero), no TF32 / reduced-precision matmul, convolutions evaluated as sums of
products (no Winograd or FFT algorithms), ONNX files run by ONNX Runtime's CPU provider.

``x`` is what :func:`lipmargin.data.to_float` makes of the dataset (uint8 images divided by 255);
a sample is certified at ``eps`` when its label is right and ``radius > eps``.  With
``check=True`` (the default) :func:`export_certified` checks the file before writing it: a fresh
Python process that imports only torch (and onnxruntime for ONNX) loads the file and runs it on
the given test inputs; every radius must be <= the one of :func:`lipmargin.certify.certify`
with the sound bound, and the label equal wherever certify()'s radius is positive.

:func:`export_certified` takes a model in memory (this package never opens run folders; see
:mod:`lipmargin.export.api` for exporting a run from Python).

Modules: :mod:`~lipmargin.export.predictor` (CertifiedPredictor, build_predictor, the layer
export registry), :mod:`~lipmargin.export.allowance` (the in-graph forward-rounding allowance),
:mod:`~lipmargin.export.formats` (the ExportFormat registry: TorchScript, torch.export, ONNX;
metadata), :mod:`~lipmargin.export.check` (check_against_certify, the fresh-process check),
:mod:`~lipmargin.export.api` (export_certified, ExportResult).
"""
from __future__ import annotations

from lipmargin.export.api import ExportResult, export_certified, export_metadata
from lipmargin.export.check import ExportError, check_against_certify
from lipmargin.export.formats import (
    EXPORT_FORMATS,
    METADATA_NAME,
    ExportFormat,
    get_format,
    read_export_metadata,
    register_export_format,
)
from lipmargin.export.predictor import (
    ALLOWANCE_MULTIPLE,
    LAYER_EXPORTS,
    CertifiedPredictor,
    build_predictor,
    register_layer_export,
)

__all__ = [
    "EXPORT_FORMATS",
    "LAYER_EXPORTS",
    "ALLOWANCE_MULTIPLE",
    "METADATA_NAME",
    "export_metadata",
    "read_export_metadata",
    "ExportError",
    "ExportFormat",
    "get_format",
    "ExportResult",
    "CertifiedPredictor",
    "register_export_format",
    "register_layer_export",
    "build_predictor",
    "check_against_certify",
    "export_certified",
]
