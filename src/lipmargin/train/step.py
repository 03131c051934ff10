"""One training epoch and one evaluation: the per-step module, the epoch loop, certified accuracy."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lipmargin.certify import CertifyResult, certify, model_bound
from lipmargin.data import ArrayDataset, DeviceLoader
from lipmargin.lipschitz import pairwise_head_norms
from lipmargin.losses import TrainLoss, lipschitz_penalty
from lipmargin.models import LipschitzNet
from lipmargin.train.ddp import DistInfo, all_reduce_sum
from lipmargin.train.errors import TrainingError

__all__ = ["TrainStep", "EpochStats", "train_one_epoch", "evaluate", "eval_batches"]


class TrainStep(nn.Module):
    """``x -> (logits, K)``: the model's forward and the power-iteration bound in one module.

    Both run inside one ``forward`` so that DistributedDataParallel sees every parameter the loss
    touches.  The logits may run under bf16 autocast; the bound never does.  ``compile`` names a
    ``torch.compile`` mode for the whole step (forward and the power iterations, which on a GPU
    are launch-bound batch-1 convolutions); ``None`` runs eagerly.  ``power_grad`` is
    ``train.power_grad``: ``"unrolled"`` differentiates K through the power-iteration steps.
    """

    def __init__(
        self, model: LipschitzNet, n_iter: int, precision: str = "fp32", compile: str | None = None,
        power_grad: str = "detached",
    ) -> None:
        super().__init__()
        self.model = model
        self.n_iter = n_iter
        self.unrolled = power_grad == "unrolled"
        self.precision = precision
        self._step: Callable[[Tensor], tuple[Tensor, Tensor]] = (
            torch.compile(self._eager, mode=compile) if compile else self._eager  # type: ignore[assignment]
        )

    def _eager(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.precision == "fp64":
            x = x.double()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(x)
        k, _ = self.model.feature_lipschitz(self.n_iter, self.unrolled)
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
    epoch: int,
    steps_per_epoch: int,
    *,
    epochs: int,
    batch_size: int,
    n_iter: int = 5,
    penalty: float = 0.0,
    penalty_power: float = 2.0,
    step_module: nn.Module | None = None,
    dist: DistInfo = DistInfo(),
    on_batch: Callable[[int, int], None] | None = None,
) -> EpochStats:
    """One pass over ``loader``; ``epoch`` counts from 1 of ``epochs``.  Raises TrainingError on a non-finite loss.

    ``batch_size`` is the global batch size (``train.batch_size``; under DDP each rank's mean is
    weighted by its share of it), ``penalty`` / ``penalty_power`` the Lipschitz penalty
    ``penalty * K_tot ** penalty_power`` added to the loss (``loss.lipschitz_penalty``,
    ``loss.penalty_power``; 0: none) and ``n_iter`` the power-iteration steps of the default
    step module.

    ``step_module`` maps a batch to ``(logits, K)`` (a :class:`TrainStep`, possibly wrapped in
    DistributedDataParallel); by default a plain TrainStep of ``model``.  Loss and accuracy are
    summed over all ranks.  ``on_batch(steps_done, samples_done)`` is called after every step
    (this rank's samples; it must be cheap: it runs in the hot loop).
    """
    step_fn = step_module if step_module is not None else TrainStep(model, n_iter)
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
        progress = (epoch - 1 + step / max(steps_per_epoch, 1)) / epochs
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
        if penalty > 0:
            k_tot = k * pairwise_head_norms(model.head.weight).max()
            loss = loss + lipschitz_penalty(k_tot, penalty, penalty_power)
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
        all_reduce_sum(totals, dist)
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


def eval_batches(ds: ArrayDataset, batch_size: int, device: torch.device) -> DeviceLoader:
    """``ds`` in order (no shuffling, no augmentation), in batches on ``device``, for evaluation."""
    return DeviceLoader(ds, batch_size, device=device, shuffle=False)
