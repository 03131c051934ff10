"""SOC LipConvNets (Singla & Feizi, ICML 2021; the CLL paper's SOC backbone), one per depth.

The feature bound ``K`` of these nets is 1 by construction (up to the computed, sound per-layer
bounds of the SOC series), and they end in a plain ``nn.Linear`` head, as in the CLL paper's
integrations (docs/method.md#d-layouts: "each with an unconstrained last linear layer").
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lipmargin.models._registry import register_variant
from lipmargin.models.lipnet import LipschitzNet, _image_shape, _with_head
from lipmargin.nn import HouseHolder, InvertibleDownsample, MaxMin, SOCConv2d, ZeroPadding

__all__ = ["LIPCONVNETS", "lipconvnet"]

#: name -> depth.  Options of each: ``width`` (the paper's ``init_channels``), ``activation``,
#: ``train_terms``, ``eval_terms``; the reference code's defaults.
LIPCONVNETS: dict[str, int] = {"lipconvnet-5": 5, "lipconvnet-10": 10, "lipconvnet-20": 20}
_OPTIONS = {"width": 32, "activation": "maxmin", "train_terms": 6, "eval_terms": 12}

#: The activations a LipConvNet can use: name -> ``factory(channels)``.
ACTIVATIONS = {"maxmin": lambda channels: MaxMin(), "householder": HouseHolder}


def _activation(name: str, channels: int) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose 'maxmin' or 'householder'")
    return ACTIVATIONS[name](channels)
def lipconvnet(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    depth: int,
    width: int = 32,
    activation: str = "maxmin",
    train_terms: int = 6,
    eval_terms: int = 12,
) -> LipschitzNet:
    """SOC LipConvNet-``depth`` (Singla & Feizi, ICML 2021; the CLL paper's SOC backbone).

    Five stages of ``depth / 5`` blocks (SOC conv + activation).  Within a stage the blocks keep
    the width; the last block of each stage halves the resolution by invertible downsampling
    (space-to-depth, x4 channels) followed by an SOC conv to twice the stage width (a 1x1 kernel in
    the fifth stage).  Stage widths: ``width`` (the paper's ``init_channels``, 32), then doubling.

    Deviations: inputs whose sides are not multiples of 32 are zero-padded (centred) to the next
    multiple (28x28 -> 32x32; an isometry); the activation defaults to MaxMin (the CLL runs used
    ``activation='householder'``, the paper's HH1); the head is a plain linear layer.

    >>> net = lipconvnet((1, 28, 28), 2, depth=5, width=1)  # 28x28 is zero-padded to 32x32
    >>> [type(m).__name__ for m in net.features][:4]
    ['ZeroPadding', 'InvertibleDownsample', 'SOCConv2d', 'MaxMin']
    """
    c, h, w = _image_shape(input_shape, f"lipconvnet-{depth}")
    if depth < 5 or depth % 5:
        raise ValueError(f"lipconvnet depth must be a positive multiple of 5, got {depth}")
    if width < 1:
        raise ValueError(f"lipconvnet width must be >= 1, got {width}")
    blocks = depth // 5
    layers: list[nn.Module] = []
    ph, pw = (-h) % 32, (-w) % 32
    if ph or pw:
        layers.append(ZeroPadding(pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = h + ph, w + pw
    soc = {"train_terms": train_terms, "eval_terms": eval_terms}
    planes = int(width)
    for stage in range(5):
        for _ in range(blocks - 1):
            layers += [SOCConv2d(c, planes, 3, **soc), _activation(activation, planes)]
            c = planes
        out = 2 * planes
        layers += [
            InvertibleDownsample(2),
            SOCConv2d(4 * c, out, 3 if stage < 4 else 1, **soc),
            _activation(activation, out),
        ]
        c, h, w = out, h // 2, w // 2
        planes = c
    layers.append(nn.Flatten())
    return _with_head(nn.Sequential(*layers), c * h * w, num_classes, input_shape)


for _name, _depth in LIPCONVNETS.items():
    register_variant(
        _name, f"SOC LipConvNet-{_depth}: 5 stages of {_depth // 5} SOC blocks, MaxMin", lipconvnet,
        defaults=_OPTIONS, fixed={"depth": _depth},
    )
