"""Export a trained run as a self-contained certified predictor (TorchScript or ONNX).

The exported model maps a batch of inputs to ``(label (B,) int64, radius (B,) float64)``: the
prediction and a certified L2 radius, ``min_{j != c} (f_c - f_j - k sqrt(2) err) / L[c, j]``
with the run's *sound* pairwise Lipschitz matrix ``L`` baked in as a constant and ``err`` a proven
bound of the floating-point error of the file's own forward pass, computed inside the graph
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
the run's whole test split; every radius must be <= the one of :func:`lipmargin.certify.certify`
with the sound bound, and the label equal wherever certify()'s radius is positive.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lipmargin.export.allowance import (
    ExactStep,
    build_step,
    down_to,
    final_factor,
    normalize_step,
    register_step_rule,
    up_to,
)
from lipmargin.certify import ModelBound, certify, model_bound
from lipmargin.checkpoint import CheckpointRef, fsync_directory
from lipmargin.data import load_dataset, to_float
from lipmargin.nn.activations import GroupSort, MaxMin, Normalize
from lipmargin.lipschitz import flatten_layers, operator_norm_bound
from lipmargin.lipschitz.rounding import SQRT2_UP, unit_roundoff
from lipmargin.models import LipschitzNet
from lipmargin.train import open_run

__all__ = [
    "EXPORT_FORMATS",
    "LAYER_EXPORTS",
    "ALLOWANCE_MULTIPLE",
    "METADATA_NAME",
    "export_metadata",
    "read_export_metadata",
    "ExportError",
    "ExportFormat",
    "ExportResult",
    "CertifiedPredictor",
    "register_export_format",
    "register_layer_export",
    "build_predictor",
    "export_certified",
]

_EXTRA_HINT = "pip install onnx onnxscript onnxruntime (or pip install -e '.[export]' in a lipmargin checkout)"

#: The name of the metadata in an exported file: an extra file in TorchScript / torch-export
#: archives (JSON text), absent in ONNX, whose ``metadata_props`` hold the same keys and values.
METADATA_NAME = "lipmargin.json"


class ExportError(ValueError):
    """The export failed or its check found a mismatch; the message is one line."""


# --------------------------------------------------------------------------------------------
# The predictor: plain float64 torch modules and the baked pairwise matrix
# --------------------------------------------------------------------------------------------


class _MaxMin(nn.Module):
    """``[max(a, b), min(a, b)]`` of the two channel halves (as :class:`lipmargin.nn.activations.MaxMin`)."""

    def forward(self, x: Tensor) -> Tensor:
        half = x.shape[1] // 2
        a, b = x[:, :half], x[:, half:]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class _GroupSort(nn.Module):
    """Channels sorted descending within groups (as :class:`lipmargin.nn.activations.GroupSort`)."""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        grouped = x.unflatten(1, (x.shape[1] // self.group_size, self.group_size))  # (B, G, g, ...)
        return grouped.sort(dim=2, descending=True).values.flatten(1, 2)


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with float64 buffers."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().to(torch.float64, copy=True))
        self.register_buffer("std", std.detach().to(torch.float64, copy=True))

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64, copy=True)


def _export_linear(m: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    assert isinstance(m, nn.Linear)
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
    out.weight = nn.Parameter(_f64(m.weight).to(dtype), requires_grad=False)
    if m.bias is not None:
        out.bias = nn.Parameter(_f64(m.bias).to(dtype), requires_grad=False)
    return out


def _export_conv(m: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    assert isinstance(m, nn.Conv2d)
    out = nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,  # type: ignore[arg-type]
        m.dilation, m.groups, bias=m.bias is not None, padding_mode=m.padding_mode, dtype=dtype,
    )
    out.weight = nn.Parameter(_f64(m.weight).to(dtype), requires_grad=False)
    if m.bias is not None:
        out.bias = nn.Parameter(_f64(m.bias).to(dtype), requires_grad=False)
    return out


LayerExport = Callable[[nn.Module, torch.dtype], nn.Module]

#: How each layer type becomes a plain module of the graph's dtype; filled by
#: :func:`register_layer_export`.  Look-ups use the exact type: a subclass may compute something
#: else with the same weights.  Each exported type also needs a forward-rounding step rule
#: (:data:`lipmargin.export.allowance.STEP_RULES`).
LAYER_EXPORTS: dict[type, LayerExport] = {}


def register_layer_export(*types: type) -> Callable[[LayerExport], LayerExport]:
    """Decorator: ``convert(layer, dtype) -> plain module`` for layers of exactly these types."""

    def decorator(convert: LayerExport) -> LayerExport:
        for t in types:
            LAYER_EXPORTS[t] = convert
        return convert

    return decorator


register_layer_export(nn.Linear)(_export_linear)
register_layer_export(nn.Conv2d)(_export_conv)
register_layer_export(nn.Flatten)(lambda m, dtype: nn.Flatten(m.start_dim, m.end_dim))  # type: ignore[arg-type]
register_layer_export(nn.ReLU)(lambda m, dtype: nn.ReLU())
register_layer_export(nn.Identity)(lambda m, dtype: nn.Identity())
register_layer_export(MaxMin)(lambda m, dtype: _MaxMin())
register_layer_export(GroupSort)(lambda m, dtype: _GroupSort(m.group_size))  # type: ignore[arg-type]
register_layer_export(Normalize)(lambda m, dtype: _Normalize(m.mean, m.std).to(dtype))  # type: ignore[arg-type]

# Layers computed exactly in floating point (max, min, sort, copies) and at most 1-Lipschitz: the
# forward error passes through unchanged.
register_step_rule(nn.ReLU, nn.Identity, nn.Flatten, _MaxMin, _GroupSort)(
    lambda layer, original, in_shape, out_shape, lip, dtype: ExactStep(layer)
)


@register_step_rule(_Normalize)
def _normalize_step(layer, original, in_shape, out_shape, lip, dtype):  # type: ignore[no-untyped-def]
    return normalize_step(layer, original.mean, original.std, out_shape, lip, dtype)


def _export_layer(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    convert = LAYER_EXPORTS.get(type(m))
    if convert is None:
        # Its forward could round in ways no rule accounts for: refuse rather than guess.
        supported = ", ".join(sorted(t.__name__ for t in LAYER_EXPORTS))
        raise TypeError(
            f"cannot export layer {type(m).__name__} ({m!r}) as a certified predictor: no export "
            f"conversion with a forward-rounding allowance; supported: {supported}"
        )
    return convert(m, dtype).to(device="cpu").eval().requires_grad_(False)


#: The exported radius subtracts this many times its own forward allowance, per graph dtype (see
#: :meth:`CertifiedPredictor.forward` for why this keeps it below certify()'s float64 radius).
ALLOWANCE_MULTIPLE = {torch.float64: 3, torch.float32: 2}


class CertifiedPredictor(nn.Module):
    """``x -> (label (B,) int64, radius (B,) float64)`` with the pairwise bound as a constant.

    Holds copies of the model's layers in the graph dtype (float64, or float32 for ONNX Runtime),
    each wrapped in a step of :mod:`lipmargin.export.allowance` that also updates a proven bound of the
    forward pass's rounding error, and the ``(C, C)`` pairwise bound rounded up to the dtype.  The
    radius is deflated by :data:`ALLOWANCE_MULTIPLE` times that error and every rounding of the
    radius formula is directed downwards.  Build it with :func:`build_predictor`.
    """

    pairwise: Tensor

    def __init__(
        self,
        steps: nn.ModuleList,
        head_step: nn.Module,
        pairwise: Tensor,
        in_shape: Sequence[int],
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.head_step = head_step
        self.head = head_step.layer  # the head Linear (shared with its step)
        self.dtype = dtype
        self.in_shape = tuple(int(s) for s in in_shape)
        # pairwise rounded up to the dtype, so the divisions below use values >= the float64 bound
        up = pairwise.detach().to(torch.float64).to(dtype)
        up = torch.where(up.to(torch.float64) < pairwise.to(torch.float64), torch.nextafter(up, torch.full_like(up, math.inf)), up)
        self.register_buffer("pairwise", up)
        u = unit_roundoff(dtype)
        self.register_buffer("factor", final_factor(len(steps) + 1, dtype))
        self.register_buffer("shrink", down_to(1.0 - 8.0 * u, dtype))  # exact for both dtypes
        multiple = ALLOWANCE_MULTIPLE[dtype]
        self.register_buffer("inflate", up_to(multiple * SQRT2_UP * (1.0 + 8.0 * u) * (1.0 + 1e-12), dtype))

    def logits_and_error(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits (B, C), err (B,))``: ``err`` bounds ``||logits - exact logits||_2``."""
        x = x.to(self.dtype)
        err = x.flatten(1)[:, 0] * 0.0  # (B,) zeros (nan for a non-finite input: radius 0)
        for step in self.steps:
            x, err = step(x, err)
        logits, err = self.head_step(x, err)
        return logits, err * self.factor

    def logits(self, x: Tensor) -> Tensor:
        return self.logits_and_error(x)[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Why the radius is <= certify()'s.  Let m* be a margin f_c - f_j of the exact network, m
        # the one computed here, m' the one certify() computes in float64, A >= sqrt(2) ||logit
        # error|| here and A' >= sqrt(2) ||logit error|| of certify's float64 pass, so that
        # |m - m*| <= A and |m' - m*| <= A'.  With k = ALLOWANCE_MULTIPLE the numerator here is at
        # most m - k A <= m* - (k - 1) A; certify's is at least m' - A' >= m* - 2 A' when it
        # deflates by its own allowance (and m' >= m* - A' when it does not).  So ours is the
        # smaller one whenever (k - 1) A >= 2 A'.
        # - float32 graph, k = 2: A >= 2 A' as A ~ 2**29 A' (unit roundoffs 2**-24 vs 2**-53 and
        #   gamma_{n+2} vs gamma_{n+1} on the same |W| |x| magnitudes, which differ only by the
        #   forward errors; if those were comparable to |x| the allowance would exceed the margin
        #   and the radius here would be 0 anyway).
        # - float64 graph, k = 3: A >= A' as both evaluate the same formula (rounding.py's
        #   gamma_{n+1} || |W| |x| + |b| ||, propagated by the same sound per-layer Lipschitz
        #   bounds), here with more inflation (gamma_{n+2}, the (1 + gamma) factors of the in-graph
        #   evaluation), at activations that agree with certify's up to both forward errors (a
        #   relative change ~ gamma |||W||| Lip, far below that inflation).
        # The pairwise rows are the same sound float64 bound (rounded up here) and every rounding
        # below is directed downwards.  The export's own check verifies the result on the whole
        # test split and refuses the file otherwise.
        logits, err = self.logits_and_error(x)  # (B, C), (B,)
        pred = logits.argmax(1)  # (B,)
        margin = logits.gather(1, pred.unsqueeze(1)) - logits  # (B, C), one rounding
        allowance = (err * self.inflate).unsqueeze(1)  # (B, 1), >= k sqrt(2) err
        num = ((margin * self.shrink - allowance) * self.shrink).clamp_min(0.0)
        rows = self.pairwise[pred]  # (B, C)
        safe = torch.where(rows > 0, rows, torch.ones_like(rows))
        ratio = num / safe * self.shrink
        inf = torch.full_like(ratio, math.inf)
        ratio = torch.where(rows > 0, ratio, torch.where(num > 0, inf, torch.zeros_like(ratio)))
        ratio = torch.where(torch.isnan(ratio), torch.zeros_like(ratio), ratio)
        classes = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)  # (1, C)
        ratio = torch.where(classes == pred.unsqueeze(1), inf, ratio)
        return pred, ratio.amin(1).to(torch.float64)


