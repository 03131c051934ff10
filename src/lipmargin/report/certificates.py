"""The per-sample certificates of a run: read from ``certificates.csv`` or recomputed from a checkpoint."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lipmargin.report._common import _read_json

__all__ = ["Certificates", "load_certificates", "read_certificates"]


@dataclass(frozen=True)
class Certificates:
    """Per-sample results of a run's final evaluation (``certificates.csv``)."""

    target: np.ndarray  # (N,) int64
    prediction: np.ndarray  # (N,) int64
    radius: np.ndarray  # (N,) float64, may hold inf
    source: str  # where the numbers came from, for the report

    @property
    def correct(self) -> np.ndarray:
        return self.prediction == self.target


def read_certificates(path: str | Path) -> Certificates:
    """Read ``certificates.csv`` (``index,target,prediction,radius``; ``inf`` allowed)."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        expected = {"target", "prediction", "radius"}
        if reader.fieldnames is None or not expected <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns index,target,prediction,radius; got {reader.fieldnames}")
        rows = [(int(r["target"]), int(r["prediction"]), float(r["radius"])) for r in reader]
    arr = np.array(rows, dtype=np.float64).reshape(-1, 3)  # (N, 3)
    return Certificates(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2], path.name)


def load_certificates(run_dir: str | Path, *, checkpoint: str | Path | None = None) -> Certificates:
    """The per-sample radii of a run's final evaluation.

    Read from ``certificates.csv``; for a run folder without it, the final evaluation is run again
    from the newest checkpoint (or ``checkpoint``, see :func:`lipmargin.train.open_run`) with the
    run's bound method (``summary.json``'s ``bound_method``).
    Raises :class:`~lipmargin.checkpoint.CheckpointError` when neither is there.
    """
    run = Path(run_dir)
    if (run / "certificates.csv").is_file() and checkpoint is None:
        return read_certificates(run / "certificates.csv")
    method = str(_read_json(run / "summary.json").get("bound_method", "sound")) if (run / "summary.json").is_file() else "sound"
    return _recompute(run, method, [], checkpoint)[0]


def _recompute(
    run: Path, method: str, eps: Sequence[float], checkpoint: str | Path | None
) -> tuple[Certificates, dict[str, Any]]:
    """Evaluate a checkpoint of ``run`` again: its certificates and its metrics (as in summary.json)."""
    from lipmargin.train import evaluate, load_run_data, metrics_record, open_run

    loaded = open_run(run, checkpoint=checkpoint)
    data = load_run_data(loaded.config)
    result = evaluate(loaded.model, data.eval, list(eps), method=method, batch_size=loaded.config.eval.batch_size)
    certs = Certificates(
        result.target.numpy().astype(np.int64),
        result.prediction.numpy().astype(np.int64),
        result.radius.numpy().astype(np.float64),
        f"recomputed from the {loaded.checkpoint.name} checkpoint with the {method} bound",
    )
    return certs, {**metrics_record(result), "eval_split": data.eval_split}
