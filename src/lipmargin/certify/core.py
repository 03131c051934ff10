"""Model bounds and certification of a model (docs/method.md#pairwise-certificate).

Certificates are computed in float64: the model is traced (:mod:`lipmargin.lipschitz.graph`) and
copied to float64 (the caller's model is not touched), the pairwise matrix composes per-leaf values
of one of the :data:`BOUND_METHODS` over the graph, and every radius (:func:`~lipmargin.certify.radius.certified_radius`)
is deflated by a bound on the rounding of the float64 forward pass (:mod:`lipmargin.lipschitz.graph_eval`).

A sound method gives a :class:`ModelBound` (every number provably >= the truth); the power
iteration gives a :class:`ModelEstimate` (same fields, may be lower than the truth).

Any ``nn.Module`` mapping an input batch to logits is accepted.  Two optional attributes are used
when a model has them (duck typing; :class:`lipmargin.models.LipschitzNet` has both):

- ``in_shape``: the shape of one input (no batch dimension), used when ``input_shape`` is not given;
- ``bound`` with ``layers`` and ``vector_names`` (a :class:`lipmargin.lipschitz.estimate.FeatureBound`):
  its persistent power-iteration vectors warm-start the ``"power"`` estimate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from lipmargin.certify.radius import certified_accuracy, certified_radius
from lipmargin.lipschitz import float64_operator, converge_operator_norm, layer_rule, operator_norm_bound
from lipmargin.lipschitz.graph import GraphPlan, check_input_shape, check_training_mode, compose_sound, pairwise_from_plan, trace_model
from lipmargin.lipschitz.graph_eval import forward_with_error

if TYPE_CHECKING:
    from lipmargin.checkpoint import CheckpointRef

__all__ = [
    "BOUND_METHODS",
    "CertifyResult",
    "ModelBound",
    "ModelEstimate",
    "certify",
    "model_bound",
    "model_estimate",
    "register_bound_method",
]


@dataclass(frozen=True)
class _PairwiseLipschitz:
    """Pairwise Lipschitz constants of a model and how they were obtained.

    ``pairwise[i, j]`` is for the Lipschitz constant of ``f_i - f_j``; ``feature`` the constant of
    the features under a final linear head (``K``), or of the whole model when it has none;
    ``per_layer`` the per-leaf values in graph order (the head left out); ``lipschitz`` =
    ``max pairwise`` (the constant of the worst logit difference).  ``input_shape`` is the input
    size the values hold for and ``fingerprint`` the SHA-256 of the graph and weights they were
    computed from (values of other weights are refused).
    """

    sound: ClassVar[bool]
    method: str
    feature: float
    per_layer: tuple[float, ...]
    pairwise: Tensor  # (C, C) float64
    lipschitz: float
    input_shape: tuple[int, ...] = ()
    fingerprint: str = ""
    layers: tuple[str, ...] = ()  # "path (Type)" of each per_layer entry
    leaves: tuple[float, ...] = ()  # every traced leaf's value in graph order (the head included)


@dataclass(frozen=True)
class ModelBound(_PairwiseLipschitz):
    """Pairwise Lipschitz *bounds*: every number is provably >= the true constant (``sound`` is True)."""

    sound: ClassVar[bool] = True


@dataclass(frozen=True)
class ModelEstimate(_PairwiseLipschitz):
    """Pairwise Lipschitz *estimates* (power iteration): may be below the truth (``sound`` is False).

    Certificates computed from an estimate are not guaranteed; export refuses them."""

    sound: ClassVar[bool] = False


BoundFn = Callable[[GraphPlan, nn.Module], dict[str, float]]

#: Registry of ways to bound a model's leaves; filled by :func:`register_bound_method`.  Each
#: returns one value per leaf step of the traced graph; the graph composes them.
BOUND_METHODS: dict[str, BoundFn] = {}
_SOUND_METHODS: set[str] = set()


def register_bound_method(name: str, *, sound: bool) -> Callable[[BoundFn], BoundFn]:
    """Decorator: register ``fn(plan, float64 model) -> {leaf name: value}`` as bound method ``name``.

    ``sound=True`` promises every value is >= its leaf's Lipschitz constant (the method then gives
    a :class:`ModelBound`); otherwise it gives a :class:`ModelEstimate`."""

    def decorator(fn: BoundFn) -> BoundFn:
        BOUND_METHODS[name] = fn
        if sound:
            _SOUND_METHODS.add(name)
        return fn

    return decorator


@register_bound_method("power", sound=False)
def _power_leaves(plan: GraphPlan, model: nn.Module) -> dict[str, float]:
    """Power iteration run to convergence in float64 (what the paper reports; an estimate).

    A model with persistent power-iteration vectors (:func:`_warm_vectors`) warm-starts from them
    (on the copy); other leaves start from a fixed-seed random vector (the global RNG is not touched).
    """
    warm = _warm_vectors(model)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for step in plan.leaves:
        m = plan.module(step)
        rule = layer_rule(m)
        shape = step.in_shape or ()
        if rule.operator is not None:
            fwd, adj = float64_operator(rule, m, shape)
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


def _warm_vectors(model: nn.Module) -> dict[int, Tensor]:
    """``{id(leaf module): vector}`` from a model's ``bound`` attribute when it has ``layers`` and
    ``vector_names`` (a :class:`~lipmargin.lipschitz.estimate.FeatureBound`, e.g. a LipschitzNet's);
    empty otherwise.  Duck typing, so that certify need not know the model classes."""
    holder = getattr(model, "bound", None)
    layers, names = getattr(holder, "layers", None), getattr(holder, "vector_names", None)
    if not isinstance(holder, nn.Module) or layers is None or names is None:
        return {}
    warm: dict[int, Tensor] = {}
    for m, name in zip(layers, names):
        v = getattr(holder, name, None) if name is not None else None
        if isinstance(v, Tensor):
            warm[id(m)] = v.detach()
    return warm


def _declared_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The model's own ``in_shape`` attribute (one input, no batch dimension), if it declares one."""
    declared = getattr(model, "in_shape", None)
    if isinstance(declared, (tuple, list, torch.Size)) and all(isinstance(s, int) for s in declared):
        return tuple(int(s) for s in declared)
    return None


def _resolve_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    declared = _declared_shape(model)
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if declared is not None and shape != declared:
            raise ValueError(f"input_shape {shape} differs from the {type(model).__name__}'s in_shape {declared}")
        return shape
    if declared is not None:
        return declared
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


def _bound_of_plan(plan: GraphPlan, model: nn.Module, method: str) -> ModelBound | ModelEstimate:
    leaves = BOUND_METHODS[method](plan, model)
    kind = ModelBound if method in _SOUND_METHODS else ModelEstimate
    lip = compose_sound(plan, leaves)
    feature, pairwise = pairwise_from_plan(plan, lip)
    head = plan.step(plan.output).name if plan.head is not None else None
    return kind(
        method=method,
        feature=feature,
        per_layer=tuple(float(leaves[s.name]) for s in plan.leaves if s.name != head),
        layers=tuple(f"{s.module} ({type(plan.module(s)).__name__})" for s in plan.leaves if s.name != head),
        leaves=tuple(float(leaves[s.name]) for s in plan.leaves),
        pairwise=pairwise,
        lipschitz=float(pairwise.max()) if pairwise.numel() else 0.0,
        input_shape=plan.input_shape,
        fingerprint=plan.fingerprint(),
    )


def model_bound(
    model: nn.Module, method: str = "sound", *, input_shape: Sequence[int] | None = None
) -> ModelBound | ModelEstimate:
    """The pairwise Lipschitz matrix of any ``model`` mapping an input batch to logits.

    A sound ``method`` (``"sound"``) returns a :class:`ModelBound`; ``"power"`` (power iteration,
    what the paper reports) a :class:`ModelEstimate` (see also :func:`model_estimate`).
    The model is traced with ``torch.fx`` as it is now (:mod:`lipmargin.lipschitz.graph`); every
    node needs a rule or a ``TypeError`` names it.  ``input_shape`` (one input, no batch
    dimension) is required unless the model has an ``in_shape`` attribute.  The model is not
    changed: the bound is computed on a float64 copy.

    Example: for ``f(x) = W x`` with ``W = [[3, 0], [0, 4]]``, ``Lip(f_0 - f_1) = ||W_0 - W_1|| = 5``:

    >>> model = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    >>> bound = model_bound(model, input_shape=(2,))
    >>> type(bound).__name__, bound.sound, round(bound.lipschitz, 6)
    ('ModelBound', True, 5.0)
    >>> bool(bound.lipschitz >= 5.0)
    True
    """
    if method not in BOUND_METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(sorted(BOUND_METHODS))}")
    shape = _resolve_shape(model, input_shape)
    m64 = _float64_copy(model)
    return _bound_of_plan(trace_model(m64, shape), m64, method)


