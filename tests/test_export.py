"""Certified export: the written file alone reproduces certify(), and a wrong file is never written."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lipmargin.certify import certified_radius, certify, model_bound
from lipmargin.data import load_dataset, to_float
from lipmargin.export import (
    CHECK_RTOL,
    EXPORT_FORMATS,
    ExportError,
    ExportResult,
    build_predictor,
    export_certified,
)
from lipmargin.layers import GroupSort, MaxMin, Normalize
from lipmargin.models import LipschitzNet
from lipmargin.train import load_run

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch CLL run of the 2C2F conv net on the 8x8 digits (read-only)."""
    from lipmargin.cli import main

    out = tmp_path_factory.mktemp("digits_run") / "run"
    code = main(["train", "--preset", "digits-cll", "--set", "train.epochs=1", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def exported(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExportResult]:
    path = tmp_path_factory.mktemp("export") / "digits.pt"
    return path, export_certified(digits_run, "torchscript", path)


# The check a user would run: nothing but torch, in a new interpreter (-I: no PYTHONPATH, no cwd).
_LOAD_WITHOUT_LIPMARGIN = textwrap.dedent(
    """
    import sys
    import torch

    model_path, inputs_path, result_path = sys.argv[1:4]
    torch.set_num_threads(1)
    m = torch.jit.load(model_path)
    x = torch.load(inputs_path, weights_only=True)
    label, radius = m(x)
    # Batch size must not matter: samples one at a time and in odd chunks give the same answers.
    one = [m(x[i : i + 1]) for i in range(5)]
    chunks = [m(c) for c in x.split(7)]
    assert "lipmargin" not in sys.modules, sorted(k for k in sys.modules if k.startswith("lipmargin"))
    torch.save(
        {
            "label": label,
            "radius": radius,
            "one_label": torch.cat([o[0] for o in one]),
            "one_radius": torch.cat([o[1] for o in one]),
            "chunk_label": torch.cat([c[0] for c in chunks]),
            "chunk_radius": torch.cat([c[1] for c in chunks]),
        },
        result_path,
    )
    """
)


def test_export_result_describes_the_check(digits_run: Path, exported: tuple[Path, ExportResult]) -> None:
    path, result = exported
    _, model, epoch = load_run(digits_run)
    assert result.path == path and path.is_file()
    assert result.format == "torchscript"
    assert result.num_samples == len(load_dataset("digits", None, "test")) == 360
    assert result.max_relative_difference is not None and 0.0 <= result.max_relative_difference <= CHECK_RTOL
    assert result.lipschitz == model_bound(model, "sound").lipschitz
    assert result.epoch == epoch == 1
    assert result.runtime is not None and result.runtime.startswith("torch.jit.load")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left over


def test_torchscript_file_matches_certify_without_lipmargin(
    digits_run: Path, exported: tuple[Path, ExportResult], tmp_path: Path
) -> None:
    path, _ = exported
    _, model, _ = load_run(digits_run)
    test = load_dataset("digits", None, "test")
    x = to_float(test.inputs)  # (360, 1, 8, 8) float32 in [0, 1]
    reference = certify(model, [(x, test.labels)], [], method="sound")
    torch.save(x, tmp_path / "inputs.pt")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _LOAD_WITHOUT_LIPMARGIN, str(path), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["label"].dtype == torch.int64 and out["radius"].dtype == torch.float64
    assert torch.equal(out["label"], reference.prediction)
    torch.testing.assert_close(out["radius"], reference.radius, rtol=CHECK_RTOL, atol=0.0)
    assert torch.equal(out["one_label"], reference.prediction[:5])
    torch.testing.assert_close(out["one_radius"], reference.radius[:5], rtol=CHECK_RTOL, atol=0.0)
    assert torch.equal(out["chunk_label"], reference.prediction)
    torch.testing.assert_close(out["chunk_radius"], reference.radius, rtol=CHECK_RTOL, atol=0.0)


def _every_layer_net() -> LipschitzNet:
    """A net with every layer type the exporter knows: Normalize, Conv2d, GroupSort, Flatten, Linear, MaxMin, ReLU."""
    torch.manual_seed(3)
    features = nn.Sequential(
        Normalize([0.5], [0.25]),
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        GroupSort(2),
        nn.Flatten(),
        nn.Linear(64, 8),
        MaxMin(),
        nn.Identity(),
        nn.ReLU(),
    )
    return LipschitzNet(features, nn.Linear(8, 3), (1, 8, 8))


@pytest.mark.parametrize("zero_bound", [False, True], ids=["sound-bound", "zero-bound"])
def test_saved_predictor_computes_certified_radius(tmp_path: Path, zero_bound: bool) -> None:
    """Float64 logits of the original layers, radius exactly certified_radius (zero bound: inf)."""
    model = _every_layer_net()
    bound = model_bound(model, "sound")
    if zero_bound:  # constant logit differences never limit the radius
        bound = dataclasses.replace(bound, pairwise=torch.zeros_like(bound.pairwise))
    predictor = build_predictor(model, bound)
    path = tmp_path / "m.pt"
    EXPORT_FORMATS["torchscript"].save(predictor, torch.zeros(2, 1, 8, 8), path)
    loaded = torch.jit.load(str(path))
    x = torch.rand(64, 1, 8, 8)
    label, radius = loaded(x)
    expected_radius, expected_label = certified_radius(model.double()(x.double()), bound.pairwise)
    assert torch.equal(label, expected_label)
    torch.testing.assert_close(radius, expected_radius, rtol=1e-12, atol=0.0)
    assert torch.isinf(radius).all() == zero_bound


def test_tampered_bound_fails_the_check_and_writes_nothing(
    digits_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bake half the sound bound: radii double, the fresh-process check refuses the file."""
    import lipmargin.export as export

    def halved(model: LipschitzNet, method: str = "sound"):
        bound = model_bound(model, method)
        return dataclasses.replace(bound, pairwise=bound.pairwise / 2)

    monkeypatch.setattr(export, "model_bound", halved)
    out = tmp_path / "digits.pt"
    with pytest.raises(ExportError, match=r"radii differ from certify\(\)") as info:
        export_certified(digits_run, "torchscript", out)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_file_fails_the_check_and_keeps_an_existing_export(
    digits_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A saver that writes a different model than it was given: labels differ in the fresh process."""
    fmt = EXPORT_FORMATS["torchscript"]

    def save_shifted(predictor, example, path) -> None:
        with torch.no_grad():
            predictor.head.bias[0] += 1e3  # class 0 wins everywhere
        fmt.save(predictor, example, path)

    monkeypatch.setitem(EXPORT_FORMATS, "torchscript", dataclasses.replace(fmt, save=save_shifted))
    out = tmp_path / "digits.pt"
    out.write_bytes(b"an earlier export")
    with pytest.raises(ExportError, match="predicts a different label than certify"):
        export_certified(digits_run, "torchscript", out)
    assert out.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["digits.pt"]


def test_torch_export_format_passes_the_check(digits_run: Path, tmp_path: Path) -> None:
    result = export_certified(digits_run, "torch-export", tmp_path / "m.pt2")
    assert result.num_samples == 360 and result.max_relative_difference <= CHECK_RTOL
    assert result.runtime is not None and result.runtime.startswith("torch.export.load")
    label, radius = torch.export.load(str(result.path)).module()(torch.rand(1, 1, 8, 8))
    assert label.shape == radius.shape == (1,)


def test_unchecked_export_loads(digits_run: Path, tmp_path: Path) -> None:
    result = export_certified(digits_run, "torchscript", tmp_path / "sub" / "m.pt", check=False)
    assert result.num_samples == 0 and result.max_relative_difference is None and result.runtime is None
    label, radius = torch.jit.load(str(result.path))(torch.rand(3, 1, 8, 8))
    assert label.shape == radius.shape == (3,)


def test_unknown_format_lists_the_formats(tmp_path: Path) -> None:
    # Checked before the run folder is even read.
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'; choose one of onnx, torch-export, torchscript"):
        export_certified(tmp_path / "no-such-run", "tflite", tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_bad_batch_size(digits_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        export_certified(digits_run, "torchscript", tmp_path / "m.pt", batch_size=0)


def test_other_layers_keep_their_own_forward(tmp_path: Path) -> None:
    """A layer without a plain conversion is copied as is: a subclass of nn.Identity that halves."""

    class Half(nn.Identity):  # bounded through nn.Identity's rule (1 >= 1/2)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * x

    model = LipschitzNet(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), Half()), nn.Linear(8, 3), (1, 8, 8))
    bound = model_bound(model, "sound")
    path = tmp_path / "m.pt"
    EXPORT_FORMATS["torchscript"].save(build_predictor(model, bound), torch.zeros(2, 1, 8, 8), path)
    x = torch.rand(16, 1, 8, 8)
    label, radius = torch.jit.load(str(path))(x)
    expected_radius, expected_label = certified_radius(model.double()(x.double()), bound.pairwise)
    assert torch.equal(label, expected_label)
    torch.testing.assert_close(radius, expected_radius, rtol=1e-12, atol=0.0)


def test_an_unsound_bound_is_refused() -> None:
    model = _every_layer_net()
    with pytest.raises(ValueError, match="needs a sound bound"):
        build_predictor(model, model_bound(model, "power"))


_HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


@pytest.mark.skipif(_HAS_ONNX, reason="onnx and onnxscript are installed")
def test_onnx_without_the_extra_names_it(digits_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ImportError, match=r"pip install onnx onnxscript onnxruntime \(or pip install -e '\.\[export\]'"):
        export_certified(digits_run, "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_onnx_export_matches_certify(digits_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    result = export_certified(digits_run, "onnx", tmp_path / "m.onnx")
    assert result.num_samples == 360 and result.max_relative_difference <= CHECK_RTOL
    assert result.path.is_file()
