"""The Calibrated Lipschitz-Margin Loss (Losch et al., GCPR 2023): sigma, calibrated logits, the loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.losses._validate import _broadcast_bound, _check_eps, _check_logits_target, _check_reduction, _reduce

__all__ = ["cll_sigma", "k_scale_schedule", "cll_logits", "cll_loss", "CLLoss"]


def cll_sigma(eps: float, p: float) -> float:
    """The calibration temperature ``sigma = 2 eps / (logit(1 - p/2) - logit(p/2))``.

    Equivalently ``1/sigma = ln((2 - p) / p) / eps``: a sample at pairwise radius ``eps`` gets
    probability ``p/2`` for its true class (docs/method.md#cll; the ``p/2`` form of the authors).

    >>> round(cll_sigma(0.5, 0.2), 6)  # 0.5 / ln(9)
    0.22756
    """
    _check_eps(eps)
    if not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        raise ValueError(f"p (the slack, an error quantile) must lie in the open interval (0, 1); got {p!r}")
    return eps / math.log((2.0 - p) / p)


def k_scale_schedule(progress: float) -> float:
    """Scheduled inverse temperature ``1 - 0.99 (1 - t/T)^10`` for ``progress = t/T`` in [0, 1]."""
    t = min(max(float(progress), 0.0), 1.0)
    return 1.0 - 0.99 * (1.0 - t) ** 10


def _target_rows(lipschitz: Tensor | float, logits: Tensor, target: Tensor, pairwise: bool, per_logit: bool) -> Tensor:
    """The ``(B, C)`` bounds a sample's logits are divided by: row ``target`` of the ``(C, C)``
    matrix with ``pairwise`` (the margin is taken against the true class), else ``lipschitz``
    broadcast to (B, C).  The flag is explicit: with ``B == C`` the shape cannot tell the two apart."""
    c = logits.shape[1]
    bound = torch.as_tensor(lipschitz, dtype=logits.dtype, device=logits.device)
    square = bound.dim() == 2 and bound.shape == (c, c)
    if pairwise:
        if per_logit:
            raise ValueError("pairwise=True reads the (C, C) matrix K*||W_i - W_j||; per_logit=True takes K*||W_j||")
        if not square:
            raise ValueError(f"pairwise=True needs the ({c}, {c}) matrix K*||W_i - W_j||; got {tuple(bound.shape)}")
        return bound[target.long()]  # (B, C): row y of each sample
    if square and logits.shape[0] != c:
        raise ValueError(
            f"lipschitz of shape ({c}, {c}) does not match a batch of {logits.shape[0]}; "
            "pass pairwise=True for the (C, C) matrix K*||W_i - W_j||"
        )
    return _broadcast_bound(bound, logits)


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
    pairwise: bool = False,
) -> Tensor:
    """The calibrated logits ``z`` (B, C) whose softmax cross entropy is the CLL loss.

    Pairwise form (default): ``lipschitz[b, j] = K * ||W_y - W_j||`` for the sample's target ``y``
    (or the ``(C, C)`` matrix ``K * ||W_i - W_j||``, of which row ``y`` is used);
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
    bound = _target_rows(lipschitz, logits, target, pairwise, per_logit)  # (B, C)
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
    pairwise: bool = False,
) -> Tensor:
    """Calibrated Lipschitz-Margin Loss (Losch et al., GCPR 2023), docs/method.md#cll.

    Args:
        logits: ``(B, C)`` model outputs.
        target: ``(B,)`` class indices.
        lipschitz: each sample's target row ``K * ||W_y - W_j||``, ``(B, C)`` or anything
            broadcastable to it; with ``pairwise=True`` the ``(C, C)`` matrix ``K * ||W_i - W_j||``
            (as for :func:`gloro_loss`), of which row ``y`` of each sample's target is used
            (per-logit bounds ``K * ||W_j||`` with ``per_logit=True``).
        eps: target radius in input space (> 0).
        p: slack in (0, 1); small p = steep calibration.
        one_sided: no ``-eps/sigma`` offset on the target logit (used for two moons).
        per_logit: per-logit normalisation instead of the pairwise form.
        k_scale: multiplies the divisor (the scheduled inverse temperature, see
            :func:`k_scale_schedule`).
        detach_lipschitz: treat ``lipschitz`` as a constant (the authors' default).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        pairwise: ``lipschitz`` is the ``(C, C)`` matrix (explicit, since with ``B == C`` per-sample
            rows have the same shape).

    Closed form (pairwise, two-sided): ``log(1 + sum_{j != y} exp((2 eps - r_yj) / sigma))`` with
    ``r_yj = (f_y - f_j) / lipschitz_j``.

    >>> import math, torch
    >>> logits, target = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    >>> eps, p = 0.5, 0.2
    >>> loss = cll_loss(logits, target, 2.0, eps, p)  # r = (2 - 0) / 2 = 1
    >>> expected = math.log1p(math.exp((2 * eps - 1.0) / cll_sigma(eps, p)))
    >>> round(float(loss), 6) == round(expected, 6)
    True
    >>> matrix = torch.tensor([[0.0, 2.0], [2.0, 0.0]])  # K * ||W_i - W_j||
    >>> bool(cll_loss(logits, target, matrix, eps, p, pairwise=True) == loss)
    True
    """
    _check_reduction(reduction)
    z = cll_logits(
        logits, target, lipschitz, eps, p,
        one_sided=one_sided, per_logit=per_logit, k_scale=k_scale, detach_lipschitz=detach_lipschitz,
        pairwise=pairwise,
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
        pairwise: bool = False,
    ) -> None:
        super().__init__()
        self.sigma = cll_sigma(eps, p)  # validates eps and p now, not at the first batch
        _check_reduction(reduction)
        self.eps, self.p = float(eps), float(p)
        self.one_sided, self.per_logit = one_sided, per_logit
        self.detach_lipschitz, self.reduction, self.pairwise = detach_lipschitz, reduction, pairwise

    def forward(self, logits: Tensor, target: Tensor, lipschitz: Tensor | float, k_scale: float = 1.0) -> Tensor:
        return cll_loss(
            logits, target, lipschitz, self.eps, self.p,
            one_sided=self.one_sided, per_logit=self.per_logit, k_scale=k_scale,
            detach_lipschitz=self.detach_lipschitz, reduction=self.reduction, pairwise=self.pairwise,
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}, p={self.p}, sigma={self.sigma:.6g}, one_sided={self.one_sided}, per_logit={self.per_logit}"

