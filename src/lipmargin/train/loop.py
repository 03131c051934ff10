"""``fit``: a run from its config to a finished run folder (fresh, resumed or replacing an old run)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lipmargin._io import atomic_write_text
from lipmargin.certify import CertifyResult
from lipmargin.checkpoint import (
    CheckpointError,
    CheckpointRef,
    newest_intact_checkpoint,
    read_checkpoint_ref,
    save_checkpoints,
    set_torch_rng_state,
    torch_rng_state,
)
from lipmargin.config import RunConfig, config_from_dict, config_to_dict, load_yaml
from lipmargin.data import DATASETS, DeviceLoader
from lipmargin.losses import TRAIN_LOSSES
from lipmargin.train.build import build_optimizer, init_model, load_run_data, rng_devices
from lipmargin.train.ddp import DistInfo, dist_info_from_env, process_group
from lipmargin.train.errors import CheckpointSkippedWarning, TrainingError
from lipmargin.train.hardware import resolve_device, resolve_hardware
from lipmargin.train.runfiles import (
    TensorBoardLog,
    append_record,
    metrics_record,
    rewrite_metrics,
    run_checkpoint,
    run_summary,
    write_run_end,
)
from lipmargin.train.runfolder import RunExistsError, move_aside, run_files
from lipmargin.train.step import TrainStep, evaluate, train_one_epoch

__all__ = ["fit", "replaced_run_files", "same_run_config"]


def fit(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir``; returns the summary (also written to ``summary.json``).

    ``out_dir`` receives ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per evaluated
    epoch), ``checkpoints/epoch-*.{safetensors,json}`` and ``summary.json``.  With ``resume`` the
    newest intact checkpoint is loaded and training continues after its epoch; on CPU the result is
    the same as that of an uninterrupted run.  Every damaged newer checkpoint it skips is reported
    as a ``{"event": "checkpoint_skipped", "path", "reason"}`` event and a
    :class:`CheckpointSkippedWarning`.  ``summary.json`` names the final checkpoint under
    ``"checkpoint"``: ``{"path"`` (relative to ``out_dir``), ``"epoch"``, ``"sha256"`` (of the
    ``.safetensors`` file's bytes)``}``.

    A folder that already holds a run is never overwritten: without ``resume`` it raises
    :class:`~lipmargin.train.runfolder.RunExistsError`, unless ``overwrite`` is set, in which case the old
    run is renamed to ``<out_dir>.old-<time>`` (an ``{"event": "moved"}`` says where) once the new
    config has loaded its data.  A folder where the same config started but saved no checkpoint
    is simply restarted (nothing would be lost).

    ``on_event`` receives dicts: ``start``, ``batch`` (after every step), ``eval`` (evaluation
    progress), ``epoch`` (the metrics record), ``end`` (the summary) and ``moved``.

    The run draws its model and its random stream from ``train.seed`` under a fork of torch's
    global RNG: the caller's RNG state is the same after ``fit`` as before.

    >>> import tempfile
    >>> from lipmargin.config import load_config
    >>> cfg = load_config(preset="moons-cll", overrides=["train.epochs=1", "data.train_size=200", "data.test_size=100"])
    >>> with tempfile.TemporaryDirectory() as out:
    ...     summary = fit(cfg, out)
    ...     (Path(out) / "summary.json").is_file(), summary["checkpoint"]["epoch"]
    (True, 1)
    >>> summary["epochs"], summary["num_samples"], 0.0 <= summary["clean_accuracy"] <= 1.0
    (1, 100, True)
    """
    out = Path(out_dir)
    emit = on_event or (lambda event: None)
    start_epoch = 0
    checkpoint = None
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    replace = False
    if not resume:
        found = replaced_run_files(out, cfg)
        if found and not overwrite:
            raise RunExistsError(
                f"{out} already holds a run ({', '.join(found)}); continue it (resume) or move it aside (overwrite)",
                out, found,
            )
        replace = bool(found)
    if resume:
        checkpoint, skipped = newest_intact_checkpoint(out / "checkpoints")
        if checkpoint is None:
            raise TrainingError(f"--resume: no intact checkpoint under {out / 'checkpoints'}")
        for path, reason in skipped:
            message = f"resuming from {checkpoint.path.stem}: skipped the damaged checkpoint {path} ({reason})"
            warnings.warn(message, CheckpointSkippedWarning, stacklevel=2)
            emit({"event": "checkpoint_skipped", "path": str(path), "reason": reason, "message": message})
        cfg = config_from_dict(checkpoint.meta["config"])
        start_epoch = checkpoint.epoch
    dist = dist_info_from_env()
    device = resolve_device(cfg.train.device)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    cfg = resolve_hardware(cfg, device)
    with process_group(dist, device), torch.random.fork_rng(devices=rng_devices()):
        return _fit(cfg, out, device, dist, checkpoint, start_epoch, emit, replace)


def replaced_run_files(out: str | Path, cfg: RunConfig) -> list[str]:
    """What a fresh run of ``cfg`` in ``out`` would destroy (see :data:`~lipmargin.train.runfolder.RUN_FILES`).

    Empty for a new or empty folder, and for one where the same config started but never reached
    a checkpoint (only ``config.yaml`` and maybe ``metrics.jsonl``): restarting that loses nothing.
    """
    folder = Path(out)
    found = run_files(folder)
    if found and set(found) <= {"config.yaml", "metrics.jsonl"} and same_run_config(folder, cfg):
        return []
    return found


