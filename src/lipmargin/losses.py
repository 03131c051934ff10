"""Losses for Lipschitz-margin training: CLL, GloRo (and its TRADES variant), the Lipschitz penalty.

Every loss is a pure function over tensors plus a thin ``nn.Module`` wrapper holding its
hyper-parameters, like ``F.cross_entropy`` / ``nn.CrossEntropyLoss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "REDUCTIONS",
    "cll_sigma",
    "cll_logits",
    "cll_loss",
    "CLLoss",
    "k_scale_schedule",
    "gloro_logits",
    "gloro_loss",
    "GloRoLoss",
    "gloro_eps_schedule",
    "lipschitz_penalty",
    "lmt_loss",
    "LMTLoss",
    "hkr_loss",
    "HKRLoss",
    "cert_reg_loss",
    "CertRegLoss",
]

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


# --------------------------------------------------------------------------------------------
# CLL
# --------------------------------------------------------------------------------------------


def cll_sigma(eps: float, p: float) -> float:
    """The calibration temperature ``sigma = 2 eps / (logit(1 - p/2) - logit(p/2))``.

    Equivalently ``1/sigma = ln((2 - p) / p) / eps``: a sample at pairwise radius ``eps`` gets
    probability ``p/2`` for its true class (METHOD.md section 2; the ``p/2`` form of the authors).
    """
    _check_eps(eps)
    if not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        raise ValueError(f"p (the slack, an error quantile) must lie in the open interval (0, 1); got {p!r}")
    return eps / math.log((2.0 - p) / p)


def k_scale_schedule(progress: float) -> float:
    """Scheduled inverse temperature ``1 - 0.99 (1 - t/T)^10`` for ``progress = t/T`` in [0, 1]."""
    t = min(max(float(progress), 0.0), 1.0)
    return 1.0 - 0.99 * (1.0 - t) ** 10


def cll_logits(
    logits: Tensor,
    target: Tensor,
    lipschitz: Tensor | float,
    eps: float,
    p: float,
    *,
    one_sided: bool = False,
    per_logit: bool = False,
    k_scale: float = 1.0,
    detach_lipschitz: bool = True,
) -> Tensor:
    """The calibrated logits ``z`` (B, C) whose softmax cross entropy is the CLL loss.

    Pairwise form (default): ``lipschitz[b, j] = K * ||W_y - W_j||`` for the sample's target ``y``;
    ``u_j = (f_j - f_y) / (sigma * k_scale * lipschitz_j)`` (``u_y = 0``, the target entry of
    ``lipschitz`` is never read), ``z_j = u_j + eps/sigma`` for ``j != y`` and
    ``z_y = -eps/sigma`` (0 with ``one_sided``).

    Per-logit form: ``lipschitz[b, j] = K * ||W_j||`` and ``z_j = f_j / (sigma * k_scale *
    lipschitz_j)`` plus the same offsets.
    """
    _check_logits_target(logits, target)
    sigma = cll_sigma(eps, p)
    if not k_scale > 0:
        raise ValueError(f"k_scale must be > 0; got {k_scale!r}")
    bound = _broadcast_bound(lipschitz, logits)
    if detach_lipschitz:
        bound = bound.detach()
    is_target = F.one_hot(target.long(), logits.shape[1]).bool()  # (B, C)
    scale = sigma * k_scale
    if per_logit:
        z = logits / (scale * bound)
    else:
        # The target entry of a pairwise bound is 0 (||W_y - W_y||): divide by 1 there instead,
        # and the numerator is 0 anyway, so neither the value nor the gradient sees a 0/0.
        safe = torch.where(is_target, torch.ones_like(bound), bound)
        diff = logits - logits.gather(1, target.long().unsqueeze(1))  # (B, C), 0 at the target
        z = diff / (scale * safe)
    offset = eps / sigma
    target_offset = 0.0 if one_sided else -offset
    return z + torch.where(is_target, torch.full_like(z, target_offset), torch.full_like(z, offset))


def cll_loss(
    logits: Tensor,
    target: Tensor,
    lipschitz: Tensor | float,
    eps: float,
    p: float,
    *,
    one_sided: bool = False,
    per_logit: bool = False,
    k_scale: float = 1.0,
    detach_lipschitz: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Calibrated Lipschitz-Margin Loss (Losch et al., GCPR 2023), METHOD.md section 2.

    Args:
        logits: ``(B, C)`` model outputs.
        target: ``(B,)`` class indices.
        lipschitz: pairwise bounds ``K * ||W_y - W_j||`` for each sample's target row, ``(B, C)``
            or broadcastable (per-logit bounds ``K * ||W_j||`` with ``per_logit=True``).
        eps: target radius in input space (> 0).
        p: slack in (0, 1); small p = steep calibration.
        one_sided: no ``-eps/sigma`` offset on the target logit (used for two moons).
        per_logit: per-logit normalisation instead of the pairwise form.
        k_scale: multiplies the divisor (the scheduled inverse temperature, see
            :func:`k_scale_schedule`).
        detach_lipschitz: treat ``lipschitz`` as a constant (the authors' default).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Closed form (pairwise, two-sided): ``log(1 + sum_{j != y} exp((2 eps - r_yj) / sigma))`` with
    ``r_yj = (f_y - f_j) / lipschitz_j``.
    """
    _check_reduction(reduction)
    z = cll_logits(
        logits, target, lipschitz, eps, p,
        one_sided=one_sided, per_logit=per_logit, k_scale=k_scale, detach_lipschitz=detach_lipschitz,
    )
    return _reduce(F.cross_entropy(z, target.long(), reduction="none"), reduction)


