"""DistributedDataParallel (gloo, CPU): 2 ranks train like 1 process with the same global batch.

float64 training makes the comparison meaningful: in float32 the two runs differ by rounding in
the gradient reductions (a sum over 64 samples vs two sums over 32), and training amplifies a
1e-7 perturbation to ~1e-4 within two epochs, so only float64 can show the runs are the same
computation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["train", "--preset", "digits-cll", "--set", "train.epochs=2", "--quiet"]  # the preset trains in float64


def _run(nproc: int, out: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "lipmargin", *ARGS, *extra, "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lipmargin", *ARGS, *extra, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def _resume(run: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lipmargin", "train", "--resume", str(run), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def _close(a: dict, b: dict) -> None:
    assert a["clean_accuracy"] == pytest.approx(b["clean_accuracy"], abs=1e-4)
    for eps in a["certified_accuracy"]:
        assert a["certified_accuracy"][eps] == pytest.approx(b["certified_accuracy"][eps], abs=1e-4)
    assert a["lipschitz"] == pytest.approx(b["lipschitz"], rel=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ddp")
    out = {"one": base / "one", "two": base / "two"}
    _run(1, out["one"])
    _run(2, out["two"])
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_two_ranks_match_one_process(runs) -> None:
    _close(_summary(runs["two"]), _summary(runs["one"]))
    lines = (runs["two"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]  # written once, by rank 0


def test_checkpoint_from_two_ranks_resumes_on_one(runs, tmp_path) -> None:
    import shutil

    run = tmp_path / "cut"
    shutil.copytree(runs["two"], run)
    for suffix in (".json", ".safetensors"):
        (run / "checkpoints" / f"epoch-000002{suffix}").unlink()
    (run / "summary.json").unlink()
    _resume(run)
    _close(_summary(run), _summary(runs["two"]))
