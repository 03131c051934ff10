"""Checkpoints: exact round trips of model / AdamW / MultiStepLR state, integrity checks, no pickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lipmargin.checkpoint import (
    CheckpointError,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_torch_rng_state,
    torch_rng_state,
)
from lipmargin.models import LipschitzNet, create_model


def _setup() -> tuple[LipschitzNet, torch.optim.AdamW, torch.optim.lr_scheduler.MultiStepLR]:
    torch.manual_seed(0)
    model = create_model("moons-mlp", (2,), 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 4, 4], 0.1)
    return model, optimizer, scheduler


def _step(model: LipschitzNet, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(16, 2, generator=g), torch.randint(0, 2, (16,), generator=g)
    model.train()
    k, _ = model.feature_lipschitz(2)
    loss = F.cross_entropy(model(x), y) + 1e-3 * k**2
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _trained_state(epochs: int = 3) -> tuple[LipschitzNet, torch.optim.AdamW, torch.optim.lr_scheduler.MultiStepLR]:
    model, optimizer, scheduler = _setup()
    for epoch in range(epochs):
        _step(model, optimizer, epoch)
        scheduler.step()
    return model, optimizer, scheduler


def _save(folder: Path, epoch: int, model, optimizer, scheduler, keep: int = 2) -> Path:
    return save_checkpoint(
        folder,
        epoch,
        model.state_dict(),
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch_rng_state()},
        {"config": {"note": "test"}, "train_seconds": 1.5},
        keep=keep,
    )


def _assert_same(a: object, b: object, where: str = "") -> None:
    """Nested equality where tensors must match in value, dtype and shape."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a)} vs {set(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} vs {b!r}"


def test_round_trip_restores_training_exactly(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained_state()
    path = _save(tmp_path, 3, model, optimizer, scheduler)
    assert path == tmp_path / "epoch-000003.json"
    ckpt = load_checkpoint(path)
    assert ckpt.epoch == 3 and ckpt.path == path
    assert ckpt.meta == {"config": {"note": "test"}, "train_seconds": 1.5}
    _assert_same(model.state_dict(), ckpt.model_state, "model")
    _assert_same(optimizer.state_dict(), ckpt.extra_state["optimizer"], "optimizer")
    _assert_same(scheduler.state_dict(), ckpt.extra_state["scheduler"], "scheduler")

    # Load into fresh objects the way train.fit does, then continue both: identical results.
    model2, optimizer2, scheduler2 = _setup()
    model2.load_state_dict(ckpt.model_state)
    optimizer2.load_state_dict(ckpt.extra_state["optimizer"])
    scheduler2.load_state_dict(ckpt.extra_state["scheduler"])
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    for epoch in range(3, 6):
        _step(model, optimizer, epoch)
        scheduler.step()
        _step(model2, optimizer2, epoch)
        scheduler2.step()
        assert optimizer.param_groups[0]["lr"] == optimizer2.param_groups[0]["lr"]
    _assert_same(model.state_dict(), model2.state_dict(), "continued model")
    # The milestone counted twice (gamma applied twice at epoch 4) survived the JSON round trip.
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.1**3)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained_state(1)
    torch.manual_seed(123)
    _save(tmp_path, 1, model, optimizer, scheduler)
    expected = torch.rand(5)
    torch.manual_seed(999)
    set_torch_rng_state(load_checkpoint(tmp_path / "epoch-000001.json").extra_state["rng"])
    assert torch.equal(torch.rand(5), expected)


def test_checkpoint_files_are_not_pickles(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained_state(1)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    record = json.loads(path.read_text())
    assert record["epoch"] == 1 and len(record["sha256"]) == 64
    blob = path.with_suffix(".safetensors").read_bytes()
    assert record["bytes"] == len(blob)
    assert not blob.startswith(b"\x80") and not blob.startswith(b"PK")  # neither pickle nor torch.save zip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000001.json", "epoch-000001.safetensors"]


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) - 7]
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "empty"])
def test_damaged_weights_fail_the_hash(tmp_path: Path, how: str) -> None:
    model, optimizer, scheduler = _trained_state(1)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    _damage(path.with_suffix(".safetensors"), how)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)
    assert latest_checkpoint(tmp_path) is None


