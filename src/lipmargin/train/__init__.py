"""Training: ``fit(config, out_dir)``, one epoch, evaluation, checkpoints and resume.

The library does not print: progress is reported through the optional ``on_event`` callback
(the CLI draws the progress display).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from lipmargin.certify import CertifyResult, certify, model_bound
from lipmargin.checkpoint import (
    CheckpointError,
    CheckpointRef,
    PendingCheckpoint,
    atomic_write_text,
    latest_checkpoint,
    newest_intact_checkpoint,
    read_checkpoint_ref,
    resolve_checkpoint,
    save_checkpoints,
    set_torch_rng_state,
    torch_rng_state,
)
from lipmargin.config import LossConfig, RunConfig, config_from_dict, config_to_dict
from lipmargin.data import ArrayDataset, DeviceLoader, load_dataset, stratified_subset, train_val_split
from lipmargin.lipschitz import pairwise_head_norms
from lipmargin.losses import (
    cert_reg_loss,
    cll_loss,
    gloro_eps_schedule,
    gloro_loss,
    hkr_loss,
    k_scale_schedule,
    lmt_loss,
    lipschitz_penalty,
)
from lipmargin.models import LipschitzNet, create_model
from lipmargin.train.runfolder import RunExistsError, move_aside, run_files

__all__ = [
    "TRAIN_LOSSES",
    "register_train_loss",
    "list_train_losses",
    "TrainingError",
    "RunData",
    "resolve_device",
    "resolve_precision",
    "resolve_channels_last",
    "resolve_hardware",
    "cpu_flags",
    "load_run_data",
    "build_model",
    "train_one_epoch",
    "evaluate",
    "fit",
    "load_run",
    "LoadedRun",
    "open_run",
    "CheckpointSkippedWarning",
    "metrics_record",
]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an unusable run folder); one-line message."""


class CheckpointSkippedWarning(UserWarning):
    """``fit(resume=True)`` skipped a damaged checkpoint newer than the one it continues from."""


# --------------------------------------------------------------------------------------------
# Training losses by name: (logits, target, model, K, progress) -> scalar
# --------------------------------------------------------------------------------------------

TrainLoss = Callable[[Tensor, Tensor, LipschitzNet, Tensor, float], Tensor]
TRAIN_LOSSES: dict[str, Callable[[LossConfig], TrainLoss]] = {}


def register_train_loss(name: str) -> Callable[[Callable[[LossConfig], TrainLoss]], Callable[[LossConfig], TrainLoss]]:
    """Decorator: register ``build(loss_config) -> train_loss`` under ``name`` (``loss.name``)."""

    def decorator(build: Callable[[LossConfig], TrainLoss]) -> Callable[[LossConfig], TrainLoss]:
        TRAIN_LOSSES[name] = build
        return build

    return decorator


def list_train_losses() -> list[str]:
    return sorted(TRAIN_LOSSES)


@register_train_loss("cll")
def _cll(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: LipschitzNet, k: Tensor, progress: float) -> Tensor:
        w = model.head.weight
        if cfg.per_logit:
            bound = k * w.norm(dim=1)  # (C,)
        else:
            bound = (k * pairwise_head_norms(w))[target]  # (B, C): the target's row
        scale = k_scale_schedule(progress) if cfg.k_scale_schedule else 1.0
        return cll_loss(
            logits, target, bound, cfg.eps, cfg.p, one_sided=cfg.one_sided, per_logit=cfg.per_logit,
            k_scale=scale, detach_lipschitz=cfg.detach_lipschitz,
        )

    return loss


@register_train_loss("gloro")
def _gloro(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: LipschitzNet, k: Tensor, progress: float) -> Tensor:
        eps = gloro_eps_schedule(progress, cfg.eps) if cfg.eps_anneal else cfg.eps
        return gloro_loss(logits, target, model.pairwise_lipschitz(k), eps, trades_lambda=cfg.trades_lambda)

    return loss


@register_train_loss("lmt")
def _lmt(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: LipschitzNet, k: Tensor, progress: float) -> Tensor:
        return lmt_loss(logits, target, model.pairwise_lipschitz(k)[target], cfg.eps)

    return loss


@register_train_loss("hkr")
def _hkr(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: LipschitzNet, k: Tensor, progress: float) -> Tensor:
        return hkr_loss(logits, target, alpha=cfg.hkr_alpha, min_margin=cfg.hkr_margin)

    return loss


