"""1-Lipschitz backbones (SOC LipConvNet, CPL, SLL, AOL) with an unconstrained linear head.

Each factory returns a :class:`~lipmargin.models.LipschitzNet` whose feature extractor is built
from the layers of :mod:`lipmargin.nn.onelip` and ends in a plain ``nn.Linear`` head, as in the CLL
paper's integrations (METHOD.md section 6: "each with an unconstrained last linear layer").  The
feature bound ``K`` of these nets is 1 by construction (up to the computed, sound per-layer bounds),
so the CLL / GloRo losses see ``K * ||W_i - W_j||`` with ``K ~ 1``.

Sizes.  The ``-xl`` / ``lipconvnet-N`` models follow the reference code (``width`` and the depths
are keyword options); the ``-s`` models are CPU-sized versions for 28x28 / 32x32 inputs: one epoch
of Fashion-MNIST (60 000 images, batch 128) takes minutes on two cores.  Deviations are listed in
each factory's docstring.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lipmargin.nn.activations import MaxMin
from lipmargin.models import LipschitzNet, _init, register_model
from lipmargin.nn.onelip import (
    AOLConv2d,
    AOLLinear,
    ChannelPad,
    CPLConv2d,
    CPLLinear,
    HouseHolder,
    InvertibleDownsample,
    ScaledAvgPool2d,
    SLLConv2d,
    SLLLinear,
    SOCConv2d,
    ZeroPadding,
)

__all__ = ["BACKBONES", "lipconvnet", "cpl_net", "sll_net", "aol_net"]

#: The names this module registers (the 1-Lipschitz backbones).
BACKBONES: tuple[str, ...] = (
    "lipconvnet-5",
    "lipconvnet-10",
    "lipconvnet-20",
    "cpl-s",
    "cpl-xl",
    "sll-s",
    "sll-xl",
    "aol-s",
)


def _image_shape(in_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ValueError(f"{name} expects image inputs (C, H, W); got in_shape {tuple(in_shape)}")
    c, h, w = (int(s) for s in in_shape)
    return c, h, w


def _head(features: nn.Sequential, width: int, num_classes: int, in_shape: tuple[int, ...]) -> LipschitzNet:
    head = nn.Linear(width, num_classes)
    _init(head)  # kaiming-normal weights, zero bias, like the paper's unconstrained nets
    return LipschitzNet(features, head, in_shape)


def _activation(name: str, channels: int) -> nn.Module:
    if name == "maxmin":
        return MaxMin()
    if name == "householder":
        return HouseHolder(channels)
    raise ValueError(f"unknown activation {name!r}; choose 'maxmin' or 'householder'")


# --------------------------------------------------------------------------------------------
# SOC LipConvNet
# --------------------------------------------------------------------------------------------


def lipconvnet(
    in_shape: tuple[int, ...],
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
    """
    c, h, w = _image_shape(in_shape, f"lipconvnet-{depth}")
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
    return _head(nn.Sequential(*layers), c * h * w, num_classes, in_shape)


def _register_lipconvnet(depth: int) -> None:
    @register_model(f"lipconvnet-{depth}", f"SOC LipConvNet-{depth}: 5 stages of {depth // 5} SOC blocks, MaxMin")
    def factory(in_shape: tuple[int, ...], num_classes: int, width: int = 32, **options: object) -> LipschitzNet:
        return lipconvnet(in_shape, num_classes, depth=depth, width=width, **options)  # type: ignore[arg-type]


for _depth in (5, 10, 20):
    _register_lipconvnet(_depth)


# --------------------------------------------------------------------------------------------
# CPL and SLL networks (same layout)
# --------------------------------------------------------------------------------------------


