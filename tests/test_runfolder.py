"""A run folder is never overwritten: train / fit, sweep cells and report --out refuse, or move aside."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from lipmargin.cli import main
from lipmargin.config import config_to_dict, load_preset
from lipmargin.train.runfolder import RunExistsError, move_aside, move_report_aside, report_files, run_files
from lipmargin.sweep import run_sweep
from lipmargin.train import fit, replaced_run_files


def _hashes(folder: Path) -> dict[str, str]:
    """Content hash of every file under ``folder`` (relative path -> sha256)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert "Traceback" not in err
    return lines[0]


def test_run_files_and_move_aside(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert run_files(run) == []  # an empty checkpoints/ is not a run
    (run / "config.yaml").write_text("x: 1\n")
    (run / "checkpoints" / "epoch-000001.json").write_text("{}")
    assert run_files(run) == ["config.yaml", "checkpoints"]
    before = _hashes(run)
    first = move_aside(run, stamp="20260101-000000")
    run.mkdir()
    second = move_aside(run, stamp="20260101-000000")  # same second: a new name, nothing replaced
    assert first.name == "run.old-20260101-000000" and second.name == "run.old-20260101-000000-2"
    assert _hashes(first) == before and not run.exists()


def test_fit_refuses_a_folder_that_holds_a_run(tmp_path: Path) -> None:
    cfg = load_preset("moons-cll")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "epoch-000003.safetensors").write_bytes(b"weights")
    (run / "summary.json").write_text('{"clean_accuracy": 0.9}')
    before = _hashes(run)
    with pytest.raises(RunExistsError, match="already holds a run") as info:
        fit(cfg, run)
    assert info.value.found == ["summary.json", "checkpoints"]
    with pytest.raises(ValueError, match="exclude"):
        fit(cfg, run, resume=True, overwrite=True)
    assert _hashes(run) == before


def test_restarting_the_same_config_before_any_checkpoint_is_allowed(tmp_path: Path) -> None:
    cfg = load_preset("moons-cll")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert replaced_run_files(run, cfg) == []  # nothing is lost by starting it again
    other = load_preset("moons-gloro")
    assert replaced_run_files(run, other) == ["config.yaml", "metrics.jsonl"]
    (run / "config.yaml").write_text("not: [valid")
    assert replaced_run_files(run, cfg) == ["config.yaml", "metrics.jsonl"]


def test_cli_train_refuses_then_overwrite_moves_the_old_run_aside(
    tiny_run: Path, tiny_run_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = _hashes(run)
    args = [*tiny_run_args, "--set", "train.epochs=1", "--out", str(run), "--quiet"]
    capsys.readouterr()
    assert main(["train", *args]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--resume {run}" in line and "--overwrite" in line
    assert _hashes(run) == before  # the old run is intact

    assert main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "choose one" in _one_error_line(capsys.readouterr().err)

    assert main(["train", *args, "--overwrite"]) == 0
    err = capsys.readouterr().err
    moved = sorted(tmp_path.glob("run.old-*"))
    assert len(moved) == 1 and f"to {moved[0]}" in err  # says where, even with --quiet
    assert _hashes(moved[0]) == before
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-000001.json", "epoch-000001.safetensors"]


def _moons_base() -> dict:
    values = config_to_dict(load_preset("moons-cll"))
    values["train"]["epochs"] = 1
    values["train"]["batch_size"] = 1000
    return values


def test_sweep_cell_of_another_config_is_refused_or_moved_aside(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    grid = {"loss.p": [0.5]}
    run_sweep(_moons_base(), grid, 1, out)
    cell = out / "cells" / "loss.p=0.5" / "seed-0"
    saved = yaml.safe_load((cell / "config.yaml").read_text())
    saved["loss"]["eps"] = 0.3  # as if this cell had been trained with another config
    (cell / "config.yaml").write_text(yaml.safe_dump(saved))
    before = _hashes(cell)
    with pytest.raises(RunExistsError, match="different config"):
        run_sweep(_moons_base(), grid, 1, out)
    assert _hashes(cell) == before
    events: list[dict] = []
    run_sweep(_moons_base(), grid, 1, out, overwrite=True, on_event=events.append)
    moved = [e for e in events if e["event"] == "moved"]
    assert len(moved) == 1 and Path(moved[0]["run_dir"]) == cell
    assert _hashes(Path(moved[0]["moved_to"])) == before
    assert yaml.safe_load((cell / "config.yaml").read_text())["loss"]["eps"] != 0.3
    # With jobs=1 the sweep forwards the running run's training events.
    assert any(e["event"] == "batch" for e in events)


def test_report_files_and_moving_them(tmp_path: Path) -> None:
    assert report_files(tmp_path) == []
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "figure.png").write_bytes(b"png")
    assert report_files(tmp_path) == []  # no report.md: not a report
    (tmp_path / "report.md").write_text("# old")
    (tmp_path / "cells" / "a" / "seed-0").mkdir(parents=True)
    (tmp_path / "cells" / "a" / "seed-0" / "report.md").write_text("# run")
    found = report_files(tmp_path)
    assert found == ["report.md", "figure.png", "cells/a/seed-0/report.md"]
    dest = move_report_aside(tmp_path, found, stamp="x")
    assert dest == tmp_path / "previous-report-x"
    assert (dest / "report.md").read_text() == "# old" and (dest / "cells/a/seed-0/report.md").read_text() == "# run"
    assert (tmp_path / "notes.txt").read_text() == "mine" and report_files(tmp_path) == []


def test_cli_report_out_refuses_an_existing_report(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("# keep me")
    capsys.readouterr()
    assert main(["report", str(tiny_run), "--out", str(out)]) == 2
    assert "--overwrite" in _one_error_line(capsys.readouterr().err)
    assert (out / "report.md").read_text() == "# keep me"
    assert main(["report", str(tiny_run), "--out", str(out), "--overwrite"]) == 0
    assert "previous-report-" in capsys.readouterr().err
    (old,) = out.glob("previous-report-*")
    assert (old / "report.md").read_text() == "# keep me"
    assert (out / "report.md").read_text() != "# keep me"
