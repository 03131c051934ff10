"""Certification: margins, certified radii, certified accuracy (METHOD.md section 1).

``R(x) = min_{j != c} (f_c(x) - f_j(x)) / L[c, j]`` with ``L[c, j] >= Lip(f_c - f_j)``.  A sample is
certified at ``eps`` when its prediction is right and ``R(x) > eps`` (strict).

Certificates are computed in float64: the model is copied to float64 (the caller's model is not
touched) so that the margins are not blurred by float32 rounding, and the pairwise matrix comes
from one of the :data:`BOUND_METHODS`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lipmargin.lipschitz import pairwise_head_norms_bound
from lipmargin.models import LipschitzNet

__all__ = [
    "BOUND_METHODS",
    "ModelBound",
    "CertifyResult",
    "register_bound_method",
    "model_bound",
    "certified_radius",
    "certified_accuracy",
    "certify",
]


@dataclass(frozen=True)
class ModelBound:
    """Pairwise Lipschitz constants of a :class:`LipschitzNet` and how they were obtained.

    ``pairwise[i, j]`` bounds the Lipschitz constant of ``f_i - f_j``; ``feature`` is the bound of
    the feature extractor (product of ``per_layer``); ``lipschitz`` = ``feature * max ||W_i - W_j||``
    (the constant of the worst logit difference).  ``sound`` says whether every number is a
    guaranteed upper bound.
    """

    method: str
    sound: bool
    feature: float
    per_layer: tuple[float, ...]
    pairwise: Tensor  # (C, C) float64
    lipschitz: float


def _bound_from_layers(model: LipschitzNet, method: str, sound: bool, per_layer: Tensor) -> ModelBound:
    feature = float(torch.prod(per_layer)) if per_layer.numel() else 1.0
    if sound:
        # The product of rounded float64 numbers may round down; inflate by a margin far above
        # the worst relative error of a few hundred float64 multiplications.
        feature *= 1.0 + 1e-12 * (per_layer.numel() + 1)
    pairwise = feature * pairwise_head_norms_bound(model.head.weight)
    return ModelBound(
        method=method,
        sound=sound,
        feature=feature,
        per_layer=tuple(float(v) for v in per_layer),
        pairwise=pairwise,
        lipschitz=float(pairwise.max()),
    )


BoundFn = Callable[[LipschitzNet], ModelBound]

#: Registry of ways to bound a model; filled by :func:`register_bound_method`.
BOUND_METHODS: dict[str, BoundFn] = {}


def register_bound_method(name: str) -> Callable[[BoundFn], BoundFn]:
    def decorator(fn: BoundFn) -> BoundFn:
        BOUND_METHODS[name] = fn
        return fn

    return decorator


@register_bound_method("power")
def _power_bound(model: LipschitzNet) -> ModelBound:
    """Power iteration run to convergence in float64 (what the paper reports; an estimate)."""
    return _bound_from_layers(model, "power", False, model.bound.converge())


@register_bound_method("sound")
def _sound_bound(model: LipschitzNet) -> ModelBound:
    """Per-layer bounds provably >= each layer's operator norm (lipmargin.bounds)."""
    return _bound_from_layers(model, "sound", True, model.bound.sound())


def model_bound(model: LipschitzNet, method: str = "sound") -> ModelBound:
    """Compute the pairwise Lipschitz matrix of ``model`` with the named method."""
    if method not in BOUND_METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(sorted(BOUND_METHODS))}")
    return BOUND_METHODS[method](model)


def certified_radius(logits: Tensor, pairwise: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample certified radius and prediction.

    Args:
        logits: ``(B, C)``.
        pairwise: ``(C, C)`` with ``pairwise[i, j] >= Lip(f_i - f_j)``.

    Returns:
        ``(radius (B,), prediction (B,))``.  A pair with a zero bound has a constant difference:
        it never limits the radius if the margin is positive (``inf``) and gives 0 otherwise.
    """
    if logits.dim() != 2 or pairwise.shape != (logits.shape[1], logits.shape[1]):
        raise ValueError(
            f"logits must be (B, C) and pairwise (C, C); got {tuple(logits.shape)} and {tuple(pairwise.shape)}"
        )
    pred = logits.argmax(1)  # (B,)
    margin = logits.gather(1, pred.unsqueeze(1)) - logits  # (B, C), >= 0
    rows = pairwise.to(logits.dtype)[pred]  # (B, C)
    safe = torch.where(rows > 0, rows, torch.ones_like(rows))
    ratio = torch.where(rows > 0, margin / safe, torch.where(margin > 0, math.inf, 0.0))
    ratio = ratio.masked_fill(torch.nn.functional.one_hot(pred, logits.shape[1]).bool(), math.inf)
    return ratio.amin(1), pred


def certified_accuracy(radius: Tensor, prediction: Tensor, target: Tensor, eps: Iterable[float]) -> dict[float, float]:
    """Fraction of samples with a correct prediction and ``radius > eps`` (strict), per eps."""
    correct = prediction == target
    n = max(int(target.numel()), 1)
    return {float(e): float(((radius > e) & correct).sum()) / n for e in eps}


@dataclass
class CertifyResult:
    clean_accuracy: float
    certified_accuracy: dict[float, float]
    lipschitz: float
    num_samples: int
    bound_method: str
    sound: bool
    bound: ModelBound
    radius: Tensor = field(repr=False)
    prediction: Tensor = field(repr=False)
    target: Tensor = field(repr=False)


@torch.no_grad()
def certify(
    model: LipschitzNet,
    batches: Iterable[tuple[Tensor, Tensor]],
    eps: Sequence[float],
    *,
    bound: ModelBound | None = None,
    method: str = "sound",
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> CertifyResult:
    """Certify every sample of ``batches`` at each radius in ``eps``.

    ``bound`` may be passed to reuse an already computed :class:`ModelBound`; otherwise it is
    computed with ``method``.  The model is evaluated on a float64 copy in eval mode; the caller's
    model keeps its dtype and mode.  ``on_event`` receives ``{"event": "certify", "samples": n}``
    after each batch (``n`` samples done so far).
    """
    if any(not (isinstance(e, (int, float)) and e >= 0) for e in eps):
        raise ValueError(f"eps values must be numbers >= 0; got {list(eps)}")
    if bound is None:
        # A copy, so that converging the power iteration does not move the caller's buffers.
        bound = model_bound(copy.deepcopy(model), method)
    m64 = copy.deepcopy(model).to(torch.float64).eval()
    radii, preds, targets = [], [], []
    for x, y in batches:
        logits = m64(x.to(torch.float64))
        r, c = certified_radius(logits, bound.pairwise.to(logits.device))
        radii.append(r.cpu())
        preds.append(c.cpu())
        targets.append(y.cpu())
        if on_event is not None:
            on_event({"event": "certify", "samples": sum(len(t) for t in targets)})
    radius = torch.cat(radii) if radii else torch.zeros(0, dtype=torch.float64)
    prediction = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    target = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    n = int(target.numel())
    return CertifyResult(
        clean_accuracy=float((prediction == target).sum()) / max(n, 1),
        certified_accuracy=certified_accuracy(radius, prediction, target, eps),
        lipschitz=bound.lipschitz,
        num_samples=n,
        bound_method=bound.method,
        sound=bound.sound,
        bound=bound,
        radius=radius,
        prediction=prediction,
        target=target,
    )