class CLLoss(nn.Module):
    """Module form of :func:`cll_loss`; ``forward(logits, target, lipschitz)``."""

    def __init__(
        self,
        eps: float,
        p: float,
        *,
        one_sided: bool = False,
        per_logit: bool = False,
        detach_lipschitz: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.sigma = cll_sigma(eps, p)  # validates eps and p now, not at the first batch
        _check_reduction(reduction)
        self.eps, self.p = float(eps), float(p)
        self.one_sided, self.per_logit = one_sided, per_logit
        self.detach_lipschitz, self.reduction = detach_lipschitz, reduction

    def forward(self, logits: Tensor, target: Tensor, lipschitz: Tensor | float, k_scale: float = 1.0) -> Tensor:
        return cll_loss(
            logits, target, lipschitz, self.eps, self.p,
            one_sided=self.one_sided, per_logit=self.per_logit, k_scale=k_scale,
            detach_lipschitz=self.detach_lipschitz, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}, p={self.p}, sigma={self.sigma:.6g}, one_sided={self.one_sided}, per_logit={self.per_logit}"


# --------------------------------------------------------------------------------------------
# GloRo
# --------------------------------------------------------------------------------------------


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

    With ``trades_lambda > 0``, the TRADES variant of METHOD.md section 5:
    ``CE(aug, y) + trades_lambda * sum_k -q_k log_softmax(aug)_k`` with ``q = [softmax(f), 0]``
    detached.
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


# --------------------------------------------------------------------------------------------
# Lipschitz penalty
# --------------------------------------------------------------------------------------------


def lipschitz_penalty(lipschitz: Tensor, weight: float, power: float = 2.0) -> Tensor:
    """``weight * lipschitz ** power`` (METHOD.md section 4: lambda * K_tot^2)."""
    if not weight >= 0:
        raise ValueError(f"penalty weight must be >= 0; got {weight!r}")
    if not power > 0:
        raise ValueError(f"penalty power must be > 0; got {power!r}")
    return weight * lipschitz.pow(power)


# --------------------------------------------------------------------------------------------
# Baselines: Lipschitz-margin CE, hinge-KR, CE with certificate regularisation
# --------------------------------------------------------------------------------------------


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
