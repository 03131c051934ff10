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
    EXPORT_FORMATS,
    ExportError,
    ExportResult,
    build_predictor,
    check_against_certify,
    export_certified,
)
from lipmargin.nn.activations import GroupSort, MaxMin, Normalize
from lipmargin.models import LipschitzNet
from lipmargin.train import load_run, open_run

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

# A float64 graph deflates its radius by its forward-rounding allowance: ~1e-11 absolute here,
# up to ~1e-8 relative for the smallest radii.
DEFLATION_RTOL = 1e-6


def _assert_one_sided(radius: torch.Tensor, reference: torch.Tensor) -> None:
    """Never larger than the reference, and smaller by at most 1e-10 (the float64 allowance)."""
    assert bool((radius <= reference).all())
    torch.testing.assert_close(radius, reference, rtol=0.0, atol=1e-10)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch CLL run of the 2C2F conv net on the 8x8 digits (read-only)."""
    from lipmargin.cli import main

    out = tmp_path_factory.mktemp("digits_run") / "run"
    code = main(["train", "--preset", "digits-cll", "--set", "train.epochs=1", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def _export_run(run: Path, fmt: str, out: Path, **kwargs: object) -> ExportResult:
    """What `lipmargin export RUN` does: open the run, export its model checked on its test split."""
    loaded = open_run(run, "cpu")
    test = load_dataset(loaded.config.data.name, loaded.config.data.root, "test")
    return export_certified(loaded.model, fmt, out, test_inputs=test.inputs, checkpoint=loaded.checkpoint, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def exported(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExportResult]:
    path = tmp_path_factory.mktemp("export") / "digits.pt"
    return path, _export_run(digits_run, "torchscript", path)


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
    assert result.max_relative_difference is not None and 0.0 <= result.max_relative_difference <= DEFLATION_RTOL
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
    _assert_one_sided(out["radius"], reference.radius)
    assert torch.equal(out["one_label"], reference.prediction[:5])
    _assert_one_sided(out["one_radius"], reference.radius[:5])
    assert torch.equal(out["chunk_label"], reference.prediction)
    _assert_one_sided(out["chunk_radius"], reference.radius)


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
    """Float64 logits of the original layers, radius certified_radius deflated by ~1e-13 (zero bound: inf)."""
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
    _assert_one_sided(radius, expected_radius)
    assert torch.isinf(radius).all() == zero_bound


def test_tampered_bound_fails_the_check_and_writes_nothing(
    digits_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bake half the sound bound: radii double, the fresh-process check refuses the file."""
    import lipmargin.export.api as export_api

    def halved(model: LipschitzNet, method: str = "sound", **kwargs: object):
        bound = model_bound(model, method, **kwargs)  # type: ignore[arg-type]
        return dataclasses.replace(bound, pairwise=bound.pairwise / 2)  # same weights: same fingerprint

    monkeypatch.setattr(export_api, "model_bound", halved)
    out = tmp_path / "digits.pt"
    with pytest.raises(ExportError, match=r"claims a larger radius than certify\(\) for \d+ of 360") as info:
        _export_run(digits_run, "torchscript", out)
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
    with pytest.raises(ExportError, match="check failed: the exported torchscript file"):
        _export_run(digits_run, "torchscript", out)
    assert out.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["digits.pt"]


def test_torch_export_format_passes_the_check(digits_run: Path, tmp_path: Path) -> None:
    result = _export_run(digits_run, "torch-export", tmp_path / "m.pt2")
    assert result.num_samples == 360 and result.max_relative_difference <= DEFLATION_RTOL
    assert result.runtime is not None and result.runtime.startswith("torch.export.load")
    label, radius = torch.export.load(str(result.path)).module()(torch.rand(1, 1, 8, 8))
    assert label.shape == radius.shape == (1,)


def test_unchecked_export_loads(digits_run: Path, tmp_path: Path) -> None:
    result = _export_run(digits_run, "torchscript", tmp_path / "sub" / "m.pt", check=False)
    assert result.num_samples == 0 and result.max_relative_difference is None and result.runtime is None
    label, radius = torch.jit.load(str(result.path))(torch.rand(3, 1, 8, 8))
    assert label.shape == radius.shape == (3,)


def test_unknown_format_lists_the_formats(tmp_path: Path) -> None:
    # Checked before anything is computed.
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'; choose one of onnx, torch-export, torchscript"):
        export_certified(_every_layer_net(), "tflite", tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_bad_batch_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        export_certified(_every_layer_net(), "torchscript", tmp_path / "m.pt", test_inputs=torch.rand(4, 1, 8, 8), batch_size=0)


def test_a_check_without_test_inputs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="check=True needs test_inputs"):
        export_certified(_every_layer_net(), "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_layer_without_an_export_rule_is_refused(digits_run: Path) -> None:
    """A subclass computes something else: no conversion, no rounding rule, refused by name."""

    class Half(nn.Identity):  # bounded through nn.Identity's rule (1 >= 1/2)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * x

    model = LipschitzNet(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), Half()), nn.Linear(8, 3), (1, 8, 8))
    with pytest.raises(TypeError, match="cannot export layer Half"):
        build_predictor(model, model_bound(model, "sound"))


