"""No lost work: a kill inside a checkpoint write, and a non-finite loss, leave intact checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lipmargin.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from lipmargin.config import load_preset
from lipmargin.train import TRAIN_LOSSES, TrainingError, fit

ARGS = ["train", "--preset", "moons-cll", "--set", "train.epochs=6", "--set", "train.batch_size=500", "--quiet"]

# Runs the CLI, but SIGKILLs itself in the middle of the n-th checkpoint file write: after the
# temporary file is complete, before it is renamed into place.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import lipmargin.checkpoint as ck
    target = int(os.environ["KILL_AT_WRITE"])
    real_replace = ck.os.replace
    calls = [0]
    def replace(src, dst):
        calls[0] += 1
        if calls[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    ck.os.replace = replace
    from lipmargin.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _summary(run: Path) -> dict:
    data = json.loads((run / "summary.json").read_text())
    return {k: data[k] for k in ("clean_accuracy", "certified_accuracy", "lipschitz", "num_samples")}


@pytest.mark.parametrize("write", [5, 6])  # epoch 3: 5 = its .safetensors, 6 = its .json (the commit marker)
def test_kill_during_checkpoint_write_then_resume(tmp_path: Path, write: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([sys.executable, "-m", "lipmargin", *ARGS, "--out", str(whole)], env=env, check=True)
    # Each epoch writes 2 files, through os.replace, plus config.yaml first (call 1).
    killed = subprocess.run([sys.executable, "-c", KILLER, *ARGS, "--out", str(cut)],
                            env={**env, "KILL_AT_WRITE": str(write + 1)})
    assert killed.returncode == -9
    newest = latest_checkpoint(cut / "checkpoints")
    assert newest is not None and newest.epoch == 2  # epoch 3 never committed; epoch 2 intact
    leftovers = list((cut / "checkpoints").glob(".*.tmp"))
    assert leftovers, "the kill should have left the temporary file behind"
    subprocess.run([sys.executable, "-m", "lipmargin", "train", "--resume", str(cut), "--quiet"], env=env, check=True)
    assert _summary(cut) == _summary(whole)


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_checkpoints(tmp_path: Path) -> None:
    def build(cfg):
        normal = TRAIN_LOSSES["cll"](cfg)

        def loss(logits, target, model, k, progress):
            value = normal(logits, target, model, k, progress)
            # From the 3rd epoch's 2nd step on (progress > 0.5 of 4 epochs) the loss is NaN.
            return value * float("nan") if progress > 0.55 else value

        return loss

    TRAIN_LOSSES["nan-after-half"] = build
    try:
        cfg = load_preset("moons-cll")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=4, batch_size=500),
                                  loss=dataclasses.replace(cfg.loss, name="nan-after-half"))
        with pytest.raises(TrainingError, match=r"non-finite training loss at epoch 3, step 2"):
            fit(cfg, tmp_path / "r")
    finally:
        del TRAIN_LOSSES["nan-after-half"]
    epochs = [load_checkpoint(p).epoch for p in list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert epochs == [1, 2]
    weights = load_checkpoint(list_checkpoints(tmp_path / "r" / "checkpoints")[-1]).model_state
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (tmp_path / "r" / "summary.json").exists()
