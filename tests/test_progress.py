"""Progress output: throttled lines when stderr is not a terminal, for train, certify, audit, export."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from lipmargin.cli import main
from lipmargin.cli.progress import Progress, format_duration, train_progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder(io.StringIO):
    """A non-terminal stderr that notes, for every line written, whether ``watch`` existed then."""

    def __init__(self, watch: Path) -> None:
        super().__init__()
        self.watch = watch
        self.lines: list[tuple[str, bool]] = []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.lines.append((line, self.watch.exists()))
        return super().write(text)

    def isatty(self) -> bool:
        return False


def test_format_duration_hand_values() -> None:
    assert [format_duration(s) for s in (0, 59.4, 75, 3599, 3725)] == ["0s", "59s", "1m15s", "59m59s", "1h02m"]
    assert format_duration(float("inf")) == "?" and format_duration(float("nan")) == "?" and format_duration(-1) == "?"


def test_plain_lines_are_throttled_to_every_seconds() -> None:
    clock, out = FakeClock(), io.StringIO()
    p = Progress(out, tty=False, every=30, clock=clock)
    p.status("a")  # the first one at once
    clock.now += 29.9
    p.status("b")  # too soon
    clock.now += 0.1
    p.status("c")
    p.status("d", force=True)
    p.line("permanent")
    assert out.getvalue() == "a\nc\nd\npermanent\n"


def test_terminal_redraws_one_line_and_quiet_is_silent() -> None:
    clock, out = FakeClock(), io.StringIO()
    p = Progress(out, tty=True, every=30, clock=clock)
    p.status("long status")
    clock.now += 1
    p.status("short")
    p.line("done")
    assert out.getvalue() == "\rlong status\rshort      \r     \rdone\n"
    quiet = io.StringIO()
    q = Progress(quiet, enabled=False, tty=False, every=0, clock=clock)
    q.status("x", force=True)
    q.line("y")
    q.clear()
    assert quiet.getvalue() == ""


def test_train_progress_reports_rate_and_eta() -> None:
    clock, out = FakeClock(), io.StringIO()
    on_event = train_progress(Progress(out, tty=False, every=0, clock=clock))
    on_event({"event": "start", "epochs": 2, "steps": 10, "samples": 1000, "device": "cpu"})
    clock.now += 2.0  # 2 s for 2 steps of 100 images: 100 img/s, 1 s per step
    on_event({"event": "batch", "epoch": 1, "step": 2, "samples": 200})
    last = out.getvalue().splitlines()[-1]
    # 8 steps left in this epoch (8 s), then 10 more (10 s).
    assert last == "epoch 1/2 batch 2/10 (20%) 100 img/s, epoch ETA 8s, run ETA 18s"


def test_redirected_train_writes_progress_while_it_runs(
    tiny_run_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    recorder = Recorder(out / "summary.json")
    monkeypatch.setattr(sys, "stderr", recorder)
    assert main(["--progress-every", "0", "train", *tiny_run_args, "--set", "train.epochs=2", "--out", str(out)]) == 0
    during = [line for line, finished in recorder.lines if not finished]
    batches = [line for line in during if line.startswith("epoch ") and " batch " in line]
    # A line per step (interval 0), all written before the run's summary existed.
    assert len(batches) >= 2 * 2 and any("epoch 2/2 batch" in line for line in batches)
    assert all("img/s" in line and "ETA" in line for line in batches)
    assert any(line.startswith("epoch 1: loss") for line in during)
    assert "\r" not in recorder.getvalue()  # plain lines, not a terminal bar


def test_quiet_train_writes_nothing_to_stderr(tiny_run_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["--progress-every", "0", "train", *tiny_run_args, "--set", "train.epochs=1", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_certify_audit_export_progress(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_run = _copy(tiny_run, tmp_path / "run")  # the audit writes audit.json: never into the shared fixture
    capsys.readouterr()
    assert main(["certify", str(tiny_run), "--progress-every", "0"]) == 0
    err = capsys.readouterr().err
    assert "certify: computing the sound bound" in err
    assert "certify: 20000/20000 samples" in err  # moons: 20000 test samples, eval batches of 1000
    assert sum("certify: " in line and "samples" in line for line in err.splitlines()) >= 2

    audit = ["audit", str(tiny_run), "--n", "20", "--pgd-steps", "2", "--pgd-restarts", "1", "--lobo-pairs", "4",
             "--lobo-steps", "2", "--eps", "0.1,0.2"]
    main(audit)  # its exit code is the audit's verdict, not the subject here
    err = capsys.readouterr().err
    stages = [line for line in err.splitlines() if line.startswith(f"audit {tiny_run}: [")]
    assert [s.split("]")[0].split("[")[1] for s in stages] == ["1/4", "2/4", "3/4", "4/4"]
    assert "at eps 0.1" in stages[0] and "own radius" in stages[2] and "LOBO" in stages[3]

    main([*audit, "--quiet"])
    assert capsys.readouterr().err == ""

    assert main(["export", str(tiny_run), "--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--no-check"]) == 0
    err = capsys.readouterr().err
    assert "export: computing the sound bound" in err and "export: writing the torchscript file" in err
