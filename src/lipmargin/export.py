"""Export a trained run as a self-contained certified predictor (TorchScript or ONNX).

The exported model maps a batch of inputs to ``(label (B,) int64, radius (B,) float64)``: the
prediction and its certified L2 radius ``min_{j != c} (f_c - f_j) / L[c, j]``, computed in float64
with the run's *sound* pairwise Lipschitz matrix ``L`` baked in as a constant.  It needs neither
lipmargin nor the run folder.

Loading it (TorchScript; only ``torch`` is imported)::

    import torch
    m = torch.jit.load("model.pt")
    label, radius = m(x)  # x: (B, *in_shape) float pixels in [0, 1], as in training

Loading it (torch-export, the successor of TorchScript, which recent torch releases deprecate)::

    m = torch.export.load("model.pt2").module()
    label, radius = m(x)

Loading it (ONNX; input ``x`` float32, outputs ``label`` and ``radius``)::

    import onnxruntime as ort
    label, radius = ort.InferenceSession("model.onnx").run(None, {"x": x_numpy})

Every file names the weights it was built from (see :data:`METADATA_NAME`): TorchScript and
torch-export files hold an extra file ``lipmargin.json``, ONNX files the same keys as
``metadata_props``.  Reading it::

    extra = {"lipmargin.json": ""}
    torch.jit.load("model.pt", _extra_files=extra)            # or torch.export.load(path, extra_files=extra)
    json.loads(extra["lipmargin.json"])["checkpoint_sha256"]  # == sha256sum of the .safetensors file
    {p.key: p.value for p in onnx.load("model.onnx").metadata_props}

The ONNX graph computes in float64; onnxruntime's CPU provider has no float64 ``Conv`` kernel, so
conv models run with a runtime that has one (``onnx.reference.ReferenceEvaluator`` does).

``x`` is what :func:`lipmargin.data.to_float` makes of the dataset (uint8 images divided by 255);
a sample is certified at ``eps`` when its label is right and ``radius > eps``.  With
``check=True`` (the default) :func:`export_certified` proves the file right before writing it:
a fresh Python process that imports only torch (and onnx / onnxruntime for ONNX) loads the file
and runs it on the run's whole test split; its labels must equal those of
:func:`lipmargin.certify.certify` with the sound bound and its radii must agree to 1e-5 relative.
"""

from __future__ import annotations

import copy
import json
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

from lipmargin.certify import ModelBound, certified_radius, certify, model_bound
from lipmargin.checkpoint import CheckpointRef, fsync_directory
from lipmargin.data import load_dataset, to_float
from lipmargin.layers import GroupSort, MaxMin, Normalize
from lipmargin.lipschitz import flatten_layers
from lipmargin.models import LipschitzNet
from lipmargin.train import open_run

__all__ = [
    "EXPORT_FORMATS",
    "LAYER_EXPORTS",
    "CHECK_RTOL",
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

#: Largest relative difference allowed between an exported radius and the one of ``certify``.
CHECK_RTOL = 1e-5

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
    """``[max(a, b), min(a, b)]`` of the two channel halves (as :class:`lipmargin.layers.MaxMin`)."""

    def forward(self, x: Tensor) -> Tensor:
        half = x.shape[1] // 2
        a, b = x[:, :half], x[:, half:]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class _GroupSort(nn.Module):
    """Channels sorted descending within groups (as :class:`lipmargin.layers.GroupSort`)."""

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


def _export_linear(m: nn.Module) -> nn.Module:
    assert isinstance(m, nn.Linear)
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.float64)
    out.weight = nn.Parameter(_f64(m.weight), requires_grad=False)
    if m.bias is not None:
        out.bias = nn.Parameter(_f64(m.bias), requires_grad=False)
    return out


