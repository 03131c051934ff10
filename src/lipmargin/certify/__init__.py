"""Certification: margins, certified radii, certified accuracy (METHOD.md section 1).

``R(x) = min_{j != c} (f_c(x) - f_j(x)) / L[c, j]`` with ``L[c, j] >= Lip(f_c - f_j)``.  A sample is
certified at ``eps`` when its prediction is right and ``R(x) > eps`` (strict).

Certificates are computed in float64: the model is traced (:mod:`lipmargin.lipschitz.graph`) and copied to
float64 (the caller's model is not touched), the pairwise matrix composes per-leaf values of one of
the :data:`BOUND_METHODS` over the graph, and every radius is deflated by a bound on the rounding
of the float64 forward pass (:mod:`lipmargin.lipschitz.graph_eval`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torch import nn

from lipmargin.lipschitz.graph import GraphPlan, check_input_shape, check_training_mode, compose_sound, pairwise_from_plan, trace_model
from lipmargin.lipschitz.graph_eval import forward_with_error
from lipmargin.lipschitz import _float64_operator, converge_operator_norm, layer_rule, operator_norm_bound
from lipmargin.models import LipschitzNet
from lipmargin.lipschitz.rounding import radius_lower

if TYPE_CHECKING:
    from lipmargin.checkpoint import CheckpointRef

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
    """Pairwise Lipschitz constants of a model and how they were obtained.

    ``pairwise[i, j]`` bounds the Lipschitz constant of ``f_i - f_j``; ``feature`` is the constant
    of the features under a final linear head (``K``), or of the whole model when it has none;
    ``per_layer`` the per-leaf values in graph order; ``lipschitz`` = ``max pairwise`` (the
    constant of the worst logit difference).  ``sound`` says whether every number is a guaranteed
    upper bound.  ``input_shape`` is the input size the bound holds for and ``fingerprint`` the
    SHA-256 of the graph and weights it was computed from (a bound of other weights is refused).
    """

    method: str
    sound: bool
    feature: float
    per_layer: tuple[float, ...]
    pairwise: Tensor  # (C, C) float64
    lipschitz: float
    input_shape: tuple[int, ...] = ()
    fingerprint: str = ""
    layers: tuple[str, ...] = ()  # "path (Type)" of each per_layer entry
    leaves: tuple[float, ...] = ()  # every traced leaf's value in graph order (the head included)


BoundFn = Callable[[GraphPlan, nn.Module], dict[str, float]]

#: Registry of ways to bound a model's leaves; filled by :func:`register_bound_method`.  Each
#: returns one value per leaf step of the traced graph; the graph composes them.
BOUND_METHODS: dict[str, BoundFn] = {}
_SOUND_METHODS: set[str] = set()


def register_bound_method(name: str, *, sound: bool) -> Callable[[BoundFn], BoundFn]:
    def decorator(fn: BoundFn) -> BoundFn:
        BOUND_METHODS[name] = fn
        if sound:
            _SOUND_METHODS.add(name)
        return fn

    return decorator


@register_bound_method("power", sound=False)
def _power_leaves(plan: GraphPlan, model: nn.Module) -> dict[str, float]:
    """Power iteration run to convergence in float64 (what the paper reports; an estimate).

    A :class:`LipschitzNet` warm-starts from its training vectors (on a copy); other models start
    from a fixed-seed random vector (the global RNG is not touched).
    """
    warm: dict[int, Tensor] = {}
    if isinstance(model, LipschitzNet):
        for m, name in zip(model.bound.layers, model.bound._vector_names):
            if name is not None:
                warm[id(m)] = getattr(model.bound, name).detach()
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for step in plan.leaves:
        m = plan.module(step)
        rule = layer_rule(m)
        shape = step.in_shape or ()
        if rule.operator is not None:
            fwd, adj = _float64_operator(rule, m, shape)
            v = warm.get(id(m))
            if v is None or tuple(v.shape[1:]) != tuple(shape):
                v = torch.randn(1, *shape, generator=gen, dtype=torch.float64)
            sigma, _ = converge_operator_norm(fwd, adj, v.to(torch.float64).cpu().to(next(m.parameters()).device))
            out[step.name] = float(sigma)
        elif rule.estimate is not None:
            out[step.name] = float(rule.estimate(m).detach().double())
        elif rule.constant is not None:
            out[step.name] = float(rule.constant(m))
        else:
            out[step.name] = float(operator_norm_bound(m, shape))
    return out


@register_bound_method("sound", sound=True)
def _sound_leaves(plan: GraphPlan, model: nn.Module) -> dict[str, float]:
    """Per-leaf bounds provably >= each leaf's Lipschitz constant (lipmargin.lipschitz.dense, lipmargin.lipschitz.conv)."""
    return {s.name: operator_norm_bound(plan.module(s), s.in_shape or ()) for s in plan.leaves}