def build_predictor(model: LipschitzNet, bound: ModelBound, dtype: torch.dtype = torch.float64) -> CertifiedPredictor:
    """A :class:`CertifiedPredictor` for ``model`` with ``bound.pairwise`` baked in (must be sound).

    ``dtype`` is the graph's arithmetic (float64, or float32 for runtimes without float64
    kernels); ``TypeError`` names a layer that has no export conversion.
    """
    if not bound.sound:
        raise ValueError(f"an exported certificate needs a sound bound; got method {bound.method!r}")
    if bound.pairwise.shape != (model.num_classes, model.num_classes):
        raise ValueError(
            f"the bound is {tuple(bound.pairwise.shape)} but the model has {model.num_classes} classes"
        )
    unit_roundoff(dtype)  # refuses unsupported dtypes
    originals = [*flatten_layers(model.features), model.head]
    steps = []
    x = torch.zeros(1, *model.in_shape, dtype=torch.float64)
    with torch.no_grad():
        for original in originals:
            m64 = copy.deepcopy(original).to(device="cpu", dtype=torch.float64).eval()
            in_shape = tuple(x.shape[1:])
            x = m64(x)
            layer = _export_layer(original, dtype)
            lip = operator_norm_bound(m64, in_shape)
            steps.append(build_step(layer, m64, in_shape, tuple(x.shape[1:]), lip, dtype))
    predictor = CertifiedPredictor(nn.ModuleList(steps[:-1]), steps[-1], bound.pairwise, model.in_shape, dtype)
    return predictor.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------