def _export_conv(m: nn.Module) -> nn.Module:
    assert isinstance(m, nn.Conv2d)
    out = nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,  # type: ignore[arg-type]
        m.dilation, m.groups, bias=m.bias is not None, padding_mode=m.padding_mode, dtype=torch.float64,
    )
    out.weight = nn.Parameter(_f64(m.weight), requires_grad=False)
    if m.bias is not None:
        out.bias = nn.Parameter(_f64(m.bias), requires_grad=False)
    return out


LayerExport = Callable[[nn.Module], nn.Module]

#: How each layer type becomes a plain float64 module; filled by :func:`register_layer_export`.
#: Look-ups use the exact type: a subclass may compute something else with the same weights.
LAYER_EXPORTS: dict[type, LayerExport] = {}


def register_layer_export(*types: type) -> Callable[[LayerExport], LayerExport]:
    """Decorator: ``convert(layer) -> plain float64 module`` for layers of exactly these types."""

    def decorator(convert: LayerExport) -> LayerExport:
        for t in types:
            LAYER_EXPORTS[t] = convert
        return convert

    return decorator


register_layer_export(nn.Linear)(_export_linear)
register_layer_export(nn.Conv2d)(_export_conv)
register_layer_export(nn.Flatten)(lambda m: nn.Flatten(m.start_dim, m.end_dim))  # type: ignore[arg-type]
register_layer_export(nn.ReLU)(lambda m: nn.ReLU())
register_layer_export(nn.Identity)(lambda m: nn.Identity())
register_layer_export(MaxMin)(lambda m: _MaxMin())
register_layer_export(GroupSort)(lambda m: _GroupSort(m.group_size))  # type: ignore[arg-type]
register_layer_export(Normalize)(lambda m: _Normalize(m.mean, m.std))  # type: ignore[arg-type]


def _export_layer(m: nn.Module) -> nn.Module:
    convert = LAYER_EXPORTS.get(type(m))
    if convert is not None:
        return convert(m)
    # Any other layer (a bounded model has a Lipschitz rule for each): a float64 copy in eval mode,
    # exactly what certify() evaluates; the exporters record its forward into the file, and the
    # check proves the file needs no lipmargin code.
    return copy.deepcopy(m).to(device="cpu", dtype=torch.float64).eval().requires_grad_(False)


class CertifiedPredictor(nn.Module):
    """``x -> (label (B,) int64, radius (B,) float64)`` with the pairwise bound as a constant.

    Holds float64 copies of the model's layers and the ``(C, C)`` float64 buffer ``pairwise``; the
    radius is :func:`lipmargin.certify.certified_radius` of the float64 logits.  Build it with
    :func:`build_predictor`.
    """

    pairwise: Tensor

    def __init__(self, features: nn.Sequential, head: nn.Linear, pairwise: Tensor, in_shape: Sequence[int]) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.register_buffer("pairwise", _f64(pairwise))
        self.in_shape = tuple(int(s) for s in in_shape)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.to(torch.float64)))  # (B, C) float64

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        radius, label = certified_radius(self.logits(x), self.pairwise)
        return label, radius


