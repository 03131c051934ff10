"""Certify exactly the model asked about, and name its weights (issue 18).

A damaged newest checkpoint makes certify / audit / export / report fail in one line (never a
silent fallback to an older model); ``--checkpoint`` chooses one explicitly; every output names
the checkpoint file, its epoch and the SHA-256 of its bytes; resuming training may skip a damaged
checkpoint but says so; CUDA RNG states are restored in device order, with a warning when the
device count differs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from lipmargin.checkpoint import (
    CheckpointError,
    DamagedCheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    set_torch_rng_state,
)
from lipmargin.cli import main

NEWEST, OLDER = "epoch-000003", "epoch-000002"  # the tiny run keeps its last two checkpoints
SMALL_AUDIT = ["--n", "20", "--lobo-pairs", "4", "--lobo-steps", "3", "--pgd-steps", "3", "--pgd-restarts", "1"]


def _sha256(path: Path) -> str:
    """What ``sha256sum path`` prints: the digest of the file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def run(tiny_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    assert sorted(p.stem for p in (copy / "checkpoints").glob("*.json")) == [OLDER, NEWEST]
    return copy


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--threads", "1", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _commands(run: Path, tmp_path: Path) -> dict[str, list[str]]:
    return {
        "certify": ["certify", str(run), "--json"],
        "audit": ["audit", str(run), "--json", *SMALL_AUDIT],
        "export": ["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "model.pt"), "--no-check"],
        "report": ["report", str(run), "--out", str(tmp_path / "report")],
    }


# --------------------------------------------------------------------------------------------
# A damaged newest checkpoint: exit 2, one line, nothing written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["certify", "audit", "export", "report"])
def test_damaged_newest_checkpoint_fails_in_one_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    if command == "report":
        pytest.importorskip("matplotlib")
    damaged = run / "checkpoints" / f"{NEWEST}.safetensors"
    _flip_middle(damaged)
    code, out, err = _cli(capsys, *_commands(run, tmp_path)[command])
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert str(damaged) in err  # names the damaged file
    assert f"intact: {OLDER}" in err  # and the intact one
    assert f"--checkpoint {OLDER}" in err  # and how to choose it
    # Nothing was certified, audited, exported or reported from the older checkpoint.
    assert not (run / "audit.json").exists()
    assert not (tmp_path / "model.pt").exists()
    assert not (tmp_path / "report" / "report.md").exists()


@pytest.mark.parametrize("damage", ["metadata-truncated", "metadata-missing", "weights-missing"])
def test_every_kind_of_damaged_newest_checkpoint_is_refused(
    run: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    meta = run / "checkpoints" / f"{NEWEST}.json"
    weights = meta.with_suffix(".safetensors")
    if damage == "metadata-truncated":
        meta.write_bytes(meta.read_bytes()[:50])
    elif damage == "metadata-missing":  # an interrupted save, or a deleted commit marker
        meta.unlink()
    else:
        weights.unlink()
    code, out, err = _cli(capsys, "certify", str(run), "--json")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and NEWEST in err and f"--checkpoint {OLDER}" in err, err
    with pytest.raises(DamagedCheckpointError) as info:
        resolve_checkpoint(run / "checkpoints")
    assert info.value.intact == [OLDER]
    assert info.value.damaged == (meta if damage == "metadata-truncated" else weights)


def test_no_intact_checkpoint_at_all(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in (run / "checkpoints").glob("*.safetensors"):
        _flip_middle(path)
    code, _, err = _cli(capsys, "certify", str(run), "--json")
    assert code == 2 and err.count("\n") == 1
    assert "no intact checkpoint" in err and "--checkpoint" not in err


def test_a_damaged_older_checkpoint_does_not_matter(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _flip_middle(run / "checkpoints" / f"{OLDER}.safetensors")
    code, out, err = _cli(capsys, "certify", str(run), "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["epoch"] == 3
    assert payload["checkpoint"] == {
        "path": f"checkpoints/{NEWEST}.safetensors",
        "epoch": 3,
        "sha256": _sha256(run / "checkpoints" / f"{NEWEST}.safetensors"),
    }
    # The final model: the same numbers as the training run's own final evaluation.
    summary = json.loads((run / "summary.json").read_text())
    assert payload["clean_accuracy"] == summary["clean_accuracy"]
    assert payload["certified_accuracy"] == summary["certified_accuracy"]


# --------------------------------------------------------------------------------------------
# --checkpoint chooses an older one, and every output names it
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def older_only(run: Path, tmp_path: Path) -> Path:
    """The same run without its newest checkpoint: certifying it certifies the older one by default."""
    copy = tmp_path / "older-only"
    shutil.copytree(run, copy)
    for suffix in (".json", ".safetensors"):
        (copy / "checkpoints" / f"{NEWEST}{suffix}").unlink()
    return copy


@pytest.mark.parametrize("how", ["name", "number", "json-path", "safetensors-path"])
def test_checkpoint_option_certifies_the_chosen_older_checkpoint(
    run: Path, older_only: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    older = run / "checkpoints" / f"{OLDER}.safetensors"
    choice = {"name": OLDER, "number": "2", "json-path": str(older.with_suffix(".json")), "safetensors-path": str(older)}[how]
    _flip_middle(run / "checkpoints" / f"{NEWEST}.safetensors")
    code, out, err = _cli(capsys, "certify", str(run), "--json", "--checkpoint", choice)
    assert code == 0, err
    chosen = json.loads(out)
    assert chosen["epoch"] == 2
    assert chosen["checkpoint"] == {"path": f"checkpoints/{OLDER}.safetensors", "epoch": 2, "sha256": _sha256(older)}
    # Independent of --checkpoint: a run whose newest checkpoint is that one gives the same certificate.
    code, out, err = _cli(capsys, "certify", str(older_only), "--json")
    assert code == 0, err
    assert json.loads(out) == chosen


def test_checkpoint_option_refuses_a_damaged_or_unknown_choice(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _flip_middle(run / "checkpoints" / f"{OLDER}.safetensors")
    code, _, err = _cli(capsys, "certify", str(run), "--checkpoint", OLDER)
    assert code == 2 and err.count("\n") == 1 and "SHA-256" in err and f"{OLDER}.safetensors" in err
    code, _, err = _cli(capsys, "certify", str(run), "--checkpoint", "epoch-000009")
    assert code == 2 and err.count("\n") == 1
    assert "epoch-000009" in err and f"there are: {OLDER}, {NEWEST}" in err
    code, _, err = _cli(capsys, "certify", str(run), "--checkpoint", "latest")
    assert code == 2 and "neither a name like epoch-000001 nor an existing file" in err


def test_audit_names_the_chosen_checkpoint(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _flip_middle(run / "checkpoints" / f"{NEWEST}.safetensors")
    code, out, err = _cli(capsys, "audit", str(run), "--json", "--checkpoint", OLDER, *SMALL_AUDIT)
    assert code == 0, err
    payload = json.loads(out)
    expected = {"path": f"checkpoints/{OLDER}.safetensors", "epoch": 2, "sha256": _sha256(run / "checkpoints" / f"{OLDER}.safetensors")}
    assert payload["epoch"] == 2 and payload["checkpoint"] == expected
    assert json.loads((run / "audit.json").read_text())["checkpoint"] == expected


def test_export_metadata_names_the_chosen_checkpoint(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lipmargin.export import export_certified, read_export_metadata

    older = run / "checkpoints" / f"{OLDER}.safetensors"
    _flip_middle(run / "checkpoints" / f"{NEWEST}.safetensors")
    out = tmp_path / "model.pt"
    code, stdout, err = _cli(capsys, "export", str(run), "--format", "torchscript", "--out", str(out), "--no-check", "--checkpoint", OLDER)
    assert code == 0, err
    assert _sha256(older) in stdout
    meta = read_export_metadata(out)
    assert meta["checkpoint_sha256"] == _sha256(older)
    assert meta["checkpoint_file"] == older.name and meta["checkpoint_epoch"] == "2"
    # The Python API: the result carries the same reference.
    from lipmargin.train import open_run

    loaded = open_run(run, "cpu", checkpoint=OLDER)  # export works on a model in memory
    result = export_certified(loaded.model, "torch-export", tmp_path / "model.pt2", check=False, checkpoint=loaded.checkpoint)
    assert result.checkpoint is not None
    assert (result.checkpoint.path, result.checkpoint.epoch, result.checkpoint.sha256) == (older, 2, _sha256(older))
    assert read_export_metadata(tmp_path / "model.pt2")["checkpoint_sha256"] == _sha256(older)


def test_checked_export_to_a_relative_path_keeps_its_metadata(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lipmargin.export import read_export_metadata

    monkeypatch.chdir(tmp_path)  # a relative --out: the check in a fresh process must still find the file
    code, stdout, err = _cli(capsys, "export", str(tiny_run), "--format", "torchscript", "--out", "model.pt")
    assert code == 0, err
    assert "test samples re-checked" in stdout  # the check ran on the final file, metadata included
    newest = tiny_run / "checkpoints" / f"{NEWEST}.safetensors"
    assert read_export_metadata(tmp_path / "model.pt")["checkpoint_sha256"] == _sha256(newest)


@pytest.mark.slow
def test_onnx_export_metadata_names_the_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from lipmargin.export import export_certified, read_export_metadata

    from lipmargin.train import open_run

    loaded = open_run(tiny_run, "cpu")
    result = export_certified(loaded.model, "onnx", tmp_path / "model.onnx", check=False, checkpoint=loaded.checkpoint)
    newest = tiny_run / "checkpoints" / f"{NEWEST}.safetensors"
    assert result.checkpoint is not None and result.checkpoint.sha256 == _sha256(newest)
    meta = read_export_metadata(tmp_path / "model.onnx")
    assert (meta["checkpoint_file"], meta["checkpoint_epoch"], meta["checkpoint_sha256"]) == (newest.name, "3", _sha256(newest))


def test_report_names_its_checkpoint(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    code, out, err = _cli(capsys, "report", str(tiny_run), "--out", str(tmp_path / "newest"))
    assert code == 0, err
    text = (tmp_path / "newest" / "report.md").read_text()
    assert _sha256(tiny_run / "checkpoints" / f"{NEWEST}.safetensors") in text
    assert f"checkpoints/{NEWEST}.safetensors" in text
    assert "recomputed" not in text  # summary.json's metrics belong to the newest checkpoint


def test_report_recomputes_a_chosen_older_checkpoint(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    _flip_middle(run / "checkpoints" / f"{NEWEST}.safetensors")
    code, out, err = _cli(capsys, "report", str(run), "--out", str(tmp_path / "older"), "--checkpoint", OLDER)
    assert code == 0, err
    text = (tmp_path / "older" / "report.md").read_text()
    assert _sha256(run / "checkpoints" / f"{OLDER}.safetensors") in text
    assert f"those of {OLDER}, recomputed" in text
    # Its metrics are the older checkpoint's, as certify of that checkpoint finds them.
    code, out, err = _cli(capsys, "certify", str(run), "--json", "--checkpoint", OLDER)
    assert code == 0, err
    assert f"| clean accuracy | {json.loads(out)['clean_accuracy']:.4f} |" in text


# --------------------------------------------------------------------------------------------
# Hashes: summary.json and the Python API
# --------------------------------------------------------------------------------------------


def test_summary_names_the_final_checkpoint_and_its_hash(tiny_run: Path) -> None:
    summary = json.loads((tiny_run / "summary.json").read_text())
    ref = summary["checkpoint"]
    assert ref["path"] == f"checkpoints/{NEWEST}.safetensors" and ref["epoch"] == 3
    assert ref["sha256"] == _sha256(tiny_run / ref["path"])


def test_api_results_carry_the_checkpoint(tiny_run: Path) -> None:
    from lipmargin.certify import certify
    from lipmargin.train import eval_batches, load_run_data, open_run

    loaded = open_run(tiny_run)
    assert loaded.checkpoint.path == tiny_run / "checkpoints" / f"{NEWEST}.safetensors"
    assert loaded.checkpoint.sha256 == _sha256(loaded.checkpoint.path) and loaded.epoch == 3
    data = load_run_data(loaded.config)
    result = certify(loaded.model, eval_batches(data.eval, 1000, torch.device("cpu")), [0.1], checkpoint=loaded.checkpoint)
    assert result.checkpoint == loaded.checkpoint
    older = open_run(tiny_run, checkpoint=OLDER)
    assert older.epoch == 2 and older.checkpoint.sha256 == _sha256(tiny_run / "checkpoints" / f"{OLDER}.safetensors")


# --------------------------------------------------------------------------------------------
# Resume: may continue from an older intact checkpoint, but says which file it skipped
# --------------------------------------------------------------------------------------------


def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning(
    run: Path, tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = run / "checkpoints" / f"{NEWEST}.safetensors"
    _flip_middle(damaged)
    (run / "summary.json").unlink()
    code, _, err = _cli(capsys, "train", "--resume", str(run), "--quiet")
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lipmargin: warning:"), err
    assert str(damaged) in lines[0] and f"resuming from {OLDER}" in lines[0]
    # It retrained epoch 3 from epoch 2: the same weights as the uninterrupted run's epoch 3.
    again = load_checkpoint(run / "checkpoints" / f"{NEWEST}.json")
    original = load_checkpoint(tiny_run / "checkpoints" / f"{NEWEST}.json")
    for key, value in original.model_state.items():
        torch.testing.assert_close(again.model_state[key], value, rtol=0, atol=0)
    assert json.loads((run / "summary.json").read_text())["checkpoint"]["sha256"] == _sha256(damaged)


def test_fit_resume_warns_and_reports_the_skipped_checkpoint(run: Path) -> None:
    from lipmargin.config import RunConfig
    from lipmargin.train import CheckpointSkippedWarning, fit

    damaged = run / "checkpoints" / f"{NEWEST}.safetensors"
    _flip_middle(damaged)
    events: list[dict] = []
    with pytest.warns(CheckpointSkippedWarning, match=str(damaged).replace("\\", "\\\\")):
        fit(RunConfig(), run, resume=True, on_event=events.append)
    skipped = [e for e in events if e["event"] == "checkpoint_skipped"]
    assert [e["path"] for e in skipped] == [str(damaged)]
    assert [e["start_epoch"] for e in events if e["event"] == "start"] == [2]


# --------------------------------------------------------------------------------------------
# CUDA RNG states: numeric device order, a warning for another device count
# --------------------------------------------------------------------------------------------


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> list[tuple[int, torch.Tensor]]:
    calls: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((device, state)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restore device by device"))
    return calls


def _states(n: int) -> dict[str, torch.Tensor]:
    # Each device's state is recognisable by its first byte; CPU state left out on purpose.
    return {f"cuda{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(n)}


def test_cuda_rng_states_are_restored_in_numeric_device_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_cuda(monkeypatch, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same device count: no warning
        set_torch_rng_state(_states(11))
    assert [device for device, _ in calls] == list(range(11))
    for device, state in calls:
        assert int(state[0]) == device  # cuda10's state went to device 10, not to device 2


@pytest.mark.parametrize("devices", [0, 2, 12])
def test_another_cuda_device_count_warns(monkeypatch: pytest.MonkeyPatch, devices: int) -> None:
    calls = _fake_cuda(monkeypatch, devices)
    with pytest.warns(UserWarning, match=f"11 device.*this machine has {devices}"):
        set_torch_rng_state(_states(11))
    restored = min(devices, 11)
    assert [device for device, _ in calls] == list(range(restored))
    assert all(int(state[0]) == device for device, state in calls)


def test_cpu_only_checkpoint_restores_without_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_cuda(monkeypatch, 2)
    state = torch.get_rng_state()
    expected = torch.rand(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_torch_rng_state({"cpu": state})
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    assert calls == []


def test_resolve_checkpoint_with_no_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="is a folder"):
        resolve_checkpoint(tmp_path, tmp_path)


def test_sweep_audit_reaudits_other_weights_and_refuses_a_damaged_newest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lipmargin.config import config_to_dict, load_preset
    from lipmargin.sweep import run_sweep

    base = config_to_dict(load_preset("moons-cll"))
    base["train"].update(epochs=2, batch_size=500)
    sweep = tmp_path / "sweep"
    run_sweep(base, {"loss.p": [0.01]}, 1, sweep)
    run = next((sweep / "cells").glob("*/seed-*"))
    args = ["audit", str(sweep), "--eps", "0.15", *SMALL_AUDIT]

    def audited() -> dict:
        return json.loads((run / "audit.json").read_text())["checkpoint"]

    assert _cli(capsys, *args)[0] == 0
    assert audited()["sha256"] == _sha256(run / "checkpoints" / "epoch-000002.safetensors")
    # Same settings but other weights: audited again, and the record says which.
    assert _cli(capsys, *args, "--checkpoint", "epoch-000001")[0] == 0
    assert audited()["epoch"] == 1 and audited()["sha256"] == _sha256(run / "checkpoints" / "epoch-000001.safetensors")
    # A damaged newest checkpoint is not papered over by the audit.json of an earlier call.
    assert _cli(capsys, *args)[0] == 0 and audited()["epoch"] == 2
    _flip_middle(run / "checkpoints" / "epoch-000002.safetensors")
    code, _, err = _cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and "epoch-000002.safetensors" in err
    code, _, err = _cli(capsys, *args, "--checkpoint", str(run / "checkpoints" / "epoch-000001.json"))
    assert code == 2 and "takes a name" in err
