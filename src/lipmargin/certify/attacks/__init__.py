"""Empirical robustness checks: L2 PGD, robust accuracy, an empirical Lipschitz lower bound, AutoAttack.

Certificates are upper-bound arguments (``margin > K * eps`` implies robustness); the functions
here are their empirical counterparts and are used to *audit* them:

- :func:`pgd_l2` / :func:`robust_accuracy` (:mod:`.pgd`) search for misclassified points inside an
  L2 ball.  A point they return is always feasible, so a sample that is certified at radius
  ``eps`` must never be flipped; if it is, the certificate is wrong.
- :func:`lipschitz_lower` (:mod:`.lower`, "LOBO" in the CLL paper) maximises difference quotients
  of the logit differences over pairs of inputs: an empirical *lower* bound of the Lipschitz
  constant, which must never exceed a sound upper bound.
- :func:`autoattack_l2` (:mod:`.autoattack`, optional: ``pip install --no-deps torchattacks``) runs
  APGD-CE / APGD-T (Croce & Hein 2020) as a stronger, independent attack.
- :mod:`._common`: argument checks, eval mode, the misclassification margin, the ball projection.

Conventions shared by all functions:

- A sample counts as *correctly classified* only if its true logit is strictly larger than every
  other logit (``f_y > max_{j != y} f_j``).  Ties count as errors: that is the conservative choice
  for an attack, and it never contradicts a certificate, which needs a strictly positive margin.
- The model is run in eval mode (dropout/batch-norm statistics would otherwise make the attacked
  function differ from the certified one) and every module's ``training`` flag is restored
  afterwards.  Gradients are taken with :func:`torch.autograd.grad` w.r.t. the inputs only, so
  parameters' ``.grad`` and ``requires_grad`` are never touched.
- Randomness comes from the ``generator`` argument; torchattacks' reseeding is confined to a
  forked RNG state, so the caller's global random streams are left as they were.
"""

from __future__ import annotations

from lipmargin.certify.attacks.autoattack import RADIUS_GROUP_WIDTH, autoattack_l2, radius_groups
from lipmargin.certify.attacks.lower import LipschitzLowerResult, lipschitz_lower
from lipmargin.certify.attacks.pgd import LOSSES, AttackLoss, pgd_l2, robust_accuracy

__all__ = [
    "LOSSES",
    "AttackLoss",
    "LipschitzLowerResult",
    "RADIUS_GROUP_WIDTH",
    "autoattack_l2",
    "lipschitz_lower",
    "pgd_l2",
    "radius_groups",
    "robust_accuracy",
]

_RENAMED = {"lipschitz_lower_bound": "lipschitz_lower", "LowerBoundResult": "LipschitzLowerResult"}


def __getattr__(name: str) -> object:
    if name in _RENAMED:
        raise AttributeError(
            f"{name} was renamed {_RENAMED[name]} (it is an empirical lower bound, not a proven bound): "
            f"use lipmargin.certify.attacks.{_RENAMED[name]}"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