@register_train_loss("ce-cr")
def _ce_cr(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: LipschitzNet, k: Tensor, progress: float) -> Tensor:
        return cert_reg_loss(logits, target, model.pairwise_lipschitz(k.detach())[target], cfg.cr_gamma)

    return loss


@register_train_loss("ce")
def _ce(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: LipschitzNet, k: Tensor, progress: float) -> Tensor:
        return F.cross_entropy(logits, target)

    return loss


# --------------------------------------------------------------------------------------------
# Data and model for a run
# --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device is {name!r} but no CUDA device is available; use cpu or auto")
    return dev


#: CPU flags (``/proc/cpuinfo``) with which oneDNN runs bfloat16 convolutions and matmuls natively
#: (AMX tiles on Sapphire Rapids and later; AVX512-BF16 on Cooper Lake / Zen 4).  Without them
#: PyTorch's CPU bfloat16 convolution falls back to a slow reference kernel (measured 10-30x
#: slower than float32 on an AVX2-only EPYC), so ``auto`` keeps float32 there.
FAST_BF16_CPU_FLAGS: frozenset[str] = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor listed in ``cpuinfo`` (empty if unreadable)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:  # not Linux, or no procfs
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM spelling
            return frozenset(value.split())
    return frozenset()


def resolve_precision(
    precision: str, device: torch.device, *, flags: frozenset[str] | None = None, cuda_bf16: bool | None = None
) -> str:
    """``train.precision`` with ``auto`` replaced by what runs fastest on ``device``.

    ``auto`` is ``bf16`` on a CUDA device that supports bfloat16 and on a CPU with one of
    :data:`FAST_BF16_CPU_FLAGS`, ``fp32`` elsewhere.  ``flags`` / ``cuda_bf16`` replace the
    machine's own answers (for tests); other values are returned unchanged.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        return "bf16" if supported else "fp32"
    if device.type == "cpu":
        return "bf16" if FAST_BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags) else "fp32"
    return "fp32"


def resolve_channels_last(channels_last: bool | None, device: torch.device, precision: str) -> bool:
    """``train.channels_last`` with ``None`` (auto) replaced by the layout measured faster.

    The rule (benchmarks/cpu_precision.py, docs/results.md): channels-last on CUDA with bf16
    (tensor-core convolutions want NHWC) and on a CPU in bf16 (oneDNN's AMX kernels are NHWC);
    contiguous NCHW otherwise, which was faster for float32 on the CPU.
    """
    if channels_last is not None:
        return channels_last
    return precision == "bf16" and device.type in ("cuda", "cpu")


def resolve_hardware(cfg: RunConfig, device: torch.device) -> RunConfig:
    """``cfg`` with ``train.precision`` and ``train.channels_last`` resolved for ``device``.

    The resolved values go into the run's ``config.yaml`` and summary, so a run folder always says
    which precision and layout it trained with (a resumed run keeps them).
    """
    precision = resolve_precision(cfg.train.precision, device)
    layout = resolve_channels_last(cfg.train.channels_last, device, precision)
    return replace(cfg, train=replace(cfg.train, precision=precision, channels_last=layout))


@dataclass(frozen=True)
class RunData:
    train: ArrayDataset
    eval: ArrayDataset  # the validation part when data.val_fraction > 0, else the test set
    eval_split: str


def load_run_data(cfg: RunConfig) -> RunData:
    """The run's training and evaluation sets, with ``data.train_size`` / ``data.test_size`` applied.

    The subsets are class-stratified and drawn from ``train.seed`` (streams 0 and 1), after the
    validation split; a size above what the set holds is a one-line :class:`TrainingError`.
    """
    train = load_dataset(cfg.data.name, cfg.data.root, "train")
    if cfg.data.val_fraction > 0:
        train, ev = train_val_split(train, cfg.data.val_fraction, seed=0)
        split = "val"
    else:
        ev, split = load_dataset(cfg.data.name, cfg.data.root, "test"), "test"
    train = _sized(train, cfg.data.train_size, "data.train_size", "training", cfg.train.seed, 0)
    ev = _sized(ev, cfg.data.test_size, "data.test_size", f"{split} evaluation", cfg.train.seed, 1)
    return RunData(train, ev, split)


def _sized(ds: ArrayDataset, size: int | None, key: str, what: str, seed: int, stream: int) -> ArrayDataset:
    if size is None:
        return ds
    if size > len(ds):
        raise TrainingError(f"{key}={size} is more than the {len(ds)} samples of the {what} set of {ds.name}")
    return stratified_subset(ds, size, seed, stream=stream)


def build_model(cfg: RunConfig, in_shape: tuple[int, ...], num_classes: int) -> LipschitzNet:
    """Create the configured model with the run's seed (the same init on every call)."""
    options: dict[str, Any] = {}
    if cfg.model.width is not None:
        options["width"] = cfg.model.width
    if cfg.model.widths is not None:
        options["widths"] = cfg.model.widths
    torch.manual_seed(cfg.train.seed)
    try:
        return create_model(cfg.model.name, in_shape, num_classes, **options)
    except TypeError as e:
        raise TrainingError(f"model {cfg.model.name!r} does not take the options {sorted(options)}: {e}") from None
    except ValueError as e:
        raise TrainingError(f"model.name={cfg.model.name}: {e}") from None


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (METHOD.md); the fused CUDA kernel on GPUs, where the step is launch-bound."""
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda"
    )


def eval_batches(ds: ArrayDataset, batch_size: int, device: torch.device) -> DeviceLoader:
    return DeviceLoader(ds, batch_size, device=device, shuffle=False)


# --------------------------------------------------------------------------------------------
# Distributed training (torchrun) and the per-step forward
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """Rank and world size as set by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise TrainingError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
    return DistInfo(rank, world, local)


@contextlib.contextmanager
def _process_group(info: DistInfo, device: torch.device):
    """Join the process group for the duration of a run (NCCL on GPUs, gloo on CPU)."""
    import torch.distributed as dist

    if info.world_size == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


class TrainStep(nn.Module):
    """``x -> (logits, K)``: the model's forward and the power-iteration bound in one module.

    Both run inside one ``forward`` so that DistributedDataParallel sees every parameter the loss
    touches.  The logits may run under bf16 autocast; the bound never does.  ``compile`` names a
    ``torch.compile`` mode for the whole step (forward and the power iterations, which on a GPU
    are launch-bound batch-1 convolutions); ``None`` runs eagerly.
    """

    def __init__(self, model: LipschitzNet, power_iters: int, precision: str = "fp32", compile: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.power_iters = power_iters
        self.precision = precision
        self._step: Callable[[Tensor], tuple[Tensor, Tensor]] = (
            torch.compile(self._eager, mode=compile) if compile else self._eager  # type: ignore[assignment]
        )

    def _eager(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.precision == "fp64":
            x = x.double()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(x)
        k, _ = self.model.feature_lipschitz(self.power_iters)
        return (logits if self.precision == "fp64" else logits.float()), k

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._step(x)


# --------------------------------------------------------------------------------------------
# One epoch, evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    lipschitz_estimate: float
    seconds: float


def train_one_epoch(
    model: LipschitzNet,
    loader: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    train_loss: TrainLoss,
    cfg: RunConfig,
    epoch: int,
    steps_per_epoch: int,
    *,
    step_module: nn.Module | None = None,
    dist: DistInfo = DistInfo(),
    on_batch: Callable[[int, int], None] | None = None,
) -> EpochStats:
    """One pass over ``loader``; ``epoch`` counts from 1.  Raises TrainingError on a non-finite loss.

    ``step_module`` maps a batch to ``(logits, K)`` (a :class:`TrainStep`, possibly wrapped in
    DistributedDataParallel); by default a plain TrainStep of ``model``.  Loss and accuracy are
    summed over all ranks.  ``on_batch(steps_done, samples_done)`` is called after every step
    (this rank's samples; it must be cheap: it runs in the hot loop).
    """
    step_fn = step_module if step_module is not None else TrainStep(model, cfg.train.power_iters)
    batch_size = cfg.train.batch_size
    n_total = len(loader.dataset) if isinstance(loader, DeviceLoader) else 0
    if dist.world_size > 1 and not isinstance(loader, DeviceLoader):
        raise TrainingError("distributed training needs a DeviceLoader (it knows the global batch sizes)")
    model.train()
    device = next(model.parameters()).device
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    # Index of the first step with a non-finite loss, -1 while all are finite; kept on the device so
    # the hot loop never waits for the GPU.
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen = 0
    k = torch.ones((), device=device)
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        progress = (epoch - 1 + step / max(steps_per_epoch, 1)) / cfg.train.epochs
        logits, k = step_fn(x)
        if dist.world_size > 1:
            # DDP averages gradients over ranks; weight each rank's mean by its share of the global
            # batch so that the average is the global-batch mean even when the last batch splits
            # unevenly (or leaves a rank empty).
            global_b = min(batch_size, n_total - step * batch_size)
            share = y.shape[0] * dist.world_size / global_b
            loss = train_loss(logits, y, model, k, progress) * share if y.shape[0] else logits.sum() * 0.0
        else:
            loss = train_loss(logits, y, model, k, progress)
        if cfg.loss.lipschitz_penalty > 0:
            k_tot = k * pairwise_head_norms(model.head.weight).max()
            loss = loss + lipschitz_penalty(k_tot, cfg.loss.lipschitz_penalty, cfg.loss.penalty_power)
        finite = torch.isfinite(loss)
        first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, step), first_bad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().double() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.shape[0]
        if on_batch is not None:
            on_batch(step + 1, seen)
    if dist.world_size > 1:
        totals = torch.stack([total_loss, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64),
                              (first_bad >= 0).double()])
        _all_reduce_sum(totals, dist)
        total_loss, correct, seen = totals[0], totals[1], int(totals[2])
        if float(totals[3]) > 0 and int(first_bad) < 0:
            first_bad = torch.zeros_like(first_bad)  # another rank saw it; the step is not known here
    bad = int(first_bad)
    if bad >= 0:
        raise TrainingError(
            f"non-finite training loss at epoch {epoch}, step {bad + 1}; the last good checkpoint is kept "
            f"(try a smaller optim.lr or loss.lipschitz_penalty)"
        )
    return EpochStats(
        loss=float(total_loss) / max(seen, 1),
        accuracy=float(correct) / max(seen, 1),
        lipschitz_estimate=float(k.detach()),
        seconds=time.perf_counter() - start,
    )


def evaluate(
    model: LipschitzNet,
    ds: ArrayDataset,
    eps: Iterable[float],
    *,
    method: str,
    batch_size: int = 1000,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> CertifyResult:
    """Clean and certified accuracy of ``model`` on ``ds`` with the named bound method.

    ``on_event`` receives :func:`lipmargin.certify.certify`'s progress events.
    """
    device = next(model.parameters()).device
    # On a copy: converging the power iteration must not move the training model's vectors, so
    # that evaluating (or not) never changes how training goes on.
    bound = model_bound(copy.deepcopy(model), method)
    return certify(model, eval_batches(ds, batch_size, device), list(eps), bound=bound, on_event=on_event)


def eps_key(eps: float) -> str:
    """A stable, short text form of a radius for JSON keys (``0.1411764705882353`` -> ``0.141176``)."""
    return f"{eps:.6g}"


def metrics_record(result: CertifyResult) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


def _rewrite_metrics(path: Path, upto_epoch: int) -> None:
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


class _TensorBoard:
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


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


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
    with _process_group(dist, device):
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
        saved = config_from_dict(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
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
    model = build_model(cfg, data.train.input_shape, data.train.num_classes).to(device)
    if cfg.train.precision == "fp64":
        model = model.double()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if main:
        if replace and run_files(out):
            emit({"event": "moved", "run_dir": str(out), "moved_to": str(move_aside(out))})
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    optimizer = build_optimizer(model, cfg, device)
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
            _rewrite_metrics(out / "metrics.jsonl", start_epoch)
    elif main and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    compile_mode = None if cfg.train.compile == "none" else cfg.train.compile
    step_module: nn.Module = TrainStep(model, cfg.train.power_iters, cfg.train.precision, compile_mode)
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)

    train_loss = TRAIN_LOSSES[cfg.loss.name](cfg.loss)
    aug = None
    if cfg.data.augment:
        from lipmargin.data import DATASETS

        aug = DATASETS[cfg.data.name].augment
    loader = DeviceLoader(
        data.train, cfg.train.batch_size, device=device, shuffle=True, augment=aug, seed=cfg.train.seed,
        rank=dist.rank, world_size=dist.world_size,
    )
    emit({"event": "start", "epochs": cfg.train.epochs, "start_epoch": start_epoch, "device": str(device),
          "steps": len(loader), "samples": len(data.train),
          "precision": cfg.train.precision, "channels_last": cfg.train.channels_last})
    last_eval: CertifyResult | None = None
    board = _TensorBoard(out / "tensorboard") if main else None
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        loader.set_epoch(epoch)

        def on_batch(step: int, seen: int, epoch: int = epoch) -> None:
            emit({"event": "batch", "epoch": epoch, "step": step, "samples": seen})

        stats = train_one_epoch(
            model, loader, optimizer, train_loss, cfg, epoch, len(loader), step_module=step_module, dist=dist,
            on_batch=on_batch,
        )
        scheduler.step()
        train_seconds += stats.seconds
        per_layer = model.bound.converge()  # end-of-epoch convergence (METHOD.md section 3)
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
        _append_line(out / "metrics.jsonl", record)
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
