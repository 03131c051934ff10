"""The certified radius and certified accuracy: THE formulas (pure functions over tensors).

``R(x) = min_{j != c} (f_c(x) - f_j(x)) / L[c, j]`` with ``L[c, j] >= Lip(f_c - f_j)`` and ``c`` the
predicted class.  A sample is certified at ``eps`` when its prediction is right and ``R(x) > eps``
(strict): :func:`certified_mask` per sample, :func:`certified_fraction` /
:func:`certified_accuracy` over a set of samples.  Everything that reports a radius or a
certified accuracy (certify, audit, report, plots) goes through these functions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from lipmargin.lipschitz.rounding import radius_lower

__all__ = ["certified_accuracy", "certified_fraction", "certified_mask", "certified_radius", "radius_text"]


def certified_radius(logits: Tensor, pairwise: Tensor, logit_error: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample certified radius and prediction, in float64 whatever the logits' dtype.

    Args:
        logits: ``(B, C)``.
        pairwise: ``(C, C)`` with ``pairwise[i, j] >= Lip(f_i - f_j)`` (used in float64, never
            rounded down to the logits' dtype).
        logit_error: optional ``(B,)`` bound on ``||logits - exact logits||_2`` (the rounding of the
            forward pass); the margins are deflated by ``sqrt(2)`` times it.  ``None``: the logits
            are taken as exact.

    Returns:
        ``(radius (B,) float64, prediction (B,))``, every rounding directed down
        (:func:`lipmargin.lipschitz.rounding.radius_lower`).  A pair with a zero bound has a constant
        difference: it never limits the radius if the margin is positive (``inf``), else 0.

    Example (margin 0.5 over a pair bound of 2: radius 0.25, rounded down by at most an ulp):

    >>> logits = torch.tensor([[1.5, 1.0]], dtype=torch.float64)
    >>> pairwise = torch.tensor([[0.0, 2.0], [2.0, 0.0]], dtype=torch.float64)
    >>> radius, prediction = certified_radius(logits, pairwise)
    >>> prediction.tolist(), round(float(radius), 12)
    ([0], 0.25)
    >>> bool(radius <= 0.25)
    True
    """
    if logits.dim() != 2 or pairwise.shape != (logits.shape[1], logits.shape[1]):
        raise ValueError(
            f"logits must be (B, C) and pairwise (C, C); got {tuple(logits.shape)} and {tuple(pairwise.shape)}"
        )
    if logit_error is None:
        logit_error = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    return radius_lower(logits, logit_error, pairwise.to(device=logits.device, dtype=torch.float64))


def certified_mask(radius: Tensor, correct: Tensor, eps: float) -> Tensor:
    """``(B,)`` bool: the samples certified at ``eps``, i.e. correct and ``radius > eps`` (strict).

    Radii are float64 (:func:`certified_radius`); the comparison is made in float64.

    >>> radius = torch.tensor([0.5, 0.5, 0.1], dtype=torch.float64)
    >>> certified_mask(radius, torch.tensor([True, False, True]), 0.2).tolist()
    [True, False, False]
    """
    return correct & (radius.to(torch.float64) > float(eps))


def certified_fraction(radius: Tensor, correct: Tensor, eps: Tensor | Iterable[float]) -> Tensor:
    """``(M,)`` float64: for each ``eps[k]``, the fraction of ALL samples that :func:`certified_mask`
    counts at ``eps[k]`` (0 for no samples).  Vectorised for many radii (a whole curve): the correct
    samples' radii are sorted once and counted with a binary search.

    >>> certified_fraction(torch.tensor([0.5, 0.5, 0.1, float("inf")], dtype=torch.float64),
    ...                    torch.tensor([True, False, True, True]), [0.0, 0.1, 0.5]).tolist()
    [0.75, 0.5, 0.25]
    """
    r = radius.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    c = correct.detach().reshape(-1).to(device="cpu", dtype=torch.bool)
    if r.shape != c.shape:
        raise ValueError(f"radius and correct must have the same length; got {r.numel()} and {c.numel()}")
    e = torch.as_tensor(eps if isinstance(eps, Tensor) else list(eps), dtype=torch.float64).reshape(-1).cpu()
    hits, _ = torch.sort(r[c & ~torch.isnan(r)])  # a nan radius is > no eps
    # radius > e  <=>  not (radius <= e): the hits left of e's right insertion point are <= e.
    above = hits.numel() - torch.searchsorted(hits, e, right=True)
    return above.to(torch.float64) / max(r.numel(), 1)


def certified_accuracy(radius: Tensor, prediction: Tensor, target: Tensor, eps: Iterable[float]) -> dict[float, float]:
    """Fraction of samples with a correct prediction and ``radius > eps`` (strict), per eps.

    >>> certified_accuracy(torch.tensor([0.3, 0.3, 0.05], dtype=torch.float64), torch.tensor([1, 0, 2]),
    ...                    torch.tensor([1, 1, 2]), [0.0, 0.1, 0.3])
    {0.0: 0.6666666666666666, 0.1: 0.3333333333333333, 0.3: 0.0}
    """
    keys = [float(e) for e in eps]
    values = certified_fraction(radius, prediction.reshape(-1) == target.reshape(-1), keys).tolist()
    return dict(zip(keys, values))


def radius_text(eps: float) -> str:
    """A radius as the field writes it: ``36/255 (0.1412)`` for multiples of 1/255 (also when read
    back from a 6-digit JSON key), else the plain number (``0.5``, ``0.15``).

    >>> radius_text(36 / 255), radius_text(0.141176), radius_text(0.5), radius_text(1.0)
    ('36/255 (0.1412)', '36/255 (0.1412)', '0.5', '1')
    """
    eps = float(eps)
    if abs(eps * 1000 - round(eps * 1000)) < 1e-9:  # a short decimal is written as such
        return f"{eps:g}"
    steps = round(eps * 255)
    if steps >= 1 and abs(eps - steps / 255) <= 5e-6 * eps:
        return f"{steps}/255 ({eps:.4g})"
    return f"{eps:g}"
