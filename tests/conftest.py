"""Shared fixtures: a seeded torch per test, single-threaded torch, and one tiny trained run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _single_thread() -> object:
    """Tiny ops are much faster single-threaded on a busy machine; restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# A 3-epoch moons run.  lr 1e-2 (not the preset's 1e-3, the authors' 1001-epoch recipe) so that three
# epochs give a trained model whose margins the certificate tests can probe.
TINY_RUN_ARGS = ["--preset", "moons-cll", "--set", "train.epochs=3", "--set", "optim.lr=0.01"]


@pytest.fixture(scope="session")
def tiny_run_args() -> list[str]:
    """The `train` arguments of :func:`tiny_run` (without --out), to train comparable runs."""
    return list(TINY_RUN_ARGS)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-epoch two-moons CLL run trained through the CLI (read-only: copy it before changing it)."""
    from lipmargin.cli import main

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    code = main(["train", *TINY_RUN_ARGS, "--out", str(out), "--quiet"])
    assert code == 0, "training the tiny moons run failed"
    return out
