"""Argument checks and the reduction shared by the loss functions of this package."""

from __future__ import annotations

import math

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0 (an L2 radius in input space); got {eps!r}")


def _check_logits_target(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, C); got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"target must have shape (B,) = ({logits.shape[0]},) to match logits {tuple(logits.shape)}; "
            f"got {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"target must hold integer class indices; got dtype {target.dtype}")


def _broadcast_bound(lipschitz: Tensor | float, logits: Tensor, name: str = "lipschitz") -> Tensor:
    bound = torch.as_tensor(lipschitz, dtype=logits.dtype, device=logits.device)
    try:
        return torch.broadcast_to(bound, logits.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} must be broadcastable to the logits' shape {tuple(logits.shape)} (B, C); "
            f"got {tuple(bound.shape)}"
        ) from None

