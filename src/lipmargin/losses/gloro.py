"""GloRo (Leino et al., ICML 2021) and its TRADES variant: softmax CE with a bottom logit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.losses._validate import _check_eps, _check_logits_target, _check_reduction, _reduce

__all__ = ["gloro_eps_schedule", "gloro_logits", "gloro_loss", "GloRoLoss"]


def gloro_eps_schedule(progress: float, eps_end: float, power: float = 5.0) -> float:
    """GloRo's annealed radius ``eps_end * (1 - (1 - t/T)^power)`` for ``progress = t/T``."""
    t = min(max(float(progress), 0.0), 1.0)
    return eps_end * (1.0 - (1.0 - t) ** power)


def gloro_logits(logits: Tensor, pairwise: Tensor, eps: float) -> Tensor:
    """``[f_1 .. f_C, y_bot]`` (B, C+1) with ``y_bot = max_{i != c} f_i + eps * pairwise[c, i]``.

    ``c`` is the predicted class; ``pairwise`` is the ``(C, C)`` matrix ``K * ||W_i - W_j||`` and
    carries gradients (GloRo trains through the bound).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, C); got {tuple(logits.shape)}")
    c = logits.shape[1]
    if pairwise.shape != (c, c):
        raise ValueError(f"pairwise must be the ({c}, {c}) matrix K*||W_i - W_j||; got {tuple(pairwise.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0; got {eps!r}")
    pred = logits.detach().argmax(1)  # (B,)
    rows = pairwise[pred]  # (B, C)
    lifted = logits + eps * rows
    is_pred = F.one_hot(pred, c).bool()
    y_bot = lifted.masked_fill(is_pred, float("-inf")).amax(1, keepdim=True)  # (B, 1)
    return torch.cat([logits, y_bot], dim=1)


def gloro_loss(
    logits: Tensor,
    target: Tensor,
    pairwise: Tensor,
    eps: float,
    *,
    trades_lambda: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """GloRo loss (Leino et al., ICML 2021): softmax CE over the logits plus a bottom logit.

    With ``trades_lambda > 0``, the TRADES variant of docs/method.md#gloro:
    ``CE(aug, y) + trades_lambda * sum_k -q_k log_softmax(aug)_k`` with ``q = [softmax(f), 0]``
    detached.

    >>> import math, torch
    >>> logits, target = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    >>> pairwise = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # K * ||W_i - W_j||
    >>> loss = gloro_loss(logits, target, pairwise, eps=0.5)  # bottom logit: 0 + 0.5 * 1
    >>> round(float(loss), 6) == round(-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(0.5))), 6)
    True
    """
    _check_logits_target(logits, target)
    _check_reduction(reduction)
    if not trades_lambda >= 0:
        raise ValueError(f"trades_lambda must be >= 0; got {trades_lambda!r}")
    aug = gloro_logits(logits, pairwise, eps)  # (B, C+1)
    log_p = aug.log_softmax(1)
    loss = F.nll_loss(log_p, target.long(), reduction="none")
    if trades_lambda > 0:
        q = F.pad(logits.detach().softmax(1), (0, 1))  # (B, C+1), 0 for the bottom class
        loss = loss + trades_lambda * -(q * log_p).sum(1)
    return _reduce(loss, reduction)


class GloRoLoss(nn.Module):
    """Module form of :func:`gloro_loss`; ``forward(logits, target, pairwise, eps=None)``."""

    def __init__(self, eps: float, *, trades_lambda: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        _check_eps(eps)
        _check_reduction(reduction)
        self.eps, self.trades_lambda, self.reduction = float(eps), float(trades_lambda), reduction

    def forward(self, logits: Tensor, target: Tensor, pairwise: Tensor, eps: float | None = None) -> Tensor:
        return gloro_loss(
            logits, target, pairwise, self.eps if eps is None else eps,
            trades_lambda=self.trades_lambda, reduction=self.reduction,
        )

