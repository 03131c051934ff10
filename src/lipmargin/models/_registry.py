"""The model registry: :class:`ModelSpec`, :func:`register_model`, :func:`list_models`, :func:`create_model`.

A registry is an explicit dict filled by a decorator (as timm's ``_registry`` / ``_factory``); the
family modules of :mod:`lipmargin.models` register their architectures when the package is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lipmargin.models.lipnet import LipschitzNet

__all__ = ["ModelFactory", "ModelSpec", "MODELS", "register_model", "register_variant", "list_models", "create_model"]

#: ``factory(input_shape, num_classes, **options) -> LipschitzNet``.
ModelFactory = Callable[..., "LipschitzNet"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, factory and one-line description."""

    name: str
    factory: ModelFactory
    description: str


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, description: str = "") -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory(input_shape, num_classes, **options) -> LipschitzNet`` as ``name``.

    The description defaults to the first line of the factory's docstring.

    >>> from torch import nn
    >>> from lipmargin.models import LipschitzNet, MODELS
    >>> @register_model("doc-linear", "a linear classifier")
    ... def linear(input_shape, num_classes):
    ...     return LipschitzNet(nn.Sequential(nn.Flatten()), nn.Linear(input_shape[0], num_classes), input_shape)
    >>> create_model("doc-linear", (3,), 2).head
    Linear(in_features=3, out_features=2, bias=True)
    >>> _ = MODELS.pop("doc-linear")  # leave the registry as it was
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = ModelSpec(name, factory, description or (factory.__doc__ or "").strip().split("\n")[0])
        return factory

    return decorator


def register_variant(
    name: str,
    description: str,
    build: ModelFactory,
    defaults: Mapping[str, Any],
    fixed: Mapping[str, Any] | None = None,
) -> None:
    """Register one row of a family's size table: ``build(input_shape, num_classes, **fixed, **options)``.

    ``defaults`` are the options a user may set (and their values for this size); ``fixed`` are
    arguments the size pins (e.g. the depth of ``lipconvnet-10``).  An unknown option is a
    ``TypeError`` naming the options the model takes.

    >>> from lipmargin.models import MODELS, mlp
    >>> register_variant("doc-mlp-s", "a small MLP", mlp, defaults={"widths": (8,)})
    >>> create_model("doc-mlp-s", (2,), 2).features[0]
    Linear(in_features=2, out_features=8, bias=True)
    >>> create_model("doc-mlp-s", (2,), 2, depth=3)
    Traceback (most recent call last):
    ...
    TypeError: model 'doc-mlp-s' got unknown options ['depth']; it takes ['widths']
    >>> _ = MODELS.pop("doc-mlp-s")  # leave the registry as it was
    """
    pinned = dict(fixed or {})
    if set(pinned) & set(defaults):
        raise ValueError(f"model {name!r}: options {sorted(set(pinned) & set(defaults))} are both fixed and free")

    def factory(input_shape: Sequence[int], num_classes: int, **options: Any) -> LipschitzNet:
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise TypeError(f"model {name!r} got unknown options {unknown}; it takes {sorted(defaults)}")
        return build(input_shape, num_classes, **pinned, **{**defaults, **options})

    factory.__name__ = factory.__qualname__ = f"create_{name.replace('-', '_')}"
    factory.__doc__ = f"{description}\n\nOptions (defaults): {dict(defaults)}."
    register_model(name, description)(factory)


def list_models() -> list[str]:
    """The registered model names, sorted.

    >>> {"4C3F", "mlp", "lipconvnet-5"} <= set(list_models())
    True
    """
    return sorted(MODELS)


def create_model(name: str, input_shape: Sequence[int], num_classes: int, **options: object) -> LipschitzNet:
    """Build a registered model for inputs of ``input_shape`` (no batch dim) and ``num_classes``.

    >>> import torch
    >>> model = create_model("mlp", (1, 4, 4), 3, widths=(8,))
    >>> model(torch.rand(2, 1, 4, 4)).shape
    torch.Size([2, 3])
    >>> create_model("resnet", (3, 32, 32), 10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'resnet'; registered models: 2C2F, 4C3F, ...
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return MODELS[name].factory(tuple(input_shape), num_classes, **options)