def build_predictor(model: LipschitzNet, bound: ModelBound) -> CertifiedPredictor:
    """A :class:`CertifiedPredictor` for ``model`` with ``bound.pairwise`` baked in (must be sound)."""
    if not bound.sound:
        raise ValueError(f"an exported certificate needs a sound bound; got method {bound.method!r}")
    if bound.pairwise.shape != (model.num_classes, model.num_classes):
        raise ValueError(
            f"the bound is {tuple(bound.pairwise.shape)} but the model has {model.num_classes} classes"
        )
    features = nn.Sequential(*[_export_layer(m) for m in flatten_layers(model.features)])
    head = _export_linear(model.head)
    assert isinstance(head, nn.Linear)
    return CertifiedPredictor(features, head, bound.pairwise, model.in_shape).eval().requires_grad_(False)


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
    ``write_metadata(path, metadata)``, when given, adds the checkpoint's name and SHA-256 to the
    saved file (before the check, so the check runs the final file).
    """

    name: str
    suffix: str
    save: SaveFn
    requires: Callable[[], None]
    loader: str
    description: str
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
    write_metadata: MetadataFn | None = None,
) -> Callable[[SaveFn], SaveFn]:
    """Decorator: register ``save(predictor, example_input, path)`` as format ``name``."""

    def decorator(save: SaveFn) -> SaveFn:
        EXPORT_FORMATS[name] = ExportFormat(name, suffix, save, requires, loader, description, write_metadata)
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
    # Traced, not scripted: the trace records the very certified_radius that certify() runs.  Its
    # only Python control flow is a shape check, and the only size it bakes in is the class count,
    # so the TracerWarnings it raises about them are expected (the check runs other batch sizes).
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

session = None
runtime = ""
try:
    import onnxruntime
except ImportError:
    onnxruntime = None
if onnxruntime is not None:
    try:
        session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        runtime = "onnxruntime " + onnxruntime.__version__
    except Exception as e:  # its CPU provider lacks float64 kernels (Conv)
        runtime = "onnxruntime could not load it (" + " ".join(str(e).split())[:200] + "); "
if session is None:
    from onnx.reference import ReferenceEvaluator

    session = ReferenceEvaluator(model_path)
    runtime += "onnx.reference.ReferenceEvaluator"


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
    "onnx", suffix=".onnx", loader=_ONNX_LOADER, requires=_require_onnx,
    description="ONNX (float64 graph); needs the [export] extra", write_metadata=_onnx_metadata,
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


def _relative_differences(radius: Tensor, reference: Tensor) -> Tensor:
    """``|r - r_ref| / |r_ref|`` per sample; 0 where equal (inf == inf), inf where incomparable."""
    rel = (radius - reference).abs() / reference.abs()
    rel = torch.where(radius == reference, torch.zeros_like(rel), rel)
    return torch.nan_to_num(rel, nan=float("inf"))


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
    over them (``None`` without a check); ``lipschitz`` is the baked sound bound's largest entry.
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
            split (labels equal, radii to :data:`CHECK_RTOL` relative).
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
    out = Path(out)
    emit = on_event or (lambda event: None)
    loaded = open_run(run_dir, "cpu", checkpoint=checkpoint)  # a damaged run fails before any progress line
    cfg, model, epoch = loaded.config, loaded.model, loaded.epoch
    emit({"event": "export", "stage": "computing the sound bound"})
    bound = model_bound(model, "sound")
    predictor = build_predictor(model, bound)
    example = torch.zeros(2, *model.in_shape)  # batch 2: no exporter may specialise on 1

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
            if test.in_shape != model.in_shape:
                raise ExportError(
                    f"dataset {cfg.data.name} has inputs of shape {test.in_shape} but the model expects {model.in_shape}"
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
            label, radius = result["label"], result["radius"]
            runtime = str(result["runtime"])
            if label.shape != reference.prediction.shape or radius.shape != reference.radius.shape:
                raise ExportError(
                    f"check failed: the exported {fmt} file returned {tuple(label.shape)} labels and "
                    f"{tuple(radius.shape)} radii for {reference.num_samples} test samples"
                )
            wrong = int((label != reference.prediction).sum())
            if wrong:
                raise ExportError(
                    f"check failed: the exported {fmt} file predicts a different label than certify() "
                    f"for {wrong} of {reference.num_samples} test samples"
                )
            rel = _relative_differences(radius, reference.radius)
            num_samples = reference.num_samples
            max_rel = float(rel.max()) if num_samples else 0.0
            if not max_rel <= CHECK_RTOL:
                bad = int((rel > CHECK_RTOL).sum())
                i = int(rel.argmax())
                raise ExportError(
                    f"check failed: the exported {fmt} file's radii differ from certify() by more than "
                    f"{CHECK_RTOL:g} relative for {bad} of {num_samples} test samples (worst: sample {i}, "
                    f"{float(radius[i])!r} vs {float(reference.radius[i])!r})"
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
