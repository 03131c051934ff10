"""Losses for Lipschitz-margin training: CLL, GloRo (and its TRADES variant), baselines, the penalty.

Every loss is a pure function over tensors plus a thin ``nn.Module`` wrapper holding its
hyper-parameters, like ``F.cross_entropy`` / ``nn.CrossEntropyLoss``.  Modules:

- :mod:`~lipmargin.losses.cll`: the Calibrated Lipschitz-Margin Loss (``cll_sigma``, ``cll_loss``, ...).
- :mod:`~lipmargin.losses.gloro`: GloRo and its TRADES variant.
- :mod:`~lipmargin.losses.baselines`: LMT, hinge-KR, CE with certificate regularisation, the Lipschitz penalty.
- :mod:`~lipmargin.losses.objectives`: the training losses by name (``loss.name``), each a
  ``(logits, target, model, K, progress) -> loss`` built from a loss config.
"""

from lipmargin.losses._validate import REDUCTIONS
from lipmargin.losses.baselines import (
    CertRegLoss,
    HKRLoss,
    LMTLoss,
    cert_reg_loss,
    hkr_loss,
    lipschitz_penalty,
    lmt_loss,
)
from lipmargin.losses.cll import CLLoss, cll_logits, cll_loss, cll_sigma, k_scale_schedule
from lipmargin.losses.gloro import GloRoLoss, gloro_eps_schedule, gloro_logits, gloro_loss
from lipmargin.losses.objectives import TRAIN_LOSSES, TrainLoss, list_train_losses, register_train_loss

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
    "TRAIN_LOSSES",
    "TrainLoss",
    "register_train_loss",
    "list_train_losses",
]
