"""The rule registry: how each kind of layer is estimated (training) and bounded (certificates).

Look-ups use a layer's EXACT type.  The rules of torch's own layers live in
:mod:`lipmargin.lipschitz.torch_layers` (imported by the package, so they are always registered);
other packages register theirs with :func:`register_layer_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from lipmargin.lipschitz.power import Operator

__all__ = [
    "LayerRule",
    "LAYER_RULES",
    "PEER_LAYER_RULES",
    "register_layer_rule",
    "find_layer_rule",
    "layer_rule",
    "supported_layers",
    "flatten_layers",
]


@dataclass(frozen=True)
class LayerRule:
    """How the Lipschitz constant of one kind of layer is estimated (for training) and bounded.

    Training uses the first that is set of ``operator`` (power iteration), ``estimate``,
    ``constant``, ``bound`` (a shape-dependent constant such as a pooling layer's); certification
    uses ``bound`` if set, else ``constant``:

    - ``operator(module, input_shape) -> (A, A_T)``: the layer is affine; ``A`` is its linear part
      (no bias) acting on a batch of inputs shaped ``(B, *input_shape)`` and ``A_T`` its adjoint.  Its
      norm is estimated by power iteration with a persistent vector.
    - ``estimate(module) -> Tensor``: a scalar, possibly differentiable in the parameters (e.g. 1
      for a layer that is 1-Lipschitz by construction, or a layer's own norm estimate).
    - ``constant(module) -> float``: a proven constant that holds for every input (activations,
      reshapes, fixed normalisation); it is its own sound bound.
    - ``bound(module, input_shape) -> float``: provably >= the layer's Lipschitz constant on inputs
      of ``input_shape`` (see :mod:`lipmargin.lipschitz.dense` and :mod:`lipmargin.lipschitz.conv`).  Required unless ``constant`` is set.
    - ``rounding(module, x, y) -> Tensor``: per-sample ``(B,)`` bound on the L2 norm of the
      rounding error the layer itself adds when ``y = module(x)`` is evaluated in ``x.dtype``
      (see :mod:`lipmargin.lipschitz.graph`); ``None`` means the layer has no proven rule and a documented
      generous model is used instead.
    """

    operator: Callable[[nn.Module, tuple[int, ...]], tuple[Operator, Operator]] | None = None
    estimate: Callable[[nn.Module], Tensor] | None = None
    constant: Callable[[nn.Module], float] | None = None
    bound: Callable[[nn.Module, tuple[int, ...]], float] | None = None
    rounding: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None


#: Registry of layer rules, filled by :func:`register_layer_rule`.  Look-ups use the EXACT type: a
#: subclass may override ``forward``, so it never inherits its parent's rule (it is traced through
#: its own ``forward`` by :mod:`lipmargin.lipschitz.graph`, or refused).
LAYER_RULES: dict[type, LayerRule] = {}

#: Rules for layers of other libraries, keyed by ``"module.QualName"`` of the exact class, so that
#: lipmargin can certify their models without importing them.
PEER_LAYER_RULES: dict[str, LayerRule] = {}


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer_rule(*types: type | str, override: bool = False, **rule_fields: Callable) -> LayerRule:
    """Register a :class:`LayerRule` built from ``rule_fields`` for each of ``types``.

    A type may also be given as the string ``"package.module.ClassName"`` (a peer library's layer,
    matched exactly without importing it).  Registering a type that already has a rule raises
    ``ValueError`` unless ``override=True``, so an import can never silently replace the rule of a
    built-in layer.

    >>> class Double(nn.Module):
    ...     def forward(self, x):
    ...         return 2 * x
    >>> rule = register_layer_rule(Double, constant=lambda m: 2.0)
    >>> layer_rule(Double()).constant(Double())
    2.0
    >>> register_layer_rule(Double, constant=lambda m: 1.0)
    Traceback (most recent call last):
    ...
    ValueError: a Lipschitz rule for lipmargin.lipschitz.rules.Double is already registered; pass override=True to replace it
    >>> del LAYER_RULES[Double]  # keep the registry as it was
    """
    if not types:
        raise ValueError("register_layer_rule needs at least one layer type")
    for t in types:
        key = t if isinstance(t, str) else _class_key(t)
        if not override and (t in LAYER_RULES or key in PEER_LAYER_RULES):
            raise ValueError(f"a Lipschitz rule for {key} is already registered; pass override=True to replace it")
    rule = LayerRule(**rule_fields)
    if rule.constant is None and rule.bound is None:
        raise ValueError("a layer rule needs a sound 'bound' unless it has a proven 'constant'")
    for t in types:
        if isinstance(t, str):
            PEER_LAYER_RULES[t] = rule
        else:
            LAYER_RULES[t] = rule
    return rule


def find_layer_rule(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``type(module)`` exactly, or ``None``.

    >>> find_layer_rule(nn.ReLU()).constant(nn.ReLU())
    1.0
    >>> find_layer_rule(nn.Bilinear(2, 2, 2)) is None
    True
    """
    cls = type(module)
    rule = LAYER_RULES.get(cls)
    return rule if rule is not None else PEER_LAYER_RULES.get(_class_key(cls))


def supported_layers() -> list[str]:
    """Sorted names of the layer types that have a rule (peer libraries' with their full key)."""
    return sorted({t.__name__ for t in LAYER_RULES} | {k.rsplit(".", 1)[-1] + f" ({k})" for k in PEER_LAYER_RULES})


def layer_rule(module: nn.Module) -> LayerRule:
    """The rule for ``module``'s exact type; ``TypeError`` naming the module if none is registered.

    >>> layer_rule(nn.Sigmoid()).constant(nn.Sigmoid())
    0.25
    """
    rule = find_layer_rule(module)
    if rule is not None:
        return rule
    supported = ", ".join(supported_layers())
    raise TypeError(
        f"no Lipschitz rule for module {type(module).__name__} ({module!r}); "
        f"supported layers: {supported}. Register one with lipmargin.register_layer_rule."
    )


def flatten_layers(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Unroll nested ``nn.Sequential`` containers into a flat list of layers.

    Only containers of the exact type ``nn.Sequential`` are unrolled: a subclass may override
    ``forward`` (a skip connection, say), so it stays one layer and needs its own rule.

    >>> flatten_layers([nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU())), nn.Tanh()])
    [Linear(in_features=2, out_features=2, bias=True), ReLU(), Tanh()]
    """
    flat: list[nn.Module] = []
    for m in modules:
        if type(m) is nn.Sequential:
            flat.extend(flatten_layers(m))
        else:
            flat.append(m)
    return flat

