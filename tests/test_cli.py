"""The command line as a function: train / certify / presets, error handling, reproducibility, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from lipmargin.cli import main
from lipmargin.config import list_presets

#: Summary entries that must be identical between runs (everything but the wall-clock time).
METRIC_KEYS = ("clean_accuracy", "certified_accuracy", "lipschitz", "lipschitz_features", "num_samples",
               "bound_method", "epochs", "num_parameters")


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _metrics(run: Path) -> dict:
    summary = _summary(run)
    return {k: summary[k] for k in METRIC_KEYS}


def _train(args: list[str], out: Path, *extra: str) -> int:
    return main(["train", *args, *extra, "--out", str(out), "--quiet"])


def _certify_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["certify", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, f"expected exactly one line, got {out!r}"
    payload = json.loads(out)
    assert isinstance(payload, dict)
    return payload


def test_tiny_run_folder(tiny_run: Path) -> None:
    assert (tiny_run / "config.yaml").is_file()
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    summary = _summary(tiny_run)
    assert summary["epochs"] == 3 and summary["dataset"] == "moons" and summary["model"] == "moons-mlp"
    assert 0.5 < summary["clean_accuracy"] <= 1.0
    assert set(summary["certified_accuracy"]) == {"0.15"}
    assert summary["certified_accuracy"]["0.15"] <= summary["clean_accuracy"]
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == [
        "epoch-000002.json", "epoch-000002.safetensors", "epoch-000003.json", "epoch-000003.safetensors",
    ]


def test_certify_json(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    payload = _certify_json(capsys, str(tiny_run), "--eps", "0.15,0.3")
    assert {"clean_accuracy", "certified_accuracy", "lipschitz", "num_samples", "bound_method"} <= set(payload)
    assert list(payload["certified_accuracy"]) == ["0.15", "0.3"]
    assert payload["bound_method"] == "sound" and payload["sound"] is True
    assert payload["num_samples"] == 20_000
    clean, cert = payload["clean_accuracy"], payload["certified_accuracy"]
    assert 0.5 < clean <= 1.0
    assert clean >= cert["0.15"] >= cert["0.3"] >= 0.0
    assert payload["lipschitz"] > 0


def _moons_truth(run: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Module]:
    """Computed without certify(): the rebuilt model in float64, its logits on the whole test
    split, the labels and the inputs."""
    from lipmargin.data import load_dataset, to_float
    from lipmargin.train import load_run

    _, model, _ = load_run(run)
    model = model.double().eval().requires_grad_(False)
    test = load_dataset("moons", None, "test")
    x = to_float(test.inputs).double()  # (N, 2)
    return model(x), test.labels, x, model


def _gradient_lower(model: nn.Module, x: torch.Tensor) -> float:
    """max over ``x`` of ||grad (f_0 - f_1)||: a lower bound of Lip(f_0 - f_1)."""
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    (grad,) = torch.autograd.grad((out[:, 0] - out[:, 1]).sum(), xg)
    return float(grad.norm(dim=1).max())


def _pgd_flips(model: nn.Module, x: torch.Tensor, pred: torch.Tensor, radius: torch.Tensor, steps: int = 40) -> torch.Tensor:
    """An L2 PGD (written here, independent of lipmargin.certify.attacks) that pushes the margin
    of ``pred`` down inside the ball of ``radius`` (per sample); True where the prediction flips."""
    other = 1 - pred  # two classes
    delta = torch.zeros_like(x)
    step = (2.5 * radius / steps).unsqueeze(1)  # (N, 1)
    flipped = torch.zeros_like(pred, dtype=torch.bool)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(x + delta)
        margin = logits.gather(1, pred[:, None]) - logits.gather(1, other[:, None])  # (N, 1)
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            flipped |= margin.squeeze(1) < 0
            delta = delta - step * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
            norm = delta.norm(dim=1, keepdim=True)
            delta = delta * torch.clamp(radius.unsqueeze(1) / norm.clamp_min(1e-30), max=1.0)
    with torch.no_grad():
        flipped |= model(x + delta).argmax(1) != pred
    return flipped


def test_certify_json_against_independent_truths(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    """The CLI's certified accuracy and sound Lipschitz number against truths computed here:
    - its bound is >= the input-gradient norm of f_0 - f_1 at every test point (a lower bound of
      the true constant);
    - with two classes the certified radius is margin / L: recounting the certified samples from
      float64 logits of the rebuilt model and the JSON's L gives the CLI's numbers;
    - an L2 PGD attack inside each such radius never changes the prediction (and does change it
      for most samples in a ball three times larger: the attack is not toothless)."""
    payload = _certify_json(capsys, str(tiny_run), "--eps", "0.15,0.3")
    lip = payload["lipschitz"]
    assert payload["sound"] is True and lip == payload["lipschitz_sound"]
    logits, labels, x, model = _moons_truth(tiny_run)

    assert _gradient_lower(model, x) <= lip * (1 + 1e-9)

    pred = logits.argmax(1)
    radius = (logits[:, 0] - logits[:, 1]).abs() / lip  # (N,) margin / Lip(f_0 - f_1)
    n = labels.numel()
    assert payload["num_samples"] == n
    for key, eps in (("0.15", 0.15), ("0.3", 0.3)):
        hand = int(((pred == labels) & (radius > eps)).sum())
        # a sample within rounding of eps may fall either way (certify deflates by ~1e-12)
        boundary = int(((radius - eps).abs() < 1e-9).sum())
        assert abs(round(payload["certified_accuracy"][key] * n) - hand) <= boundary, key
    assert payload["clean_accuracy"] == pytest.approx(float((pred == labels).double().mean()), abs=0.5 / n)

    inside = radius > 0.15  # every sample certified at 0.15 (right or wrong label)
    assert int(inside.sum()) > 100
    xs, ps, rs = x[inside], pred[inside], radius[inside]
    assert not bool(_pgd_flips(model, xs, ps, rs * (1 - 1e-6)).any())
    assert float(_pgd_flips(model, xs, ps, 3 * rs).double().mean()) > 0.5


def test_certify_eps_keys_as_typed(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    payload = _certify_json(capsys, str(tiny_run), "--eps", "0.30,36/255, 0.15")
    assert list(payload["certified_accuracy"]) == ["0.30", "36/255", "0.15"]
    reference = _certify_json(capsys, str(tiny_run), "--eps", "0.3,0.15")
    assert payload["certified_accuracy"]["0.30"] == reference["certified_accuracy"]["0.3"]
    assert payload["certified_accuracy"]["0.15"] == reference["certified_accuracy"]["0.15"]


def test_certify_power_bound(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    sound = _certify_json(capsys, str(tiny_run), "--eps", "0.15,0.3")
    power = _certify_json(capsys, str(tiny_run), "--eps", "0.15,0.3", "--bound", "power")
    assert power["bound_method"] == "power" and power["sound"] is False
    assert power["lipschitz"] <= sound["lipschitz"]
    # A converged power iteration per layer composes to an upper bound of the network's constant
    # (up to its convergence tolerance): at least the largest input-gradient norm.
    _, _, x, model = _moons_truth(tiny_run)
    assert power["lipschitz"] >= _gradient_lower(model, x) * (1 - 1e-6)
    assert power["clean_accuracy"] == sound["clean_accuracy"]
    for eps in ("0.15", "0.3"):
        assert power["certified_accuracy"][eps] >= sound["certified_accuracy"][eps]
    # Certifying with the run's own bound reproduces the evaluation at the end of training.
    assert power["certified_accuracy"]["0.15"] == _summary(tiny_run)["certified_accuracy"]["0.15"]
    assert power["clean_accuracy"] == _summary(tiny_run)["clean_accuracy"]


def test_certify_text_output(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["certify", str(tiny_run), "--eps", "0.15"]) == 0
    out = capsys.readouterr().out
    assert "certified accuracy @ 0.15" in out and "Lipschitz (sound)" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--eps", "abc"], "--eps"),
        (["--eps", "0.1,-0.2"], "--eps"),
        (["--bound", "exact"], "--bound"),
    ],
)
def test_certify_bad_arguments(tiny_run: Path, capsys: pytest.CaptureFixture, argv: list[str], needle: str) -> None:
    capsys.readouterr()
    assert main(["certify", str(tiny_run), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_certify_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["certify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_presets_one_per_line(capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    assert {"digits-cll", "moons-cll", "moons-gloro"} <= {line.split()[0] for line in lines}


def test_models_listing(capsys: pytest.CaptureFixture) -> None:
    from lipmargin.models import list_models

    capsys.readouterr()
    assert main(["models"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()] == list_models()


@pytest.mark.parametrize(
    "override, needle",
    [("loss.p=1.5", "loss.p"), ("modle.name=x", "valid keys"), ("loss.eps=abc", "loss.eps")],
)
def test_train_bad_config_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, override: str,
                                           needle: str) -> None:
    capsys.readouterr()
    code = main(["train", "--preset", "moons-cll", "--set", override, "--out", str(tmp_path / "run"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert needle in lines[0] and "Traceback" not in captured.err
    assert lines[0].startswith("lipmargin: error: ")
    assert captured.out == ""
    assert not (tmp_path / "run").exists()


def test_unknown_command_and_no_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_train_is_reproducible(tiny_run: Path, tiny_run_args: list[str], tmp_path: Path) -> None:
    assert _train(tiny_run_args, tmp_path / "again") == 0
    assert _metrics(tmp_path / "again") == _metrics(tiny_run)
    first = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(first, second, strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    assert (tmp_path / "again" / "checkpoints" / "epoch-000003.safetensors").read_bytes() == (
        tiny_run / "checkpoints" / "epoch-000003.safetensors"
    ).read_bytes()


def test_train_prints_a_table_unless_quiet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["train", "--preset", "moons-cll", "--set", "train.epochs=1", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "clean accuracy" in out and "certified accuracy @ 0.15" in out and str(tmp_path / "r") in out


def test_resume_of_a_finished_run(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "finished"
    shutil.copytree(tiny_run, run)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    resumed, original = _metrics(run), _metrics(tiny_run)
    for key in ("lipschitz", "lipschitz_features"):
        assert resumed.pop(key) == pytest.approx(original.pop(key), rel=1e-7)
    assert resumed == original


def test_resume_of_a_finished_run_reproduces_the_summary_exactly(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "finished"
    shutil.copytree(tiny_run, run)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert _metrics(run) == _metrics(tiny_run)


def test_resume_after_losing_the_newest_checkpoint(tiny_run_args: list[str], tmp_path: Path) -> None:
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    assert _train(tiny_run_args, full, "--set", "train.epochs=4") == 0
    assert _train(tiny_run_args, interrupted, "--set", "train.epochs=4") == 0
    for suffix in (".json", ".safetensors"):
        (interrupted / "checkpoints" / f"epoch-000004{suffix}").unlink()
    (interrupted / "summary.json").unlink()
    assert main(["train", "--resume", str(interrupted), "--quiet"]) == 0
    assert _metrics(interrupted) == _metrics(full)
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_resume_rejects_config_arguments(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["train", "--resume", str(tiny_run), "--set", "train.epochs=5"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err


def test_resume_without_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "empty"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no intact checkpoint" in err


@pytest.mark.parametrize("override", ["model.name=4C3F", "model.widths=[3]"])
def test_train_model_that_does_not_fit_the_data_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        override: str) -> None:
    capsys.readouterr()
    argv = ["train", "--preset", "moons-cll", "--set", "model.name=mlp", "--set", override, "--set", "train.epochs=1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "model" in err
