"""Training losses by name (``loss.name`` of a run config): ``build(loss_config) -> train_loss``.

A training loss is ``(logits, target, model, K, progress) -> scalar``: ``model`` is the network
being trained (its ``head.weight`` and ``pairwise_lipschitz(K)`` are read), ``K`` the feature
extractor's Lipschitz estimate of this step and ``progress`` the fraction of training done.  The
registry lives here, below the config, so that the config can list the valid names without
importing the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

from lipmargin.lipschitz import pairwise_head_norms
from lipmargin.losses.baselines import cert_reg_loss, hkr_loss, lmt_loss
from lipmargin.losses.cll import cll_loss, k_scale_schedule
from lipmargin.losses.gloro import gloro_eps_schedule, gloro_loss

if TYPE_CHECKING:
    from lipmargin.config import LossConfig

__all__ = ["TrainLoss", "TRAIN_LOSSES", "register_train_loss", "list_train_losses"]

#: ``(logits, target, model, K, progress) -> scalar``; ``model`` is a ``LipschitzNet``.
TrainLoss = Callable[[Tensor, Tensor, Any, Tensor, float], Tensor]
TRAIN_LOSSES: dict[str, Callable[[LossConfig], TrainLoss]] = {}


def register_train_loss(name: str) -> Callable[[Callable[[LossConfig], TrainLoss]], Callable[[LossConfig], TrainLoss]]:
    """Decorator: register ``build(loss_config) -> train_loss`` under ``name`` (``loss.name``).

    >>> @register_train_loss("doc-zero")
    ... def _zero(cfg):
    ...     return lambda logits, target, model, k, progress: logits.sum() * 0.0
    >>> "doc-zero" in list_train_losses()
    True
    >>> del TRAIN_LOSSES["doc-zero"]
    """

    def decorator(build: Callable[[LossConfig], TrainLoss]) -> Callable[[LossConfig], TrainLoss]:
        TRAIN_LOSSES[name] = build
        return build

    return decorator


def list_train_losses() -> list[str]:
    """The registered training-loss names, sorted.

    >>> list_train_losses()
    ['ce', 'ce-cr', 'cll', 'gloro', 'hkr', 'lmt']
    """
    return sorted(TRAIN_LOSSES)


@register_train_loss("cll")
def _cll(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: Any, k: Tensor, progress: float) -> Tensor:
        w = model.head.weight
        scale = k_scale_schedule(progress) if cfg.k_scale_schedule else 1.0
        if cfg.per_logit:
            bound, pairwise = k * w.norm(dim=1), False  # (C,)
        else:
            bound, pairwise = k * pairwise_head_norms(w), True  # (C, C): cll_loss reads row target
        return cll_loss(
            logits, target, bound, cfg.eps, cfg.p, one_sided=cfg.one_sided, per_logit=cfg.per_logit,
            k_scale=scale, detach_lipschitz=cfg.detach_lipschitz, pairwise=pairwise,
        )

    return loss


def head_gradient_factor(head_weight: Tensor) -> Tensor:
    """``d / detach(d)`` with ``d = max_ij ||W_i - W_j||``: the value 1, and the gradient of
    ``log d`` (``loss.gloro_head_gradient``, after the authors' ``GloroLoss``, which divides the
    classifier's differentiable factor by its detached copy)."""
    d = pairwise_head_norms(head_weight).max()
    return d / d.detach()


@register_train_loss("gloro")
def _gloro(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: Any, k: Tensor, progress: float) -> Tensor:
        eps = gloro_eps_schedule(progress, cfg.eps) if cfg.eps_anneal else cfg.eps
        if cfg.gloro_head_gradient:
            k = k * head_gradient_factor(model.head.weight)
        return gloro_loss(logits, target, model.pairwise_lipschitz(k), eps, trades_lambda=cfg.trades_lambda)

    return loss


@register_train_loss("lmt")
def _lmt(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: Any, k: Tensor, progress: float) -> Tensor:
        return lmt_loss(logits, target, model.pairwise_lipschitz(k)[target], cfg.eps)

    return loss


@register_train_loss("hkr")
def _hkr(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: Any, k: Tensor, progress: float) -> Tensor:
        return hkr_loss(logits, target, alpha=cfg.hkr_alpha, min_margin=cfg.hkr_margin)

    return loss


@register_train_loss("ce-cr")
def _ce_cr(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: Any, k: Tensor, progress: float) -> Tensor:
        return cert_reg_loss(logits, target, model.pairwise_lipschitz(k.detach())[target], cfg.cr_gamma)

    return loss


@register_train_loss("ce")
def _ce(cfg: LossConfig) -> TrainLoss:
    def loss(logits: Tensor, target: Tensor, model: Any, k: Tensor, progress: float) -> Tensor:
        return F.cross_entropy(logits, target)

    return loss