def same_run_config(run_dir: str | Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir/config.yaml`` resolves to ``cfg`` (False when missing or unreadable)."""
    try:
        saved = config_from_dict(load_yaml((Path(run_dir) / "config.yaml").read_text()))
        # fit writes precision and layout resolved for the device ("auto" -> fp32, ...): compare
        # both configs as fit would have resolved them.
        device = resolve_device(cfg.train.device)
        return config_to_dict(resolve_hardware(saved, device)) == config_to_dict(resolve_hardware(cfg, device))
    except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError, TrainingError):
        return False


def _fit(
    cfg: RunConfig,
    out: Path,
    device: torch.device,
    dist: DistInfo,
    checkpoint: Any,
    start_epoch: int,
    emit: Callable[[dict[str, Any]], None],
    replace: bool = False,
) -> dict[str, Any]:
    main = dist.is_main
    # Everything that can fail on bad input happens before the run folder is created.
    data = load_run_data(cfg)
    # fit runs under a fork of the global RNG (see fit): the run's stream continues from its
    # seeded initialisation, and the caller's RNG state is restored afterwards.
    model, rng = init_model(cfg, data.train.input_shape, data.train.num_classes)
    set_torch_rng_state(rng)
    model = model.to(device)
    if cfg.train.precision == "fp64":
        model = model.double()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if main:
        if replace and run_files(out):
            emit({"event": "moved", "run_dir": str(out), "moved_to": str(move_aside(out))})
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.optim.milestones), cfg.optim.gamma)
    train_seconds = 0.0
    final_ref: CheckpointRef | None = checkpoint.ref if checkpoint is not None else None
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint.model_state)
            optimizer.load_state_dict(checkpoint.extra_state["optimizer"])
            scheduler.load_state_dict(checkpoint.extra_state["scheduler"])
            set_torch_rng_state(checkpoint.extra_state.get("rng", {}))
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {checkpoint.path} does not match the configured model: {str(e).splitlines()[0]}") from None
        train_seconds = float(checkpoint.meta.get("train_seconds", 0.0))
        if main:
            rewrite_metrics(out / "metrics.jsonl", start_epoch)
    elif main and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    compile_mode = None if cfg.train.compile == "none" else cfg.train.compile
    step_module: nn.Module = TrainStep(model, cfg.train.power_iters, cfg.train.precision, compile_mode, cfg.train.power_grad)
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)

    train_loss = TRAIN_LOSSES[cfg.loss.name](cfg.loss)
    aug = None
    if cfg.data.augment:
        aug = DATASETS[cfg.data.name].augment
    loader = DeviceLoader(
        data.train, cfg.train.batch_size, device=device, shuffle=True, augment=aug, seed=cfg.train.seed,
        rank=dist.rank, world_size=dist.world_size,
    )
    emit({"event": "start", "epochs": cfg.train.epochs, "start_epoch": start_epoch, "device": str(device),
          "steps": len(loader), "samples": len(data.train),
          "precision": cfg.train.precision, "channels_last": cfg.train.channels_last})
    last_eval: CertifyResult | None = None
    board = TensorBoardLog(out / "tensorboard") if main else None
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        loader.set_epoch(epoch)

        def on_batch(step: int, seen: int, epoch: int = epoch) -> None:
            emit({"event": "batch", "epoch": epoch, "step": step, "samples": seen})

        stats = train_one_epoch(
            model, loader, optimizer, train_loss, epoch, len(loader), epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size, penalty=cfg.loss.lipschitz_penalty, penalty_power=cfg.loss.penalty_power,
            step_module=step_module, dist=dist, on_batch=on_batch,
        )
        scheduler.step()
        train_seconds += stats.seconds
        per_layer = model.bound.converge()  # end-of-epoch convergence (docs/method.md#power-iteration)
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "lr": optimizer.param_groups[0]["lr"],
            "lipschitz_per_layer": [float(v) for v in per_layer],
            "seconds": stats.seconds,
        }
        is_last = epoch == cfg.train.epochs
        if is_last or (cfg.eval.every > 0 and epoch % cfg.eval.every == 0):
            last_eval = evaluate(model, data.eval, cfg.eval.eps, method=cfg.eval.bound, batch_size=cfg.eval.batch_size,
                                 on_event=lambda e: emit({**e, "event": "eval", "total": len(data.eval)}))
            record.update(metrics_record(last_eval))
            record["eval_split"] = data.eval_split
        if not main:
            continue  # every rank trains and evaluates; only rank 0 writes
        append_record(out / "metrics.jsonl", record)
        if board is not None:
            board.log(record)
        if is_last or epoch % cfg.train.checkpoint_every == 0:
            (saved,) = save_checkpoints([run_checkpoint(
                out, cfg, epoch, model.state_dict(), optimizer.state_dict(), scheduler.state_dict(),
                torch_rng_state(), train_seconds, record, data.train,
            )])
            final_ref = read_checkpoint_ref(saved)
        emit({"event": "epoch", **record})

    if board is not None:
        board.close()
    if last_eval is None:  # resumed a run that had already finished
        last_eval = evaluate(model, data.eval, cfg.eval.eps, method=cfg.eval.bound, batch_size=cfg.eval.batch_size)
    summary = run_summary(cfg, last_eval, data.eval_split, train_seconds, model)
    if final_ref is not None:  # the weights these metrics belong to
        summary["checkpoint"] = final_ref.to_dict(relative_to=out)
    if main:
        write_run_end(out, summary, last_eval)
        emit({"event": "end", **summary})
    return summary
