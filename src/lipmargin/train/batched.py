"""Batched sweeps: the runs of a sweep that share model, data and schedule train as one stacked model.

Each member keeps everything a separate run has: its seed (so its initial weights and
power-iteration vectors are the ones :func:`lipmargin.train.fit` would draw), its data order and
augmentation, its loss settings (eps, p, penalty, even the loss itself) and its evaluation
settings.  What members share is the computation graph: one forward / power iteration / backward
over parameters stacked along a leading member dimension (``torch.func.vmap`` over
``functional_call``), and one AdamW over the stacked parameters.  AdamW is elementwise, so its
update of member ``i``'s slice is the update a separate optimizer would make.

Each member writes the run folder ``fit`` writes (config, metrics, TensorBoard scalars,
checkpoints, certificates, summary) through the same helpers, so ``lipmargin certify / audit /
report`` read a member folder like any run, and ``fit(cfg, dir, resume=True)`` continues it.  A group
interrupted at any moment resumes from the newest checkpoint epoch all its members hold.

A member's ``seconds`` / ``train_seconds`` are its share of the group's wall time (group time / M).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from lipmargin._io import atomic_write_text
from lipmargin.certify import CertifyResult
from lipmargin.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointRef,
    PendingCheckpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_ref,
    save_checkpoints,
    set_torch_rng_state,
    torch_rng_state,
)
from lipmargin.config import RunConfig, config_to_dict
from lipmargin.data import DATASETS, DeviceLoader
from lipmargin.models import LipschitzNet
from lipmargin.train.stacked import (
    StackedForward,
    VmapForward,
    converge_members,
    loss_partitions,
    member_losses,
    member_optimizer_state,
    stack_members,
    stacked_optimizer_state,
)
from lipmargin.train.build import build_optimizer, init_model, load_run_data, rng_devices
from lipmargin.train.ddp import dist_info_from_env
from lipmargin.train.errors import TrainingError
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
from lipmargin.train.step import evaluate

__all__ = ["BATCHED_LOSSES", "group_key", "plan_groups", "train_group", "member_bytes_estimate"]

#: Training losses that read nothing of the model but its head weight (and K): they run on a
#: member's stacked slice.  Any other loss trains its runs separately.
BATCHED_LOSSES = frozenset({"cll", "gloro", "lmt", "hkr", "ce-cr", "ce"})

# Config keys that may differ between the members of a group: everything else must be equal.
_MEMBER_SECTIONS = ("loss", "eval", "sweep")
_MEMBER_KEYS = (("train", "seed"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"))


def group_key(cfg: RunConfig) -> str | None:
    """Runs with equal keys can train as one group; ``None``: this run trains on its own."""
    t = cfg.train
    if t.precision not in ("fp32", "fp64") or t.compile != "none" or t.channels_last:
        return None
    if cfg.loss.name not in BATCHED_LOSSES:
        return None
    d = config_to_dict(cfg)
    d.pop("description", None)
    for section in _MEMBER_SECTIONS:
        d.pop(section, None)
    for section, key in _MEMBER_KEYS:
        d[section].pop(key, None)
    return json.dumps(d, sort_keys=True)


def plan_groups(cfgs: Sequence[RunConfig], group_size: int | None = None) -> list[list[int]]:
    """Indices of ``cfgs`` grouped for batched training, in order of first appearance.

    Runs that cannot be batched, or have no partner, form groups of one; ``group_size`` caps the
    members per group.
    """
    if group_size is not None and group_size < 1:
        raise ValueError(f"--group-size must be >= 1; got {group_size}")
    buckets: dict[str, list[int]] = {}
    groups: list[list[int]] = []
    for i, cfg in enumerate(cfgs):
        key = group_key(cfg)
        if key is None:
            groups.append([i])
            continue
        if key not in buckets:
            buckets[key] = []
            groups.append(buckets[key])
        buckets[key].append(i)
    cap = group_size or max((len(g) for g in groups), default=1)
    return [g[k : k + cap] for g in groups for k in range(0, len(g), cap)]


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def member_bytes_estimate(model: LipschitzNet, batch_size: int) -> int:
    """Rough bytes one member needs: parameters, gradients and AdamW moments, plus activations
    kept for backward (about three tensors per layer input) for one training batch."""
    elem = next(model.parameters()).element_size()
    params = sum(p.numel() for p in model.parameters())
    activations = sum(math.prod(s) for s in model.bound.input_shapes) + model.num_classes
    return elem * (4 * params + 3 * batch_size * activations)


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memory_error(members: int, per_member: int, free: int | None) -> TrainingError:
    fits = max(int(0.8 * free) // per_member, 0) if free is not None else members // 2
    where = f"~{free / 2**30:.2f} GiB are free" if free is not None else "it ran out of memory"
    return TrainingError(
        f"batched sweep: a group of {members} members needs ~{members * per_member / 2**30:.2f} GiB and {where}; "
        f"the largest group that fits is about {fits} (use --group-size {max(fits, 1)})"
    )


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# --------------------------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------------------------


@dataclass
class _Member:
    cfg: RunConfig
    out: Path
    model: LipschitzNet = field(init=False)
    checkpoint: Checkpoint | None = None
    rng: dict[str, Tensor] = field(default_factory=dict)
    train_seconds: float = 0.0
    error: str | None = None
    board: Any = None
    last_eval: CertifyResult | None = None
    final_ref: CheckpointRef | None = None  # the newest checkpoint written (or resumed from)


def _intact_epochs(run_dir: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in list_checkpoints(run_dir / "checkpoints"):
        try:
            found[load_checkpoint(path).epoch] = path
        except CheckpointError:
            continue
    return found


def _common_start(members: Sequence[_Member]) -> int:
    """The newest checkpoint epoch every member holds intact (0: start afresh)."""
    common: set[int] | None = None
    for m in members:
        epochs = set(_intact_epochs(m.out)) | {0}
        common = epochs if common is None else common & epochs
    return max(common or {0})


# --------------------------------------------------------------------------------------------
# Training a group
# --------------------------------------------------------------------------------------------


def train_group(
    runs: Sequence[tuple[RunConfig, str | Path]],
    *,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    group: tuple[int, int] = (1, 1),
    vmap_only: bool = False,
) -> list[str]:
    """Train ``runs`` (configs with one :func:`group_key`) as one stacked model into their folders.

    Every member's folder ends up as :func:`lipmargin.train.fit` leaves it.  Members whose folders
    hold checkpoints continue from the newest epoch all of them hold.  Returns one message per
    member whose training loss became non-finite (its last good checkpoint is kept, the others
    finish); raises :class:`TrainingError` when the stacked model does not fit in memory, naming
    the largest group size that does.  ``vmap_only`` runs every model under ``torch.func.vmap`` (the
    general path) even where bmm / grouped convolutions would do (both compute the same).  ``on_event`` receives ``{"event": "group", ...}`` with the
    group's number, members and epoch after each epoch.
    """
    emit = on_event or (lambda event: None)
    keys = {group_key(cfg) for cfg, _ in runs}
    if not runs or None in keys or len(keys) != 1:
        raise ValueError("train_group: the runs do not form one batched group (see lipmargin.train.batched.group_key)")
    if dist_info_from_env().world_size > 1:
        raise TrainingError("batched sweeps train in one process; start them without torchrun")
    # Each member sets the global RNG to its own stream (as its separate fit would); the caller's
    # state is restored afterwards.
    with torch.random.fork_rng(devices=rng_devices()):
        return _train_group(runs, emit, group, vmap_only)


def _train_group(
    runs: Sequence[tuple[RunConfig, str | Path]], emit: Callable[[dict[str, Any]], None], group: tuple[int, int],
    vmap_only: bool,
) -> list[str]:
    device = resolve_device(runs[0][0].train.device)
    # The configs as fit writes them: precision and layout resolved for the device.
    members = [_Member(resolve_hardware(cfg, device), Path(out)) for cfg, out in runs]
    base = members[0].cfg
    fp64 = base.train.precision == "fp64"
    data = load_run_data(base)
    start = _common_start(members)
    for m in members:
        model, m.rng = init_model(m.cfg, data.train.input_shape, data.train.num_classes)  # the RNG as fit's run has it
        m.model = model.to(device)
        if fp64:
            m.model = m.model.double()
        if m is members[0]:
            per_member = member_bytes_estimate(m.model, base.train.batch_size)
            free = _free_bytes(device)
            if free is not None and len(members) * per_member > 0.8 * free:
                raise _memory_error(len(members), per_member, free)
        _open_run_folder(m, start)
    params, buffers = stack_members([m.model for m in members])
    optimizer = build_optimizer(nn.ParameterList(params.values()), base.optim, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(base.optim.milestones), base.optim.gamma)
    if start > 0:
        try:
            optimizer.load_state_dict(stacked_optimizer_state([m.checkpoint.extra_state["optimizer"] for m in members]))  # type: ignore[union-attr]
            scheduler.load_state_dict(members[0].checkpoint.extra_state["scheduler"])  # type: ignore[union-attr]
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoints at epoch {start} do not match the configured model: {str(e).splitlines()[0]}") from None

    template = copy.deepcopy(members[0].model).train()
    engine = StackedForward if StackedForward.supports(template) and not vmap_only else VmapForward
    forward = engine(template, params, buffers, base.train.power_iters, fp64, base.train.power_grad == "unrolled")
    losses = loss_partitions([m.cfg.loss for m in members])
    aug = DATASETS[base.data.name].augment if base.data.augment else None
    loaders: list[DeviceLoader] = []
    for m in members:
        ds = loaders[0].dataset if loaders else data.train  # one copy of the data on the device
        loaders.append(DeviceLoader(ds, base.train.batch_size, device=device, shuffle=True, augment=aug, seed=m.cfg.train.seed))
    n_members, epochs = len(members), base.train.epochs
    info = {"event": "group", "group": group[0], "groups": group[1], "members": n_members, "epochs": epochs}
    emit({**info, "epoch": start})
    for epoch in range(start + 1, epochs + 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        steps = len(loaders[0])
        total_loss = torch.zeros(n_members, device=device, dtype=torch.float64)
        correct = torch.zeros(n_members, device=device, dtype=torch.long)
        first_bad = torch.full((n_members,), -1, device=device, dtype=torch.long)
        seen = 0
        began = time.perf_counter()
        for step, batches in enumerate(zip(*loaders)):
            x = torch.stack([b[0] for b in batches])  # (M, B, ...)
            y = torch.stack([b[1] for b in batches])  # (M, B)
            progress = (epoch - 1 + step / max(steps, 1)) / epochs
            try:
                logits, k, vectors = forward(x)  # (M, B, C), (M,)
                loss = member_losses(losses, logits, y, params["head.weight"], k, progress)  # (M,)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), torch.full_like(first_bad, step), first_bad)
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()  # member i's parameters only see member i's loss
                optimizer.step()
            except RuntimeError as e:
                if _is_oom(e):
                    raise _memory_error(n_members, per_member, _free_bytes(device)) from None
                raise
            with torch.no_grad():
                for name, v in vectors.items():
                    buffers[f"bound.{name}"].copy_(v)
            total_loss += loss.detach().double() * y.shape[1]
            correct += (logits.detach().argmax(-1) == y).sum(1)
            seen += y.shape[1]
        scheduler.step()
        share = (time.perf_counter() - began) / n_members
        bad = first_bad.tolist()
        for j, m in enumerate(members):
            if m.error is None and bad[j] >= 0:
                m.error = (f"{m.out}: non-finite training loss at epoch {epoch}, step {bad[j] + 1}; the last good "
                           f"checkpoint is kept (try a smaller optim.lr or loss.lipschitz_penalty)")
        live = [j for j, m in enumerate(members) if m.error is None]
        per_layer = converge_members([members[j].model for j in live])  # docs/method.md#power-iteration
        optimizer_state = optimizer.state_dict()
        pending: list[PendingCheckpoint] = []
        owners: list[_Member] = []
        for j, sigmas in zip(live, per_layer):
            m = members[j]
            m.train_seconds += share
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": float(total_loss[j]) / max(seen, 1),
                "train_accuracy": float(correct[j]) / max(seen, 1),
                "lr": optimizer.param_groups[0]["lr"],
                "lipschitz_per_layer": [float(v) for v in sigmas],
                "seconds": share,
            }
            is_last = epoch == epochs
            if is_last or (m.cfg.eval.every > 0 and epoch % m.cfg.eval.every == 0):
                m.last_eval = _evaluate(m, data.eval)
                record.update(metrics_record(m.last_eval))
                record["eval_split"] = data.eval_split
            append_record(m.out / "metrics.jsonl", record)
            m.board.log(record)
            if is_last or epoch % m.cfg.train.checkpoint_every == 0:
                owners.append(m)
                pending.append(run_checkpoint(
                    m.out, m.cfg, epoch, {n: t.detach().clone() for n, t in m.model.state_dict().items()},
                    member_optimizer_state(optimizer_state, j, n_members), scheduler.state_dict(), m.rng,
                    m.train_seconds, record, data.train,
                ))
        for m, saved in zip(owners, save_checkpoints(pending)):  # all members' files in a couple of fsync rounds
            m.final_ref = read_checkpoint_ref(saved)
        emit({**info, "epoch": epoch, "failed": n_members - len(live)})

    for m in members:
        m.board.close()
        if m.error is not None:
            continue
        if m.last_eval is None:  # resumed a group that had already finished training
            m.last_eval = _evaluate(m, data.eval)
        summary = run_summary(m.cfg, m.last_eval, data.eval_split, m.train_seconds, m.model)
        if m.final_ref is not None:  # the weights these metrics belong to, as fit writes it
            summary["checkpoint"] = m.final_ref.to_dict(relative_to=m.out)
        write_run_end(m.out, summary, m.last_eval)
    return [m.error for m in members if m.error is not None]


def _open_run_folder(m: _Member, start: int) -> None:
    """What ``_fit`` does to a run folder before training: config, metrics kept up to ``start``,
    and the state of checkpoint ``start``; checkpoints past it (not held by every member) go."""
    epochs = _intact_epochs(m.out)
    for epoch, path in epochs.items():
        if epoch > start:
            for suffix in (".json", ".safetensors"):
                path.with_suffix(suffix).unlink(missing_ok=True)
    m.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(m.out / "config.yaml", yaml.safe_dump(config_to_dict(m.cfg), sort_keys=False))
    if start > 0:
        m.checkpoint = load_checkpoint(epochs[start])
        try:
            m.model.load_state_dict(m.checkpoint.model_state)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {m.checkpoint.path} does not match the configured model: {str(e).splitlines()[0]}") from None
        m.final_ref = m.checkpoint.ref
        m.rng = m.checkpoint.extra_state.get("rng", m.rng)
        m.train_seconds = float(m.checkpoint.meta.get("train_seconds", 0.0))
        rewrite_metrics(m.out / "metrics.jsonl", start)
    elif (m.out / "metrics.jsonl").exists():
        (m.out / "metrics.jsonl").unlink()
    m.board = TensorBoardLog(m.out / "tensorboard")


def _evaluate(m: _Member, ds: Any) -> CertifyResult:
    """``evaluate`` under the member's own global RNG state (as its separate run would have it)."""
    set_torch_rng_state(m.rng)
    result = evaluate(m.model, ds, m.cfg.eval.eps, method=m.cfg.eval.bound, batch_size=m.cfg.eval.batch_size)
    m.rng = torch_rng_state()
    return result
