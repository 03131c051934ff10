"""Interrupting a run with SIGKILL and resuming it gives the metrics of an uninterrupted run (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lipmargin.checkpoint import list_checkpoints
from lipmargin.cli import main

ARGS = ["--preset", "moons-cll", "--set", "train.epochs=30", "--set", "train.batch_size=250", "--quiet"]
METRICS = ("clean_accuracy", "certified_accuracy", "lipschitz", "lipschitz_features", "num_samples")


def _summary(run: Path) -> dict:
    data = json.loads((run / "summary.json").read_text())
    return {k: data[k] for k in METRICS}


def _cli(*argv: str) -> subprocess.Popen:
    # Every run in its own process with the same settings (thread count included), as a user would.
    return subprocess.Popen([sys.executable, "-m", "lipmargin", *argv], env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_kill_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _cli("train", *ARGS, "--out", str(whole)).wait() == 0

    proc = _cli("train", *ARGS, "--out", str(cut))
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            done = [p for p in list_checkpoints(cut / "checkpoints") if int(p.stem[6:]) >= 3]
            if done:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    assert (cut / "checkpoints").is_dir()
    if killed:
        assert not (cut / "summary.json").exists()
    assert _cli("train", "--resume", str(cut), "--quiet").wait() == 0
    assert _summary(cut) == _summary(whole)
    lines = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 31))


def test_resume_refuses_extra_config(tmp_path: Path, capsys) -> None:
    assert main(["train", "--resume", str(tmp_path), "--preset", "moons-cll"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no intact checkpoint" in err[0]
