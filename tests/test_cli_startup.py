"""The CLI's startup and failure paths: no torch for --help and bad arguments, the thread rule,
and out-of-memory as one line naming the knob to turn."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lipmargin
from lipmargin.cli import certify_cmd
from lipmargin.cli import main
from lipmargin.threads import CpuLoad, _procs_running, choose_threads, read_cpu_load

_SRC = str(Path(lipmargin.__file__).resolve().parents[1])


def _python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = _SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=full_env)


def test_help_does_not_import_torch() -> None:
    proc = _python("-X", "importtime", "-m", "lipmargin", "--help")
    assert proc.returncode == 0 and "usage: lipmargin" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "lipmargin.cli" in imported  # the check sees lipmargin's own imports
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}


def test_bad_arguments_answer_without_torch() -> None:
    code = (
        "import sys\n"
        "from lipmargin.cli import build_parser, main\n"
        "build_parser()\n"
        "codes = [main(['train', '--no-such-flag']), main(['certify']), main(['--progress-every', 'soon', 'train']),\n"
        "         main(['train', '--help'])]\n"
        "assert codes == [2, 2, 2, 0], codes\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import lipmargin\n"
        "assert 'torch' not in sys.modules, 'import lipmargin imported torch'\n"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "unrecognized arguments: --no-such-flag" in proc.stderr


def test_package_names_resolve_lazily_to_the_same_objects() -> None:
    from lipmargin.certify import certify
    from lipmargin.train import fit

    assert lipmargin.fit is fit and lipmargin.certify is certify  # the function, not the submodule
    with pytest.raises(AttributeError, match="no_such_name"):
        lipmargin.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    ("load", "threads"),
    [
        (CpuLoad(cpus=2, runnable=1), 2),  # idle: every core
        (CpuLoad(cpus=2, runnable=2), 1),  # one other process busy
        (CpuLoad(cpus=2, runnable=3), 1),  # two busy (the loaded machine)
        (CpuLoad(cpus=2, runnable=9), 1),  # oversubscribed: never 0
        (CpuLoad(cpus=16, runnable=5), 12),
        (CpuLoad(cpus=8, runnable=None, load1=2.3), 5),  # no /proc/stat: the load average, rounded up
        (CpuLoad(cpus=8, runnable=None, load1=0.0), 8),
        (CpuLoad(cpus=4), 4),  # nothing known: torch's default
        (CpuLoad(cpus=0, runnable=1), 1),
    ],
)
def test_choose_threads_over_fake_readings(load: CpuLoad, threads: int) -> None:
    assert choose_threads(load) == threads


def test_proc_stat_parsing_and_live_reading() -> None:
    assert _procs_running("cpu 1 2 3\nprocs_running 3\nprocs_blocked 0\n") == 3
    assert _procs_running("cpu 1 2 3\n") is None
    load = read_cpu_load(samples=3, interval=0.0)
    assert load.cpus >= 1
    if load.runnable is not None:
        assert load.runnable >= 1  # this process was running while it read
    assert 1 <= choose_threads(load) <= load.cpus


def test_thread_choice_in_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    previous = torch.get_num_threads()
    try:
        assert main(["--threads", "0", "presets"]) == 2
        assert "--threads must be >= 1" in capsys.readouterr().err
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr("lipmargin.threads.read_cpu_load", lambda: CpuLoad(cpus=2, runnable=3))
        torch.set_num_threads(2)
        assert main(["presets"]) == 0
        assert torch.get_num_threads() == 1  # two others busy on two cores: one thread
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert main(["presets"]) == 0
        assert torch.get_num_threads() == 2  # an explicit OMP_NUM_THREADS is respected
    finally:
        torch.set_num_threads(previous)


def _raise(exc: BaseException):
    def fn(*args, **kwargs):
        raise exc

    return fn


@pytest.mark.parametrize(
    ("exc", "knob"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "train.batch_size"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"), "train.batch_size"),
        (MemoryError(), "train.device=cpu"),
    ],
)
def test_out_of_memory_is_one_line_naming_the_knob(
    exc: BaseException, knob: str, tiny_run_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setattr("lipmargin.train.fit", _raise(exc))
    capsys.readouterr()
    assert main(["train", *tiny_run_args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lipmargin: error: out of memory") and knob in err


def test_out_of_memory_in_certify_names_the_device(tiny_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(certify_cmd, "load_certifiable", _raise(torch.OutOfMemoryError("CUDA out of memory.")))
    capsys.readouterr()
    assert main(["certify", str(tiny_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cpu" in err


def test_other_runtime_errors_are_not_disguised(tiny_run_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lipmargin.train.fit", _raise(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", *tiny_run_args, "--out", str(tmp_path / "r")])


def test_eps_with_a_zero_denominator_is_one_line_exit_2(capsys) -> None:
    from lipmargin.cli import main

    assert main(["certify", "some-run", "--eps", "36/0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "36/0" in err