def test_damaged_metadata_is_refused(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained_state(1)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    _damage(path, "truncate")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    path.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="not a lipmargin checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "epoch-000007.json")
    path.with_suffix(".safetensors").unlink()
    path.write_text(json.dumps({"format_version": 1, "sha256": "0" * 64, "epoch": 1}))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


@pytest.mark.parametrize("what", ["weights-flip", "weights-truncate", "weights-missing", "json-truncate"])
def test_latest_checkpoint_skips_a_damaged_newest(tmp_path: Path, what: str) -> None:
    model, optimizer, scheduler = _setup()
    states = {}
    for epoch in (1, 2, 3):
        _step(model, optimizer, epoch)
        scheduler.step()
        _save(tmp_path, epoch, model, optimizer, scheduler, keep=5)
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    newest = tmp_path / "epoch-000003.json"
    if what == "weights-flip":
        _damage(newest.with_suffix(".safetensors"), "flip")
    elif what == "weights-truncate":
        _damage(newest.with_suffix(".safetensors"), "truncate")
    elif what == "weights-missing":
        newest.with_suffix(".safetensors").unlink()
    else:
        _damage(newest, "truncate")
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.epoch == 2
    _assert_same(states[2], ckpt.model_state, "epoch 2")


def test_keep_prunes_old_checkpoints(tmp_path: Path) -> None:
    model, optimizer, scheduler = _trained_state(1)
    for epoch in range(1, 6):
        _save(tmp_path, epoch, model, optimizer, scheduler, keep=2)
        names = sorted(p.name for p in tmp_path.iterdir())
        kept = list(range(max(1, epoch - 1), epoch + 1))
        assert names == sorted(f"epoch-{e:06d}{s}" for e in kept for s in (".json", ".safetensors"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-000004.json", "epoch-000005.json"]
    assert latest_checkpoint(tmp_path).epoch == 5
    assert list_checkpoints(tmp_path / "nowhere") == []
    assert latest_checkpoint(tmp_path / "nowhere") is None


class _Sentinel:
    """Unpickling this creates (truncates) a file: proof that the payload was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("fmt", ["pickle", "torch.save"])
def test_pickle_renamed_to_safetensors_is_refused_without_executing(tmp_path: Path, fmt: str) -> None:
    # The payload really would run if unpickled: check that on a separate sentinel first.
    control = tmp_path / "control-sentinel"
    pickle.loads(pickle.dumps({"w": _Sentinel(control)}))
    assert control.exists()

    sentinel = tmp_path / "sentinel"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    weights = folder / "epoch-000001.safetensors"
    payload = {"model.weight": torch.zeros(2), "evil": _Sentinel(sentinel)}
    if fmt == "pickle":
        weights.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, weights)
    import hashlib

    blob = weights.read_bytes()
    # The attacker also wrote matching metadata, so the hash check passes and the loader must still refuse.
    record = {"format_version": 1, "epoch": 1, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
              "model_keys": ["weight"], "extra_state": {}, "meta": {}}
    (folder / "epoch-000001.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(folder / "epoch-000001.json")
    assert latest_checkpoint(folder) is None
    assert not sentinel.exists()


def test_run_with_a_pickled_checkpoint_is_refused_by_load_run(tmp_path: Path) -> None:
    from lipmargin.train import load_run

    sentinel = tmp_path / "sentinel"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "epoch-000001.safetensors").write_bytes(pickle.dumps(_Sentinel(sentinel)))
    (run / "checkpoints" / "epoch-000001.json").write_text(json.dumps({"format_version": 1, "epoch": 1}))
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_run(run)
    assert not sentinel.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_the_umask_mode_not_a_private_one(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with open(tmp_path / "b.json", "w") as f:  # what a plain write gives
            f.write("{}")
    finally:
        os.umask(old)
    mode = (tmp_path / "a.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "a.json").read_text() == "{}"