def _residual_net(
    name: str,
    conv: Callable[[int, int, tuple[int, int]], nn.Module],
    dense: Callable[[int, int], nn.Module],
    in_shape: tuple[int, ...],
    num_classes: int,
    width: int,
    depth: int,
    conv_inner: int,
    dense_depth: int,
    dense_features: int,
) -> LipschitzNet:
    c, h, w = _image_shape(in_shape, name)
    if width < c:
        raise ValueError(f"{name}: width {width} is below the {c} input channels")
    if h < 4 or w < 4:
        raise ValueError(f"{name}: input {tuple(in_shape)} is too small for the 4x4 pooling")
    if min(depth, dense_depth) < 0 or min(conv_inner, dense_features) < 1:
        raise ValueError(f"{name}: depths must be >= 0 and inner widths >= 1")
    layers: list[nn.Module] = [ChannelPad(width)] if width > c else []
    layers += [conv(width, conv_inner, (h, w)) for _ in range(depth)]
    layers += [ScaledAvgPool2d(4), nn.Flatten()]
    d = width * (h // 4) * (w // 4)
    layers += [dense(d, dense_features) for _ in range(dense_depth)]
    return _head(nn.Sequential(*layers), d, num_classes, in_shape)


def cpl_net(
    in_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int,
    depth: int,
    conv_inner: int = 5,
    dense_depth: int,
    dense_features: int,
) -> LipschitzNet:
    """CPL network (Meunier et al., ICML 2022): zero channel padding to ``width``, ``depth`` conv
    CPLs (3x3, ``conv_inner`` inner channels, the reference code's default of 5), window-sum pooling
    4x4 / 4 (norm 1), ``dense_depth`` dense CPLs of ``dense_features`` inner features, linear head.
    """
    return _residual_net(
        "cpl", lambda c, i, hw: CPLConv2d(c, i, hw), CPLLinear, in_shape, num_classes,
        int(width), int(depth), int(conv_inner), int(dense_depth), int(dense_features),
    )


def sll_net(
    in_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int,
    depth: int,
    conv_inner: int = 5,
    dense_depth: int,
    dense_features: int,
) -> LipschitzNet:
    """SLL network (Araujo et al., ICLR 2023): the CPL layout with SLL layers (reference code:
    zero channel padding, conv SLLs with 5 inner channels, pooling 4x4 / 4, dense SLLs)."""
    return _residual_net(
        "sll", lambda c, i, hw: SLLConv2d(c, i), SLLLinear, in_shape, num_classes,
        int(width), int(depth), int(conv_inner), int(dense_depth), int(dense_features),
    )


@register_model("cpl-s", "CPU-sized CPL net: 16 ch, 10 conv CPLs, pool 4, 2 dense CPLs of 512")
def _cpl_s(
    in_shape: tuple[int, ...], num_classes: int, width: int = 16, depth: int = 10, conv_inner: int = 5,
    dense_depth: int = 2, dense_features: int = 512,
) -> LipschitzNet:
    """CPL-S for CPU.  The paper's CPL-S is 45 channels, 20 conv, 7 dense of 2048 features."""
    return cpl_net(in_shape, num_classes, width=width, depth=depth, conv_inner=conv_inner,
                   dense_depth=dense_depth, dense_features=dense_features)


@register_model("cpl-xl", "CPL-XL (CLL paper): 120 ch, 70 conv CPLs, pool 4, 15 dense CPLs of 4096")
def _cpl_xl(
    in_shape: tuple[int, ...], num_classes: int, width: int = 120, depth: int = 70, conv_inner: int = 5,
    dense_depth: int = 15, dense_features: int = 4096,
) -> LipschitzNet:
    """CPL-XL as trained in the CLL paper's CIFAR-100 runs (depth 70, 120 channels, 15 x 4096)."""
    return cpl_net(in_shape, num_classes, width=width, depth=depth, conv_inner=conv_inner,
                   dense_depth=dense_depth, dense_features=dense_features)


@register_model("sll-s", "CPU-sized SLL net: 16 ch, 10 conv SLLs, pool 4, 2 dense SLLs of 512")
def _sll_s(
    in_shape: tuple[int, ...], num_classes: int, width: int = 16, depth: int = 10, conv_inner: int = 5,
    dense_depth: int = 2, dense_features: int = 512,
) -> LipschitzNet:
    """SLL-S for CPU.  The paper's SLL small is 45 channels, 20 conv, 7 dense of 2048 features."""
    return sll_net(in_shape, num_classes, width=width, depth=depth, conv_inner=conv_inner,
                   dense_depth=dense_depth, dense_features=dense_features)


@register_model("sll-xl", "SLL-XL: 120 ch, 70 conv SLLs, pool 4, 15 dense SLLs of 2048")
def _sll_xl(
    in_shape: tuple[int, ...], num_classes: int, width: int = 120, depth: int = 70, conv_inner: int = 5,
    dense_depth: int = 15, dense_features: int = 2048,
) -> LipschitzNet:
    """SLL xlarge of the reference code (70 conv, 120 channels, 15 dense of 2048)."""
    return sll_net(in_shape, num_classes, width=width, depth=depth, conv_inner=conv_inner,
                   dense_depth=dense_depth, dense_features=dense_features)


# --------------------------------------------------------------------------------------------
# AOL network
# --------------------------------------------------------------------------------------------


def aol_net(
    in_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = 16,
    depth: int = 5,
    stages: int = 2,
    reduce_channels: int = 16,
    dense_features: int = 256,
) -> LipschitzNet:
    """AOL convolutional net (Prach & Lampert, ECCV 2022), MaxMin activations.

    Each stage: space-to-depth (x4 channels), a 1x1 AOL conv to the stage width and ``depth - 1``
    3x3 AOL convs; widths ``width``, ``4 width``, ...  Then a 1x1 AOL conv to ``reduce_channels``,
    flatten, one dense AOL layer of ``dense_features`` and the linear head.

    Deviations from the paper's AOL-S (base width 16, five stages down to 1x1, then 1x1 AOL convs
    and a truncation to the class scores): ``stages`` stages only (2 by default: 28x28 -> 7x7),
    the channel reduction + dense AOL layer in place of the 1x1 tail, and a plain linear head.
    """
    c, h, w = _image_shape(in_shape, "aol")
    if stages < 1 or depth < 1:
        raise ValueError(f"aol: stages and depth must be >= 1, got {stages}, {depth}")
    if h % 2**stages or w % 2**stages:
        raise ValueError(f"aol: input sides {h}x{w} must be divisible by 2**stages = {2**stages}")
    for name, v in (("width", width), ("reduce_channels", reduce_channels), ("dense_features", dense_features)):
        if v < 2 or v % 2:
            raise ValueError(f"aol: {name} must be even (MaxMin) and >= 2, got {v}")
    layers: list[nn.Module] = []
    planes = int(width)
    for _ in range(stages):
        layers += [InvertibleDownsample(2), AOLConv2d(4 * c, planes, 1), MaxMin()]
        for _ in range(depth - 1):
            layers += [AOLConv2d(planes, planes, 3), MaxMin()]
        c, h, w = planes, h // 2, w // 2
        planes *= 4
    layers += [AOLConv2d(c, reduce_channels, 1), MaxMin(), nn.Flatten()]
    d = reduce_channels * h * w
    layers += [AOLLinear(d, dense_features), MaxMin()]
    return _head(nn.Sequential(*layers), dense_features, num_classes, in_shape)


@register_model("aol-s", "CPU-sized AOL net: 2 stages (16, 64 ch) of 5 AOL convs, dense AOL 256, MaxMin")
def _aol_s(
    in_shape: tuple[int, ...], num_classes: int, width: int = 16, depth: int = 5, stages: int = 2,
    reduce_channels: int = 16, dense_features: int = 256,
) -> LipschitzNet:
    """AOL-S for CPU (see :func:`aol_net` for the deviations from the paper)."""
    return aol_net(in_shape, num_classes, width=width, depth=depth, stages=stages,
                   reduce_channels=reduce_channels, dense_features=dense_features)
