"""Baselines: Lipschitz-margin CE (LMT), hinge-KR (HKR), CE with certificate regularisation, and the
Lipschitz penalty ``weight * K ** power`` added to any of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.losses._validate import _broadcast_bound, _check_eps, _check_logits_target, _check_reduction, _reduce

__all__ = ["lipschitz_penalty", "lmt_loss", "LMTLoss", "hkr_loss", "HKRLoss", "cert_reg_loss", "CertRegLoss"]


def lipschitz_penalty(lipschitz: Tensor, weight: float, power: float = 2.0) -> Tensor:
    """``weight * lipschitz ** power`` (docs/method.md#penalty: lambda * K_tot^2)."""
    if not weight >= 0:
        raise ValueError(f"penalty weight must be >= 0; got {weight!r}")
    if not power > 0:
        raise ValueError(f"penalty power must be > 0; got {power!r}")
    return weight * lipschitz.pow(power)



def lmt_loss(
    logits: Tensor, target: Tensor, lipschitz: Tensor | float, eps: float, *, reduction: str = "mean"
) -> Tensor:
    """Lipschitz-margin training (Tsuzuku, Sato, Sugiyama, NeurIPS 2018): offset cross entropy.

    Every non-target logit is raised by ``eps * lipschitz_j`` before softmax CE, so the loss only
    becomes small once the margin exceeds what a perturbation of norm ``eps`` can undo.
    ``lipschitz`` is ``(B, C)`` pairwise bounds ``K * ||W_y - W_j||`` of the target row (or, as
    in the paper, a scalar ``sqrt(2) * L`` from a global bound ``L``); gradients flow through it.
    """
    _check_logits_target(logits, target)
    _check_reduction(reduction)
    _check_eps(eps)
    bound = _broadcast_bound(lipschitz, logits)
    is_target = F.one_hot(target.long(), logits.shape[1]).bool()
    z = logits + torch.where(is_target, torch.zeros_like(bound), eps * bound)
    return _reduce(F.cross_entropy(z, target.long(), reduction="none"), reduction)


class LMTLoss(nn.Module):
    """Module form of :func:`lmt_loss`; ``forward(logits, target, lipschitz)``."""

    def __init__(self, eps: float, *, reduction: str = "mean") -> None:
        super().__init__()
        _check_eps(eps)
        _check_reduction(reduction)
        self.eps, self.reduction = float(eps), reduction

    def forward(self, logits: Tensor, target: Tensor, lipschitz: Tensor | float) -> Tensor:
        return lmt_loss(logits, target, lipschitz, self.eps, reduction=self.reduction)


def hkr_loss(
    logits: Tensor, target: Tensor, *, alpha: float = 10.0, min_margin: float = 1.0, reduction: str = "mean"
) -> Tensor:
    """Multi-class hinge Kantorovich-Rubinstein loss (Serrurier et al., CVPR 2021).

    ``alpha * hinge - KR`` with, per sample, ``hinge = sum_j relu(min_margin/2 - s_j f_j)``
    (``s_j = +1`` for the target, ``-1`` otherwise) and the KR term
    ``f_y - mean_{j != y} f_j``, the per-sample form of the class-wise Wasserstein dual estimate.
    Meant for 1-Lipschitz networks, where the margin ``min_margin`` is then a robustness margin.
    """
    _check_logits_target(logits, target)
    _check_reduction(reduction)
    if not alpha >= 0 or not min_margin > 0:
        raise ValueError(f"alpha must be >= 0 and min_margin > 0; got alpha={alpha!r}, min_margin={min_margin!r}")
    c = logits.shape[1]
    sign = F.one_hot(target.long(), c).to(logits.dtype) * 2 - 1  # (B, C): +1 target, -1 others
    hinge = F.relu(min_margin / 2 - sign * logits).sum(1)  # (B,)
    f_y = logits.gather(1, target.long().unsqueeze(1)).squeeze(1)
    kr = f_y - (logits.sum(1) - f_y) / (c - 1)  # (B,)
    return _reduce(alpha * hinge - kr, reduction)


class HKRLoss(nn.Module):
    """Module form of :func:`hkr_loss`; ``forward(logits, target)``."""

    def __init__(self, alpha: float = 10.0, min_margin: float = 1.0, *, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.alpha, self.min_margin, self.reduction = float(alpha), float(min_margin), reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return hkr_loss(logits, target, alpha=self.alpha, min_margin=self.min_margin, reduction=self.reduction)


def cert_reg_loss(
    logits: Tensor, target: Tensor, lipschitz: Tensor | float, gamma: float, *, reduction: str = "mean"
) -> Tensor:
    """Cross entropy minus a certificate regulariser (Singla & Feizi, SOC, ICML 2021).

    ``CE(f, y) - gamma * relu(min_{j != y} (f_y - f_j) / lipschitz_j)``: rewards the certified
    radius of correctly classified samples.  ``lipschitz`` as for :func:`cll_loss` (for a
    1-Lipschitz network with a global bound the paper's ``sqrt(2)``).
    """
    _check_logits_target(logits, target)
    _check_reduction(reduction)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0; got {gamma!r}")
    bound = _broadcast_bound(lipschitz, logits)
    is_target = F.one_hot(target.long(), logits.shape[1]).bool()
    safe = torch.where(is_target, torch.ones_like(bound), bound)
    margin = logits.gather(1, target.long().unsqueeze(1)) - logits  # (B, C)
    radius = (margin / safe).masked_fill(is_target, float("inf")).amin(1)  # (B,)
    loss = F.cross_entropy(logits, target.long(), reduction="none") - gamma * F.relu(radius)
    return _reduce(loss, reduction)


class CertRegLoss(nn.Module):
    """Module form of :func:`cert_reg_loss`; ``forward(logits, target, lipschitz)``."""

    def __init__(self, gamma: float = 0.5, *, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.gamma, self.reduction = float(gamma), reduction

    def forward(self, logits: Tensor, target: Tensor, lipschitz: Tensor | float) -> Tensor:
        return cert_reg_loss(logits, target, lipschitz, self.gamma, reduction=self.reduction)
