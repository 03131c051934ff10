"""Interrupting a run with SIGKILL and resuming it gives the metrics of an uninterrupted run (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from lipmargin.checkpoint import list_checkpoints
from lipmargin.cli import main
from lipmargin.config import load_config
from lipmargin.train import fit

ARGS = ["--preset", "moons-cll", "--set", "train.epochs=30", "--set", "train.batch_size=250", "--quiet"]
METRICS = ("clean_accuracy", "certified_accuracy", "lipschitz", "lipschitz_features", "num_samples")


def _summary(run: Path) -> dict:
    data = json.loads((run / "summary.json").read_text())
    return {k: data[k] for k in METRICS}


# Runs the CLI (``python -m lipmargin``) in its own process, as a user would, with fit wrapped the way
# the CLI looks it up (``lipmargin.train.fit``): the start epoch of every run is appended to the file
# $EVENTS, and with $KILL_AT_EPOCH=k the process SIGKILLs itself right after epoch k's "epoch"
# event, which fit emits once that epoch's checkpoint is written: the kill always happens, mid-run.
CHILD = textwrap.dedent(
    """
    import json, os, signal
    import lipmargin.train
    from lipmargin.cli import entry

    real_fit = lipmargin.train.fit
    kill_at = int(os.environ.get("KILL_AT_EPOCH", "0"))

    def fit(cfg, out, **kwargs):
        inner = kwargs.get("on_event") or (lambda event: None)

        def on_event(event):
            inner(event)
            if event["event"] == "start":
                with open(os.environ["EVENTS"], "a") as f:
                    f.write(json.dumps({"start_epoch": event["start_epoch"]}) + "\\n")
            if event["event"] == "epoch" and event["epoch"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        kwargs["on_event"] = on_event
        return real_fit(cfg, out, **kwargs)

    lipmargin.train.fit = fit
    entry()
    """
)
KILL_AT = 3


def _cli(events: Path, *argv: str, kill_at: int = 0) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "EVENTS": str(events), "KILL_AT_EPOCH": str(kill_at)}
    return subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, timeout=600).returncode


def _start_epochs(events: Path) -> list[int]:
    return [json.loads(line)["start_epoch"] for line in events.read_text().splitlines()]


def test_kill_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    whole, cut, events = tmp_path / "whole", tmp_path / "cut", tmp_path / "events.jsonl"
    assert _cli(tmp_path / "whole-events.jsonl", "train", *ARGS, "--out", str(whole)) == 0

    assert _cli(events, "train", *ARGS, "--out", str(cut), kill_at=KILL_AT) == -signal.SIGKILL  # it WAS killed
    assert not (cut / "summary.json").exists()
    assert max(int(p.stem[6:]) for p in list_checkpoints(cut / "checkpoints")) == KILL_AT
    before = (cut / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in before] == list(range(1, KILL_AT + 1))

    assert _cli(events, "train", "--resume", str(cut), "--quiet") == 0
    assert _start_epochs(events) == [0, KILL_AT]  # the resumed run started after the checkpoint
    assert _summary(cut) == _summary(whole)
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert lines[:KILL_AT] == before  # the epochs before the kill were kept, not trained again
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, 31))
    whole_lines = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip((json.loads(x) for x in lines), whole_lines):
        assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}


def test_fit_leaves_the_callers_rng_alone(tmp_path: Path) -> None:
    cfg = load_config(preset="moons-cll", overrides=["train.epochs=1", "data.train_size=200", "data.test_size=100"])
    torch.manual_seed(1234)
    torch.rand(3)  # anywhere in the stream
    state = torch.get_rng_state()
    first = fit(cfg, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # another caller state: the run draws from train.seed only
    second = fit(cfg, tmp_path / "b")
    keys = ("clean_accuracy", "certified_accuracy", "lipschitz")
    assert {k: first[k] for k in keys} == {k: second[k] for k in keys}


def test_resume_refuses_extra_config(tmp_path: Path, capsys) -> None:
    assert main(["train", "--resume", str(tmp_path), "--preset", "moons-cll"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no intact checkpoint" in err[0]