def model_estimate(model: nn.Module, *, input_shape: Sequence[int] | None = None) -> ModelEstimate:
    """The power-iteration estimate of the pairwise matrix (``model_bound(model, "power")``).

    >>> model = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    >>> estimate = model_estimate(model, input_shape=(2,))
    >>> type(estimate).__name__, estimate.sound, round(estimate.lipschitz, 6)
    ('ModelEstimate', False, 5.0)
    """
    estimate = model_bound(model, "power", input_shape=input_shape)
    if not isinstance(estimate, ModelEstimate):  # pragma: no cover - "power" is registered as not sound
        raise RuntimeError("the power method was registered as sound; it is an estimate")
    return estimate


@dataclass
class CertifyResult:
    """What :func:`certify` found: accuracies, per-sample ``radius`` / ``prediction`` / ``target``,
    the ``bound`` used (``sound`` says whether it is a :class:`ModelBound`)."""

    clean_accuracy: float
    certified_accuracy: dict[float, float]
    lipschitz: float
    num_samples: int
    bound_method: str
    sound: bool
    bound: ModelBound | ModelEstimate
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
    bound: ModelBound | ModelEstimate | None = None,
    method: str = "sound",
    input_shape: Sequence[int] | None = None,
    checkpoint: CheckpointRef | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> CertifyResult:
    """Certify every sample of ``batches`` at each radius in ``eps``.

    ``model`` is any module mapping a batch to logits (``input_shape`` required unless it has an
    ``in_shape`` attribute).  It is traced and evaluated as a float64 copy, so what is evaluated is
    exactly the graph that was bounded; the caller's model keeps its dtype, mode and buffers.
    Each radius is deflated by a bound on the rounding error of that float64 forward pass
    (:mod:`lipmargin.lipschitz.graph_eval`).  ``bound`` reuses a :class:`ModelBound` (or a
    :class:`ModelEstimate`: the result then says ``sound=False``); it must have been computed from
    the model's current weights (else ``ValueError``).  Inputs of another shape than
    the bound's raise ``ValueError``.  ``checkpoint`` (e.g.
    :attr:`lipmargin.train.LoadedRun.checkpoint`) is recorded in the result, so that it names the
    weights it certifies.  ``on_event`` receives ``{"event": "certify", "samples": n}`` after each
    batch (``n`` samples done so far).

    Example: ``f(x) = W x`` with ``W = [[3, 0], [0, 4]]`` has ``Lip(f_0 - f_1) = 5``; at ``x = (1, 0)``
    the margin is 3, so the radius is 3 / 5 = 0.6 (deflated by a tiny rounding allowance):

    >>> model = nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    >>> result = certify(model, [(x, y)], [0.5, 0.6], input_shape=(2,))
    >>> result.clean_accuracy, result.certified_accuracy, result.sound
    (0.5, {0.5: 0.5, 0.6: 0.0}, True)
    >>> [round(r, 6) for r in result.radius.tolist()], result.prediction.tolist()
    ([0.6, 0.8], [0, 1])
    >>> bool((result.radius <= torch.tensor([0.6, 0.8], dtype=torch.float64)).all())  # never above
    True
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