def _resolve_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if isinstance(model, LipschitzNet) and shape != model.in_shape:
            raise ValueError(f"input_shape {shape} differs from the LipschitzNet's in_shape {model.in_shape}")
        return shape
    if isinstance(model, LipschitzNet):
        return model.in_shape
    raise ValueError(
        f"input_shape is required to bound a {type(model).__name__} (the shape of one input without the "
        "batch dimension, e.g. (1, 28, 28)); conv bounds depend on it"
    )


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy in eval mode (float32 -> float64 is exact); the caller's model is not touched.

    Layers whose training-mode output depends on the batch or on chance (BatchNorm, Dropout) are
    refused in training mode rather than silently switched; every other layer is certified as it
    computes in eval mode (e.g. a 1-Lipschitz layer's cached parametrisation), as deployed.
    """
    check_training_mode(model)
    return copy.deepcopy(model).to(torch.float64).eval()


def _bound_of_plan(plan: GraphPlan, model: nn.Module, method: str) -> ModelBound:
    leaves = BOUND_METHODS[method](plan, model)
    sound = method in _SOUND_METHODS
    lip = compose_sound(plan, leaves)
    feature, pairwise = pairwise_from_plan(plan, lip)
    head = plan.step(plan.output).name if plan.head is not None else None
    return ModelBound(
        method=method,
        sound=sound,
        feature=feature,
        per_layer=tuple(float(leaves[s.name]) for s in plan.leaves if s.name != head),
        layers=tuple(f"{s.module} ({type(plan.module(s)).__name__})" for s in plan.leaves if s.name != head),
        leaves=tuple(float(leaves[s.name]) for s in plan.leaves),
        pairwise=pairwise,
        lipschitz=float(pairwise.max()) if pairwise.numel() else 0.0,
        input_shape=plan.input_shape,
        fingerprint=plan.fingerprint(),
    )


def model_bound(model: nn.Module, method: str = "sound", *, input_shape: Sequence[int] | None = None) -> ModelBound:
    """The pairwise Lipschitz matrix of any ``model`` mapping an input batch to logits.

    The model is traced with ``torch.fx`` as it is now (:mod:`lipmargin.lipschitz.graph`); every node needs
    a rule or a ``TypeError`` names it.  ``input_shape`` (one input, no batch dimension) is
    required unless ``model`` is a :class:`LipschitzNet`.  The model is not changed: the bound is
    computed on a float64 copy.
    """
    if method not in BOUND_METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(sorted(BOUND_METHODS))}")
    shape = _resolve_shape(model, input_shape)
    m64 = _float64_copy(model)
    return _bound_of_plan(trace_model(m64, shape), m64, method)


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
    """
    if logits.dim() != 2 or pairwise.shape != (logits.shape[1], logits.shape[1]):
        raise ValueError(
            f"logits must be (B, C) and pairwise (C, C); got {tuple(logits.shape)} and {tuple(pairwise.shape)}"
        )
    if logit_error is None:
        logit_error = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    return radius_lower(logits, logit_error, pairwise.to(device=logits.device, dtype=torch.float64))


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
    checkpoint: CheckpointRef | None = None  # the weights certified, when the caller named them


@torch.no_grad()
def certify(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    eps: Sequence[float],
    *,
    bound: ModelBound | None = None,
    method: str = "sound",
    input_shape: Sequence[int] | None = None,
    checkpoint: CheckpointRef | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> CertifyResult:
    """Certify every sample of ``batches`` at each radius in ``eps``.

    ``model`` is any module mapping a batch to logits (``input_shape`` required unless it is a
    :class:`LipschitzNet`).  It is traced and evaluated as a float64 copy, so what is evaluated is
    exactly the graph that was bounded; the caller's model keeps its dtype, mode and buffers.
    Each radius is deflated by a bound on the rounding error of that float64 forward pass
    (:mod:`lipmargin.lipschitz.graph_eval`).  ``bound`` reuses a :class:`ModelBound`; it must have been
    computed from the model's current weights (else ``ValueError``).  Inputs of another shape than
    the bound's raise ``ValueError``.  ``checkpoint`` (e.g.
    :attr:`lipmargin.train.LoadedRun.checkpoint`) is recorded in the result, so that it names the
    weights it certifies.  ``on_event`` receives ``{"event": "certify", "samples": n}`` after each
    batch (``n`` samples done so far).
    """
    if any(not (isinstance(e, (int, float)) and e >= 0) for e in eps):
        raise ValueError(f"eps values must be numbers >= 0; got {list(eps)}")
    if bound is None and method not in BOUND_METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(sorted(BOUND_METHODS))}")
    shape = _resolve_shape(model, input_shape if bound is None or input_shape is not None else (bound.input_shape or None))
    m64 = _float64_copy(model)
    plan = trace_model(m64, shape)
    if bound is None:
        bound = _bound_of_plan(plan, m64, method)
    elif bound.fingerprint != plan.fingerprint():
        raise ValueError("the bound was computed for other weights or another graph than the model's; recompute it with model_bound(model)")
    # The error allowance needs sound per-leaf constants: a sound bound of these weights has them.
    if bound.sound and len(bound.leaves) == len(plan.leaves):
        leaf_bounds = {s.name: v for s, v in zip(plan.leaves, bound.leaves)}
    else:
        leaf_bounds = _sound_leaves(plan, m64)
    radii, preds, targets = [], [], []
    done = 0
    pairwise = bound.pairwise
    for x, y in batches:
        check_input_shape(shape, x)
        x64 = x.to(torch.float64)
        logits, err, _ = forward_with_error(plan, x64, leaf_bounds)
        r, c = certified_radius(logits, pairwise.to(logits.device), err)
        radii.append(r.cpu())
        preds.append(c.cpu())
        targets.append(y.cpu())
        done += int(y.numel())
        if on_event is not None:
            on_event({"event": "certify", "samples": done})
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
        checkpoint=checkpoint,
    )
