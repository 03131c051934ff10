"""Training: ``fit(config, out_dir)``, one epoch, evaluation, checkpoints and resume.

The library does not print: progress is reported through the optional ``on_event`` callback
(the CLI draws the progress display).  Modules:

- :mod:`~lipmargin.train.loop`: :func:`fit` (a run from its config to a finished run folder).
- :mod:`~lipmargin.train.step`: :class:`TrainStep`, :func:`train_one_epoch`, :func:`evaluate`.
- :mod:`~lipmargin.train.build`: the run's data, seeded model and optimizer.
- :mod:`~lipmargin.train.hardware`: device, precision and memory layout resolved for the machine.
- :mod:`~lipmargin.train.ddp`: torchrun ranks, the process group, all-reduce.
- :mod:`~lipmargin.train.runfiles`: metrics, certificates, checkpoints and summary of a run folder;
  :func:`open_run` / :func:`load_run` rebuild a run's model.
- :mod:`~lipmargin.train.runfolder`: what makes a folder a run folder; moving an old run aside.
- :mod:`~lipmargin.train.errors`: :class:`TrainingError`, :class:`CheckpointSkippedWarning`.
- :mod:`~lipmargin.train.batched` / :mod:`~lipmargin.train.stacked`: several runs of a sweep
  trained as one stacked model.

The training losses by name (``TRAIN_LOSSES``) live in :mod:`lipmargin.losses.objectives`, below
the config, and are re-exported here.
"""

from lipmargin.losses import TRAIN_LOSSES, TrainLoss, list_train_losses, register_train_loss
from lipmargin.train.build import RunData, build_model, build_optimizer, init_model, load_run_data
from lipmargin.train.ddp import DistInfo, dist_info_from_env
from lipmargin.train.errors import CheckpointSkippedWarning, TrainingError
from lipmargin.train.hardware import (
    FAST_BF16_CPU_FLAGS,
    cpu_flags,
    resolve_channels_last,
    resolve_device,
    resolve_hardware,
    resolve_precision,
)
from lipmargin.train.loop import fit, replaced_run_files, same_run_config
from lipmargin.train.batched import plan_groups, train_group
from lipmargin.train.runfolder import RunExistsError, move_aside, move_report_aside, report_files, run_files
from lipmargin.train.runfiles import (
    LoadedRun,
    eps_key,
    load_run,
    metrics_record,
    open_run,
    run_checkpoint,
    run_summary,
    write_certificates,
    write_run_end,
)
from lipmargin.train.step import EpochStats, TrainStep, eval_batches, evaluate, train_one_epoch

__all__ = [
    "TRAIN_LOSSES",
    "TrainLoss",
    "register_train_loss",
    "list_train_losses",
    "TrainingError",
    "CheckpointSkippedWarning",
    "RunData",
    "resolve_device",
    "resolve_precision",
    "resolve_channels_last",
    "resolve_hardware",
    "cpu_flags",
    "FAST_BF16_CPU_FLAGS",
    "DistInfo",
    "dist_info_from_env",
    "load_run_data",
    "build_model",
    "init_model",
    "build_optimizer",
    "TrainStep",
    "EpochStats",
    "train_one_epoch",
    "evaluate",
    "eval_batches",
    "fit",
    "replaced_run_files",
    "same_run_config",
    "eps_key",
    "metrics_record",
    "write_certificates",
    "run_checkpoint",
    "run_summary",
    "write_run_end",
    "load_run",
    "LoadedRun",
    "open_run",
    "RunExistsError",
    "run_files",
    "move_aside",
    "report_files",
    "move_report_aside",
    "plan_groups",
    "train_group",
]
