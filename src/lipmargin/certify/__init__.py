"""Certification: certified radii, model bounds, certify, and the audit that tries to break them.

Modules:

- :mod:`~lipmargin.certify.radius`: THE certified radius ``R(x) = min_{j != c} (f_c - f_j) / L[c, j]``
  and THE certified accuracy (correct and ``R(x) > eps``, strict); pure functions over tensors.
- :mod:`~lipmargin.certify.core`: :func:`model_bound` (a :class:`ModelBound`, or for the power
  iteration a :class:`ModelEstimate`), :data:`BOUND_METHODS`, and :func:`certify` for any model.
- :mod:`~lipmargin.certify.audit`: :func:`audit_model`, attacks against the certificates and an
  empirical Lipschitz lower bound.
- :mod:`~lipmargin.certify.attacks`: PGD-L2, the empirical lower bound, the AutoAttack adapter.

``from lipmargin import certify`` is the function :func:`certify`; this package is
``sys.modules["lipmargin.certify"]``.
"""

from __future__ import annotations

from lipmargin.certify.audit import AuditResult, audit_model
from lipmargin.certify.core import (
    BOUND_METHODS,
    CertifyResult,
    ModelBound,
    ModelEstimate,
    certify,
    model_bound,
    model_estimate,
    register_bound_method,
)
from lipmargin.certify.radius import certified_accuracy, certified_fraction, certified_mask, certified_radius, radius_text

__all__ = [
    "AuditResult",
    "BOUND_METHODS",
    "CertifyResult",
    "ModelBound",
    "ModelEstimate",
    "certified_accuracy",
    "certified_fraction",
    "certified_mask",
    "certified_radius",
    "radius_text",
    "audit_model",
    "certify",
    "model_bound",
    "model_estimate",
    "register_bound_method",
]
