"""Every pure formula of lipmargin in one namespace, as ``torch.nn.functional`` is for torch.

Functions only: tensors in, tensors (or floats) out, no state, no printing, no files.  Each one is
defined in the package named in the comment above its group; this module only gathers them, so
``import lipmargin.functional as LF`` is all a training script or a notebook needs for the maths.

>>> import torch
>>> import lipmargin.functional as LF
>>> logits = torch.tensor([[2.0, 0.0]])
>>> pairwise = LF.pairwise_head_norms(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
>>> radius, prediction = LF.certified_radius(logits, pairwise)
>>> round(float(radius), 6), int(prediction)
(1.414214, 0)
"""

from __future__ import annotations

# certificates: lipmargin.certify.radius
from lipmargin.certify import certified_accuracy, certified_fraction, certified_mask, certified_radius

# power iteration (estimates) and sound operator-norm bounds: lipmargin.lipschitz
from lipmargin.lipschitz import (
    conv2d_norm_bound,
    converge_operator_norm,
    linear_norm_bound,
    operator_norm_bound,
    operator_norm_estimate,
    pairwise_head_norms,
    pairwise_head_norms_bound,
    power_iteration,
)

# losses: lipmargin.losses
from lipmargin.losses import (
    cert_reg_loss,
    cll_logits,
    cll_loss,
    cll_sigma,
    gloro_eps_schedule,
    gloro_logits,
    gloro_loss,
    hkr_loss,
    k_scale_schedule,
    lipschitz_penalty,
    lmt_loss,
)

# activations: lipmargin.nn.activations
from lipmargin.nn import max_min_pairs

__all__ = [
    "cert_reg_loss",
    "certified_accuracy",
    "certified_fraction",
    "certified_mask",
    "certified_radius",
    "cll_logits",
    "cll_loss",
    "cll_sigma",
    "conv2d_norm_bound",
    "converge_operator_norm",
    "gloro_eps_schedule",
    "gloro_logits",
    "gloro_loss",
    "hkr_loss",
    "k_scale_schedule",
    "linear_norm_bound",
    "lipschitz_penalty",
    "lmt_loss",
    "max_min_pairs",
    "operator_norm_bound",
    "operator_norm_estimate",
    "pairwise_head_norms",
    "pairwise_head_norms_bound",
    "power_iteration",
]