def test_a_stale_bound_is_refused(tmp_path: Path) -> None:
    """A bound remembers the weights it was computed from (its fingerprint): after the weights
    change, baking the old bound in is refused, by build_predictor and by export_certified."""
    model = _every_layer_net()
    stale = model_bound(model, "sound")
    with torch.no_grad():
        model.head.weight.mul_(4.0)  # every f_i - f_j scales by 4: the old numbers no longer hold
    fresh = model_bound(model, "sound")
    torch.testing.assert_close(fresh.pairwise, 4 * stale.pairwise, rtol=1e-12, atol=0.0)
    with pytest.raises(ValueError, match="other weights"):
        build_predictor(model, stale)
    with pytest.raises(ValueError, match="other weights"):
        export_certified(model, "torchscript", tmp_path / "m.pt", bound=stale, check=False)
    assert list(tmp_path.iterdir()) == []
    assert build_predictor(model, fresh).pairwise.shape == (3, 3)  # the current bound is accepted


def test_a_model_in_memory_is_exported_and_left_unchanged(tmp_path: Path) -> None:
    """No run folder: the model, test inputs and no checkpoint; the caller's model keeps its
    mode, dtype and weights, and the file's metadata names no checkpoint."""
    from lipmargin.export import read_export_metadata

    model = _every_layer_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(24, 1, 8, 8)
    result = export_certified(model, "torchscript", tmp_path / "m.pt", test_inputs=x, batch_size=7)
    assert model.training and model.head.weight.dtype == torch.float32
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert result.num_samples == 24 and result.epoch is None and result.checkpoint is None
    meta = read_export_metadata(result.path)
    assert meta["format"] == "torchscript" and not any(k.startswith("checkpoint") for k in meta)
    label, radius = torch.jit.load(str(result.path))(x)
    reference = certify(model, [(x, torch.zeros(24, dtype=torch.long))], [], method="sound")
    assert torch.equal(label, reference.prediction)
    _assert_one_sided(radius, reference.radius)


def test_a_model_without_features_and_head_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ExportError, match="cannot export Sequential.*no features, head, in_shape, num_classes"):
        export_certified(model, "torchscript", tmp_path / "m.pt", check=False)
    assert list(tmp_path.iterdir()) == []


def test_an_unsound_bound_is_refused() -> None:
    model = _every_layer_net()
    with pytest.raises(ValueError, match="needs a sound bound"):
        build_predictor(model, model_bound(model, "power"))


_HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.mark.skipif(_HAS_ONNX, reason="onnx, onnxscript and onnxruntime are installed")
def test_onnx_without_the_extra_names_it(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match=r"pip install onnx onnxscript onnxruntime \(or pip install -e '\.\[export\]'"):
        export_certified(_every_layer_net(), "onnx", tmp_path / "m.onnx", check=False)
    assert list(tmp_path.iterdir()) == []