SaveFn = Callable[[CertifiedPredictor, Tensor, Path], None]
#: ``write_metadata(path, metadata)`` adds ``metadata`` (str -> str) to a file ``save`` wrote.
MetadataFn = Callable[[Path, dict[str, str]], None]


def export_metadata(checkpoint: CheckpointRef, fmt: str) -> dict[str, str]:
    """The metadata written into an exported file: which checkpoint it was built from.

    ``checkpoint_sha256`` is the SHA-256 of the checkpoint's ``.safetensors`` file bytes (what
    ``sha256sum`` prints); ``checkpoint_file`` its name; ``checkpoint_epoch`` its epoch.
    """
    from lipmargin import __version__

    return {
        "checkpoint_file": checkpoint.path.name,
        "checkpoint_epoch": str(checkpoint.epoch),
        "checkpoint_sha256": checkpoint.sha256,
        "format": fmt,
        "lipmargin_version": __version__,
    }


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a file written by :func:`export_certified` (any registered format)."""
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
    tmp = path.with_name(f"{path.name}.meta.tmp")
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


def _format(name: str) -> ExportFormat:
    fmt = EXPORT_FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown export format {name!r}; choose one of {', '.join(sorted(EXPORT_FORMATS))}")
    return fmt


# --------------------------------------------------------------------------------------------
# The check in a fresh process
# --------------------------------------------------------------------------------------------

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


def _run_fresh_process(fmt: ExportFormat, model_path: Path, inputs: Tensor, batch_size: int, work: Path) -> dict:
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
    epoch: int
    runtime: str | None  # what loaded the file in the check
    checkpoint: CheckpointRef | None = None  # the weights exported (also in the file's metadata)


def export_certified(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    check: bool = True,
    batch_size: int = 1000,
    checkpoint: str | Path | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> ExportResult:
    """Export the run's newest checkpoint (or ``checkpoint``) as a certified predictor in format ``fmt``.

    Args:
        run_dir: a run folder written by :func:`lipmargin.train.fit`.
        fmt: a name in :data:`EXPORT_FORMATS`: ``torchscript``, ``torch-export`` or ``onnx``.
        out: the file to write; it appears only after the check passed (written atomically).
        check: load the file in a fresh process and compare it with ``certify`` on the whole test
            split: every radius must be <= certify()'s and the label equal wherever certify()'s
            radius is positive (:func:`check_against_certify`).
        batch_size: samples per forward pass in the check.
        checkpoint: a checkpoint name (``epoch-000001``) or file instead of the newest; a damaged
            newest checkpoint is an error, never a reason to export an older one.
        on_event: receives ``{"event": "export", "stage": text}`` as each stage begins.

    The file's metadata (:func:`read_export_metadata`) names the checkpoint and its SHA-256.

    Raises:
        ValueError: unknown format or bad ``batch_size``.
        ImportError: the format needs an extra that is not installed.
        ExportError: the check failed (nothing is written, an existing ``out`` is left alone).
        CheckpointError / DatasetError: an unusable run folder (a damaged newest checkpoint) or
            missing test data.
    """
    exporter = _format(fmt)
    exporter.requires()
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    # Absolute: the check process runs inside the staging folder, where a relative path would
    # point somewhere else.
    out = Path(out).absolute()
    emit = on_event or (lambda event: None)
    loaded = open_run(run_dir, "cpu", checkpoint=checkpoint)  # a damaged run fails before any progress line
    cfg, model, epoch = loaded.config, loaded.model, loaded.epoch
    emit({"event": "export", "stage": "computing the sound bound"})
    bound = model_bound(model, "sound")
    try:
        predictor = build_predictor(model, bound, exporter.dtype)
    except TypeError as e:
        raise ExportError(str(e)) from None
    example = torch.zeros(2, *model.in_shape, dtype=torch.float32)  # batch 2: no exporter may specialise on 1

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp).resolve()  # the check runs with cwd=work: every path it gets must be absolute
        staged = work / f"model{exporter.suffix}"
        emit({"event": "export", "stage": f"writing the {fmt} file"})
        exporter.save(predictor, example, staged)
        if exporter.write_metadata is not None:
            exporter.write_metadata(staged, export_metadata(loaded.checkpoint, fmt))
        num_samples, max_rel, runtime = 0, None, None
        if check:
            test = load_dataset(cfg.data.name, cfg.data.root, "test")
            if test.input_shape != model.in_shape:
                raise ExportError(
                    f"dataset {cfg.data.name} has inputs of shape {test.input_shape} but the model expects {model.in_shape}"
                )
            # The reference recomputes the sound bound itself, so a wrong baked bound is caught.
            batches = [
                (to_float(test.inputs[i : i + batch_size]), test.labels[i : i + batch_size])
                for i in range(0, len(test), batch_size)
            ]
            emit({"event": "export", "stage": f"certifying the {len(test)} test samples for the check"})
            reference = certify(model, batches, [], method="sound")
            emit({"event": "export", "stage": f"running the {fmt} file on them in a fresh process"})
            result = _run_fresh_process(exporter, staged, test.inputs, batch_size, work)
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
        epoch=epoch,
        runtime=runtime,
        checkpoint=loaded.checkpoint,
    )
