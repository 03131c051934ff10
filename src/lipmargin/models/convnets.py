"""The paper's plain conv nets (2C2F, 4C3F, 6C2F, 8C2F): convolutions and dense layers with MaxMin.

Every layer is an ordinary ``nn.Conv2d`` / ``nn.Linear`` (kaiming-normal weights, zero biases)
followed by MaxMin; the feature bound is the product of the layers' bounds (docs/method.md#d-layouts).
One size table, :data:`CONVNETS`, registers all four.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lipmargin.models._registry import register_variant
from lipmargin.models.lipnet import LipschitzNet, _image_shape, _init
from lipmargin.nn import MaxMin

__all__ = ["ConvNetLayout", "CONVNETS", "conv_net"]

#: One convolution: (output channels as a multiple of ``width``, kernel, stride, padding).
ConvSpec = tuple[int, int, int, int]


@dataclass(frozen=True)
class ConvNetLayout:
    """A row of the size table: the convolutions, how many dense layers, the default widths."""

    description: str
    convs: tuple[ConvSpec, ...]
    dense_layers: int
    width: int
    dense_width: int


#: The registered conv nets.  ``width`` scales every convolution, ``dense_width`` every dense layer.
CONVNETS: dict[str, ConvNetLayout] = {
    "2C2F": ConvNetLayout(
        "small conv net for 8x8 / 28x28 inputs: convs 32, 64s2 + fc 256, MaxMin",
        ((1, 3, 1, 1), (2, 3, 2, 1)), 1, 32, 256,
    ),
    "4C3F": ConvNetLayout(
        "CIFAR-10 4C3F: 4 convs (32,32s2,64,64s2) + fc 512, 512, MaxMin",
        ((1, 3, 1, 1), (1, 3, 2, 1), (2, 3, 1, 1), (2, 3, 2, 1)), 2, 32, 512,
    ),
    "6C2F": ConvNetLayout(
        "CIFAR-10 6C2F: 6 convs (32,32,32k4s2,64,64,64k4s2) + fc 512, MaxMin",
        ((1, 3, 1, 1), (1, 3, 1, 1), (1, 4, 2, 1), (2, 3, 1, 1), (2, 3, 1, 1), (2, 4, 2, 1)), 1, 32, 512,
    ),
    "8C2F": ConvNetLayout(
        "Tiny-ImageNet 8C2F: 8 convs (64..256, three k4s2) + fc 256, MaxMin",
        (
            (1, 3, 1, 1), (1, 3, 1, 1), (1, 4, 2, 0),
            (2, 3, 1, 1), (2, 3, 1, 1), (2, 4, 2, 0),
            (4, 3, 1, 1), (4, 4, 2, 0),
        ),
        1, 64, 256,
    ),
}


def conv_net(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    convs: Sequence[tuple[int, int, int, int]],
    dense: Sequence[int],
    name: str = "conv net",
) -> LipschitzNet:
    """Convolutions ``(out_channels, kernel, stride, padding)`` then dense layers, each with MaxMin.

    >>> net = conv_net((1, 8, 8), 3, convs=[(4, 3, 2, 1)], dense=[8])
    >>> [type(m).__name__ for m in net.features]
    ['Conv2d', 'MaxMin', 'Flatten', 'Linear', 'MaxMin']
    """
    c, h, w = _image_shape(input_shape, name)
    layers: list[nn.Module] = []
    for out, k, s, p in convs:
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if h < 1 or w < 1:
            raise ValueError(f"{name}: input {tuple(input_shape)} is too small for its convolutions (kernel {k}, stride {s})")
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
    return LipschitzNet(features, head, input_shape)


def _build(
    input_shape: Sequence[int], num_classes: int, *, layout: str, width: int, dense_width: int
) -> LipschitzNet:
    spec = CONVNETS[layout]
    w = int(width)
    convs = [(m * w, k, s, p) for m, k, s, p in spec.convs]
    return conv_net(input_shape, num_classes, convs=convs, dense=[int(dense_width)] * spec.dense_layers, name=layout)


for _name, _spec in CONVNETS.items():
    register_variant(
        _name, _spec.description, _build,
        defaults={"width": _spec.width, "dense_width": _spec.dense_width}, fixed={"layout": _name},
    )
