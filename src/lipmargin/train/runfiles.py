"""The files of a run folder: metrics, certificates, TensorBoard, checkpoints, summary; reopening a run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lipmargin._io import atomic_write_text
from lipmargin.certify import CertifyResult
from lipmargin.checkpoint import CheckpointError, CheckpointRef, PendingCheckpoint, resolve_checkpoint
from lipmargin.config import RunConfig, config_from_dict, config_to_dict
from lipmargin.data import ArrayDataset, load_dataset
from lipmargin.models import LipschitzNet
from lipmargin.train.build import build_model

__all__ = [
    "eps_key", "metrics_record", "write_certificates", "rewrite_metrics", "append_record", "TensorBoardLog",
    "run_checkpoint", "run_summary", "write_run_end", "LoadedRun", "open_run", "load_run",
]


def eps_key(eps: float) -> str:
    """A stable, short text form of a radius for JSON keys (``0.1411764705882353`` -> ``0.141176``).

    >>> eps_key(36 / 255)
    '0.141176'
    """
    return f"{eps:.6g}"


def metrics_record(result: CertifyResult) -> dict[str, Any]:
    """The evaluation part of a ``metrics.jsonl`` line / ``summary.json``: accuracies keyed by :func:`eps_key`."""
    return {
        "clean_accuracy": result.clean_accuracy,
        "certified_accuracy": {eps_key(e): v for e, v in result.certified_accuracy.items()},
        "lipschitz": result.lipschitz,
        "lipschitz_features": result.bound.feature,
        "bound_method": result.bound_method,
        "num_samples": result.num_samples,
    }


def write_certificates(path: Path, result: CertifyResult) -> None:
    """Per-sample ``index,target,prediction,radius`` of an evaluation, as CSV (radius may be inf)."""
    lines = ["index,target,prediction,radius"]
    rows = zip(result.target.tolist(), result.prediction.tolist(), result.radius.tolist())
    lines += [f"{i},{t},{c},{r!r}" for i, (t, c, r) in enumerate(rows)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def rewrite_metrics(path: Path, upto_epoch: int) -> None:
    """Keep the metrics lines of epochs <= ``upto_epoch`` (those a resumed run will not redo)."""
    kept: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(rec, dict) and int(rec.get("epoch", 0)) <= upto_epoch:
                kept.append(rec)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class TensorBoardLog:
    """Scalars to TensorBoard event files when the ``[tensorboard]`` extra is installed; else nothing."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the extra is optional: metrics.jsonl is always written
            self.writer = None
        else:
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record["epoch"])
        for key in ("train_loss", "train_accuracy", "lr", "clean_accuracy", "lipschitz"):
            if key in record:
                self.writer.add_scalar(key, float(record[key]), step)
        for eps, acc in record.get("certified_accuracy", {}).items():
            self.writer.add_scalar(f"certified_accuracy/{eps}", acc, step)
        for i, k in enumerate(record.get("lipschitz_per_layer", [])):
            self.writer.add_scalar(f"lipschitz_layer/{i}", k, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (``metrics.jsonl``), flushed at once."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def run_checkpoint(
    out: Path,
    cfg: RunConfig,
    epoch: int,
    model_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    rng_state: dict[str, Tensor],
    train_seconds: float,
    record: dict[str, Any],
    train_data: ArrayDataset,
) -> PendingCheckpoint:
    """The checkpoint of a run folder after ``epoch`` (what ``--resume`` and ``load_run`` read), for
    ``save_checkpoints`` (one run, or the members of a batched sweep at once)."""
    return PendingCheckpoint(
        out / "checkpoints",
        epoch,
        model_state,
        {"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state},
        {
            "config": config_to_dict(cfg),
            "train_seconds": train_seconds,
            "metrics": record,
            "data_shape": {"in_shape": list(train_data.input_shape), "num_classes": train_data.num_classes},
        },
        keep=cfg.train.keep_checkpoints,
    )


def run_summary(
    cfg: RunConfig, last_eval: CertifyResult, eval_split: str, train_seconds: float, model: nn.Module
) -> dict[str, Any]:
    """The ``summary.json`` payload of a finished run."""
    return {
        **metrics_record(last_eval),
        "epochs": cfg.train.epochs,
        "eval_split": eval_split,
        "train_seconds": train_seconds,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "model": cfg.model.name,
        "loss": cfg.loss.name,
        "dataset": cfg.data.name,
        "seed": cfg.train.seed,
        "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last,
        "device": next(model.parameters()).device.type,
    }


def write_run_end(out: Path, summary: dict[str, Any], last_eval: CertifyResult) -> None:
    """``certificates.csv`` and, last (it marks the run finished), ``summary.json``."""
    write_certificates(out / "certificates.csv", last_eval)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))


@dataclass(frozen=True)
class LoadedRun:
    """A run's model rebuilt from one verified checkpoint, and which one (:func:`open_run`)."""

    config: RunConfig
    model: LipschitzNet
    checkpoint: CheckpointRef

    @property
    def epoch(self) -> int:
        return self.checkpoint.epoch


def open_run(run_dir: str | Path, device: str | torch.device = "cpu", *, checkpoint: str | Path | None = None) -> LoadedRun:
    """Rebuild the model of a run folder from its newest checkpoint, or from ``checkpoint``.

    There is no fallback: when the newest checkpoint is damaged this raises
    :class:`~lipmargin.checkpoint.DamagedCheckpointError` naming it and the intact ones.
    ``checkpoint`` is a name in the run's ``checkpoints/`` (``epoch-000001``) or a path to a
    checkpoint file (see :func:`lipmargin.checkpoint.resolve_checkpoint`).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run folder {run} does not exist")
    ckpt = resolve_checkpoint(run / "checkpoints", checkpoint)
    if not isinstance(ckpt.meta.get("config"), dict):
        raise CheckpointError(f"checkpoint {ckpt.path} holds no config")
    try:
        cfg = config_from_dict(ckpt.meta["config"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {ckpt.path} holds no valid config: {e}") from None
    data_shape = ckpt.meta.get("data_shape")
    in_shape, num_classes = _model_shape_from_state(ckpt.model_state, cfg, data_shape)
    try:
        model = build_model(cfg, in_shape, num_classes)
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt.path} does not match model {cfg.model.name}: {str(e).splitlines()[0]}") from None
    return LoadedRun(cfg, model.to(device).eval(), ckpt.ref)


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", *, checkpoint: str | Path | None = None
) -> tuple[RunConfig, LipschitzNet, int]:
    """``(config, model, epoch)`` of :func:`open_run` (which also says which checkpoint file it was)."""
    loaded = open_run(run_dir, device, checkpoint=checkpoint)
    return loaded.config, loaded.model, loaded.epoch


def _model_shape_from_state(state: dict[str, Tensor], cfg: RunConfig, data_shape: Any) -> tuple[tuple[int, ...], int]:
    if data_shape is not None:
        ok = (
            isinstance(data_shape, dict)
            and isinstance(data_shape.get("in_shape"), list)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in data_shape["in_shape"])
            and isinstance(data_shape.get("num_classes"), int)
            and not isinstance(data_shape["num_classes"], bool)
        )
        if not ok:
            raise CheckpointError(f"checkpoint data_shape {str(data_shape)[:80]} must be {{'in_shape': [positive ints], 'num_classes': int}}")
        return tuple(data_shape["in_shape"]), data_shape["num_classes"]
    ds = load_dataset(cfg.data.name, cfg.data.root, "test")
    return ds.input_shape, ds.num_classes
