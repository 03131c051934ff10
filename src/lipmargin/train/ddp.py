"""Distributed training under torchrun: rank and world size, the process group, all-reduce."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lipmargin.train.errors import TrainingError

__all__ = ["DistInfo", "dist_info_from_env", "process_group", "all_reduce_sum"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (the defaults: a single process).

    >>> DistInfo().is_main, DistInfo(rank=1, world_size=2).is_main
    (True, False)
    """

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
def process_group(info: DistInfo, device: torch.device) -> Iterator[None]:
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


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """``t`` summed in place over all ranks (unchanged in a single process); returns ``t``.

    >>> all_reduce_sum(torch.tensor([1.0, 2.0]), DistInfo())
    tensor([1., 2.])
    """
    if info.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t
