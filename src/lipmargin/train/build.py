"""What a run trains on: its data (sized and split), its model (seeded), its optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lipmargin.checkpoint import torch_rng_state
from lipmargin.config import OptimConfig, RunConfig
from lipmargin.data import ArrayDataset, load_dataset, stratified_subset, train_val_split
from lipmargin.models import LipschitzNet, create_model
from lipmargin.train.errors import TrainingError

__all__ = ["RunData", "load_run_data", "build_model", "init_model", "build_optimizer", "rng_devices"]


@dataclass(frozen=True)
class RunData:
    """The training set and the evaluation set of a run (see :func:`load_run_data`)."""

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


def rng_devices() -> list[int]:
    """The CUDA devices whose RNG ``torch.manual_seed`` seeds (none without CUDA), for ``fork_rng``."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def init_model(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int) -> tuple[LipschitzNet, dict[str, Tensor]]:
    """The configured model drawn from ``train.seed``, and the torch RNG state right after drawing it.

    The model is drawn under a fork of the global RNG, so the caller's RNG state is unchanged; a
    run (``fit``, a batched sweep) continues its own random stream from the returned state (see
    :func:`lipmargin.checkpoint.set_torch_rng_state`).
    """
    options: dict[str, Any] = {}
    if cfg.model.width is not None:
        options["width"] = cfg.model.width
    if cfg.model.widths is not None:
        options["widths"] = cfg.model.widths
    with torch.random.fork_rng(devices=rng_devices()):
        torch.manual_seed(cfg.train.seed)
        try:
            model = create_model(cfg.model.name, input_shape, num_classes, **options)
        except TypeError as e:
            raise TrainingError(f"model {cfg.model.name!r} does not take the options {sorted(options)}: {e}") from None
        except ValueError as e:
            raise TrainingError(f"model.name={cfg.model.name}: {e}") from None
        return model, torch_rng_state()


def build_model(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int) -> LipschitzNet:
    """Create the configured model with the run's seed (the same init on every call).

    The global RNG is left as it was (see :func:`init_model`).

    >>> from lipmargin.config import OptimConfig, RunConfig
    >>> state = torch.get_rng_state()
    >>> a, b = (build_model(RunConfig(), (1, 28, 28), 10) for _ in range(2))
    >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    True
    >>> torch.equal(state, torch.get_rng_state())
    True
    """
    return init_model(cfg, input_shape, num_classes)[0]


def build_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with ``optim.lr`` / ``optim.weight_decay`` (docs/method.md); the fused CUDA kernel on GPUs,
    where the step is launch-bound.

    >>> from lipmargin.config import OptimConfig
    >>> opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(lr=0.01), torch.device("cpu"))
    >>> type(opt).__name__, opt.param_groups[0]["lr"]
    ('AdamW', 0.01)
    """
    return torch.optim.AdamW(
        model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, fused=device.type == "cuda"
    )
