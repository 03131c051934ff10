"""Model registry and the paper's architectures (METHOD.md section 6).

Every registered model is a :class:`LipschitzNet`: a feature extractor ``phi`` made of layers with
Lipschitz rules, and a plain linear head ``W``.  Inputs are in [0, 1] without normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipmargin.nn.activations import MaxMin
from lipmargin.lipschitz import FeatureEstimate, pairwise_head_norms

__all__ = [
    "LipschitzNet",
    "MODELS",
    "ModelSpec",
    "register_model",
    "create_model",
    "list_models",
]


class LipschitzNet(nn.Module):
    """``f(x) = head(features(x))`` with persistent power-iteration state for ``features``.

    Attributes:
        features: the feature extractor (``nn.Sequential``); every layer needs a Lipschitz rule.
        head: the final ``nn.Linear`` (C x d); its rows give the pairwise bounds.
        bound: :class:`~lipmargin.lipschitz.FeatureEstimate` holding the power-iteration buffers.
        in_shape: input shape without the batch dimension.
    """

    def __init__(self, features: nn.Sequential, head: nn.Linear, in_shape: Sequence[int]) -> None:
        super().__init__()
        if type(head) is not nn.Linear:
            # exact type: a subclass may override forward (e.g. scale its output)
            raise TypeError(f"the head of a LipschitzNet must be exactly nn.Linear, got {type(head).__name__}")
        self.features = features
        self.head = head
        self.in_shape = tuple(int(s) for s in in_shape)
        self.bound = FeatureEstimate(features, self.in_shape)
        probe = features(torch.zeros(1, *self.in_shape, dtype=head.weight.dtype))
        if probe.dim() != 2 or probe.shape[1] != head.in_features:
            raise ValueError(
                f"features produce shape {tuple(probe.shape[1:])} but the head expects ({head.in_features},)"
            )

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def feature_lipschitz(self, n_iter: int = 0) -> tuple[Tensor, Tensor]:
        """``(K, per-layer sigmas)``: the power-iteration estimate of the feature bound.

        Advances the persistent vectors by ``n_iter`` steps when in training mode; ``K`` carries
        gradients to the weights.
        """
        return self.bound(n_iter)

    def pairwise_lipschitz(self, feature_lipschitz: Tensor) -> Tensor:
        """``(C, C)`` matrix ``K * ||W_i - W_j||`` (differentiable in both factors)."""
        return feature_lipschitz * pairwise_head_norms(self.head.weight)


ModelFactory = Callable[..., LipschitzNet]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: ModelFactory
    description: str


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, description: str = "") -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory(in_shape, num_classes, **options) -> LipschitzNet``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = ModelSpec(name, factory, description or (factory.__doc__ or "").strip().split("\n")[0])
        return factory

    return decorator


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, in_shape: Sequence[int], num_classes: int, **options: object) -> LipschitzNet:
    """Build a registered model for inputs of ``in_shape`` (no batch dim) and ``num_classes``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return MODELS[name].factory(tuple(in_shape), num_classes, **options)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _init(module: nn.Module) -> None:
    """Kaiming-normal weights and zero biases (METHOD.md section 6)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


ConvSpec = tuple[int, int, int, int]  # (out_channels, kernel, stride, padding)


def _conv_net(
    in_shape: tuple[int, ...], num_classes: int, convs: Sequence[ConvSpec], dense: Sequence[int], name: str
) -> LipschitzNet:
    if len(in_shape) != 3:
        raise ValueError(f"{name} expects image inputs (C, H, W); got in_shape {in_shape}")
    layers: list[nn.Module] = []
    c, h, w = in_shape
    for out, k, s, p in convs:
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if h < 1 or w < 1:
            raise ValueError(f"{name}: input {in_shape} is too small for its convolutions (kernel {k}, stride {s})")
        layers += [nn.Conv2d(c, out, k, s, p), MaxMin()]
        c = out
    layers.append(nn.Flatten())
    width = c * h * w
    for out in dense:
        layers += [nn.Linear(width, out), MaxMin()]
        width = out
    features = nn.Sequential(*layers)
    head = nn.Linear(width, num_classes)
    _init(features)
    _init(head)
    return LipschitzNet(features, head, in_shape)


@register_model("4C3F", "CIFAR-10 4C3F: 4 convs (32,32s2,64,64s2) + fc 512, 512, MaxMin")
def _c4f3(in_shape: tuple[int, ...], num_classes: int, width: int = 32, dense_width: int = 512) -> LipschitzNet:
    w = int(width)
    convs = [(w, 3, 1, 1), (w, 3, 2, 1), (2 * w, 3, 1, 1), (2 * w, 3, 2, 1)]
    return _conv_net(in_shape, num_classes, convs, [dense_width, dense_width], "4C3F")


@register_model("6C2F", "CIFAR-10 6C2F: 6 convs (32,32,32k4s2,64,64,64k4s2) + fc 512, MaxMin")
def _c6f2(in_shape: tuple[int, ...], num_classes: int, width: int = 32, dense_width: int = 512) -> LipschitzNet:
    w = int(width)
    convs = [(w, 3, 1, 1), (w, 3, 1, 1), (w, 4, 2, 1), (2 * w, 3, 1, 1), (2 * w, 3, 1, 1), (2 * w, 4, 2, 1)]
    return _conv_net(in_shape, num_classes, convs, [dense_width], "6C2F")


@register_model("8C2F", "Tiny-ImageNet 8C2F: 8 convs (64..256, three k4s2) + fc 256, MaxMin")
def _c8f2(in_shape: tuple[int, ...], num_classes: int, width: int = 64, dense_width: int = 256) -> LipschitzNet:
    w = int(width)
    convs = [
        (w, 3, 1, 1), (w, 3, 1, 1), (w, 4, 2, 0),
        (2 * w, 3, 1, 1), (2 * w, 3, 1, 1), (2 * w, 4, 2, 0),
        (4 * w, 3, 1, 1), (4 * w, 4, 2, 0),
    ]
    return _conv_net(in_shape, num_classes, convs, [dense_width], "8C2F")


def _mlp(in_shape: tuple[int, ...], num_classes: int, widths: Sequence[int]) -> LipschitzNet:
    d = 1
    for s in in_shape:
        d *= int(s)
    layers: list[nn.Module] = [nn.Flatten()] if len(in_shape) > 1 else []
    for out in widths:
        if int(out) % 2:
            raise ValueError(f"MLP widths must be even for MaxMin; got {list(widths)}")
        layers += [nn.Linear(d, int(out)), MaxMin()]
        d = int(out)
    features = nn.Sequential(*layers)
    head = nn.Linear(d, num_classes)
    _init(features)
    _init(head)
    return LipschitzNet(features, head, in_shape)


@register_model("moons-mlp", "two-moons MLP 2-10-20-40-40-20-10-2 with MaxMin")
def _moons_mlp(in_shape: tuple[int, ...], num_classes: int) -> LipschitzNet:
    return _mlp(in_shape, num_classes, (10, 20, 40, 40, 20, 10))


@register_model("mlp", "MLP with MaxMin; option widths (default 256, 256)")
def _generic_mlp(in_shape: tuple[int, ...], num_classes: int, widths: Sequence[int] = (256, 256)) -> LipschitzNet:
    return _mlp(in_shape, num_classes, widths)


@register_model("2C2F", "small conv net for 8x8 / 28x28 inputs: convs 32, 64s2 + fc 256, MaxMin")
def _c2f2(in_shape: tuple[int, ...], num_classes: int, width: int = 32, dense_width: int = 256) -> LipschitzNet:
    w = int(width)
    return _conv_net(in_shape, num_classes, [(w, 3, 1, 1), (2 * w, 3, 2, 1)], [dense_width], "2C2F")


from lipmargin.models import backbones as _backbones  # noqa: E402,F401  (registers the 1-Lipschitz backbones)