def test_onnx_float32_file_runs_in_onnxruntime_below_certify(digits_run: Path, tmp_path: Path) -> None:
    """Issue 20 item 5: a conv model's ONNX file loads in ONNX Runtime's CPU provider, and its
    float32 radii are <= certify()'s float64 radii on the whole test split."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    result = _export_run(digits_run, "onnx", tmp_path / "m.onnx")
    assert result.num_samples == 360 and result.runtime is not None and result.runtime.startswith("onnxruntime")
    _, model, _ = load_run(digits_run)
    test = load_dataset("digits", None, "test")
    x = to_float(test.inputs)
    reference = certify(model, [(x, test.labels)], [], method="sound")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    label, radius = session.run(None, {"x": x.numpy()})
    label, radius = torch.from_numpy(label), torch.from_numpy(radius)
    assert radius.dtype == torch.float64 and label.dtype == torch.int64
    assert bool((radius <= reference.radius).all())
    certified = reference.radius > 0
    assert torch.equal(label[certified], reference.prediction[certified])
    # deflated by the float32 allowance only (2 sqrt(2) err / L, ~2% here): the radii stay useful
    assert float(((reference.radius - radius) / reference.radius)[certified].median()) < 0.1
    assert float((reference.radius - radius).max()) < 0.02
    assert float((radius > 0).float().mean()) >= 0.9 * float(certified.float().mean())


def test_relative_out_path(digits_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lipmargin export RUN --format torchscript --out m.pt` from another folder (issue 13)."""
    from lipmargin.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    assert main(["export", str(digits_run), "--format", "torchscript", "--out", "m.pt"]) == 0
    assert main(["export", str(digits_run), "--format", "torchscript", "--out", "sub/n.pt", "--no-check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["n.pt"]
    label, radius = torch.jit.load(str(tmp_path / "m.pt"))(torch.rand(2, 1, 8, 8))
    assert label.shape == radius.shape == (2,)


def test_one_sided_check() -> None:
    ref_label = torch.tensor([0, 1, 2, 1])
    ref_radius = torch.tensor([0.5, 0.0, 0.25, float("inf")], dtype=torch.float64)
    # smaller radii, a different label where certify() certifies nothing: accepted
    label = torch.tensor([0, 2, 2, 1])
    radius = torch.tensor([0.4, 0.0, 0.25, 3.0], dtype=torch.float64)
    assert check_against_certify(label, radius, ref_label, ref_radius, "f") == pytest.approx(1.0)
    with pytest.raises(ExportError, match=r"claims a larger radius than certify\(\) for 1 of 4 test samples \(first: sample 2"):
        check_against_certify(label, radius + torch.tensor([0, 0, 1e-16, 0]), ref_label, ref_radius, "f")
    with pytest.raises(ExportError, match="larger radius"):
        check_against_certify(label, torch.full((4,), float("nan"), dtype=torch.float64), ref_label, ref_radius, "f")
    with pytest.raises(ExportError, match="different label than certify"):
        check_against_certify(torch.tensor([0, 1, 0, 1]), radius, ref_label, ref_radius, "f")


def test_float32_graph_error_bound_covers_its_rounding() -> None:
    """err >= ||logits(float32 graph) - exact logits||, with the float64 model as the reference (its
    own error, ~1e-15, is far below the float32 allowance), on every exported layer type."""
    model = _every_layer_net()
    predictor = build_predictor(model, model_bound(model, "sound"), torch.float32)
    x = torch.rand(32, 1, 8, 8)
    logits, err = predictor.logits_and_error(x)
    assert logits.dtype == torch.float32 and err.dtype == torch.float32
    gap = (logits.double() - model.double()(x.double())).norm(dim=1)
    assert bool((gap > 0).any()) and bool((gap <= err.double()).all())
    assert float(err.max()) < 1e-4


def test_float64_graph_error_bound_against_exact_rationals() -> None:
    """err >= ||logits(float64 graph) - exact logits|| for a Linear-ReLU-Linear net, exactly."""
    from fractions import Fraction

    torch.manual_seed(1)
    model = LipschitzNet(nn.Sequential(nn.Linear(6, 10), nn.ReLU()), nn.Linear(10, 3), (6,)).double()
    predictor = build_predictor(model, model_bound(model, "sound"))
    x = torch.randn(5, 6, dtype=torch.float64) * 1e3
    logits, err = predictor.logits_and_error(x)

    def exact(layer: nn.Linear, rows: list) -> list:
        w = [[Fraction(float(v)) for v in r] for r in layer.weight.detach()]
        b = [Fraction(float(v)) for v in layer.bias.detach()]
        return [[sum((wi[k] * r[k] for k in range(len(r))), b[i]) for i, wi in enumerate(w)] for r in rows]

    h = exact(model.features[0], [[Fraction(float(v)) for v in r] for r in x])
    h = [[max(v, Fraction(0)) for v in r] for r in h]
    truth = exact(model.head, h)
    for i, row in enumerate(truth):
        sq = sum((Fraction(float(c)) - e) ** 2 for c, e in zip(logits[i], row))
        assert Fraction(float(err[i])) ** 2 >= sq


def test_a_margin_within_rounding_of_the_boundary_gets_radius_zero() -> None:
    """Issue 13: two classes whose logits differ by ~1e-16 are not certified at ~1e-16."""
    torch.manual_seed(0)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight[1] = head.weight[0] + 1e-3
        head.bias[1] = head.bias[0]
    model = LipschitzNet(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU()), head, (4,)).double()
    model.requires_grad_(False)
    x = torch.zeros(1, 4, dtype=torch.float64)
    model.features[1].bias.fill_(-1.0)  # features exactly 0: the logits are the biases
    model.head.bias[1] = model.head.bias[0] + 2.0**-52  # margin ~2e-16, class 1 wins
    bound = model_bound(model, "sound")
    r_plain, _ = certified_radius(model(x), bound.pairwise)
    assert 0 < float(r_plain) < 1e-12  # what an allowance-free radius claims
    _, radius = build_predictor(model, bound)(x)
    assert float(radius) == 0.0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--format", "tflite"], "unknown export format 'tflite'"),  # said before the run folder is read
        (["--format", "torchscript", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--format", "torchscript"], "does not exist"),
    ],
)
def test_cli_export_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], needle: str) -> None:
    from lipmargin.cli import main

    capsys.readouterr()
    assert main(["export", str(tmp_path / "no-such-run"), *argv, "--out", str(tmp_path / "m.out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
