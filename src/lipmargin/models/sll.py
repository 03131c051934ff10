"""SLL nets (Araujo et al., ICLR 2023): the CPL layout with SDP-based Lipschitz layers."""

from __future__ import annotations

from collections.abc import Sequence

from lipmargin.models._registry import register_variant
from lipmargin.models._residual import RESIDUAL_OPTIONS, residual_net
from lipmargin.models.lipnet import LipschitzNet
from lipmargin.nn import SLLConv2d, SLLLinear

__all__ = ["SLL_NETS", "sll_net"]

#: name -> (description, defaults of width, depth, conv_inner, dense_depth, dense_features).
#: sll-s is CPU-sized (the paper's SLL small is 45 channels, 20 conv, 7 dense of 2048 features);
#: sll-xl is the xlarge of the reference code.
SLL_NETS: dict[str, tuple[str, tuple[int, int, int, int, int]]] = {
    "sll-s": ("CPU-sized SLL net: 16 ch, 10 conv SLLs, pool 4, 2 dense SLLs of 512", (16, 10, 5, 2, 512)),
    "sll-xl": ("SLL-XL: 120 ch, 70 conv SLLs, pool 4, 15 dense SLLs of 2048", (120, 70, 5, 15, 2048)),
}


def sll_net(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width: int,
    depth: int,
    conv_inner: int = 5,
    dense_depth: int,
    dense_features: int,
) -> LipschitzNet:
    """SLL network: the CPL layout with SLL layers (reference code: zero channel padding, conv SLLs
    with 5 inner channels, pooling 4x4 / 4, dense SLLs).

    >>> net = sll_net((1, 8, 8), 3, width=2, depth=1, dense_depth=1, dense_features=4)
    >>> [type(m).__name__ for m in net.features]
    ['ChannelPad', 'SLLConv2d', 'ScaledAvgPool2d', 'Flatten', 'SLLLinear']
    """
    return residual_net(
        "sll", lambda c, i, hw: SLLConv2d(c, i), SLLLinear, input_shape, num_classes,
        int(width), int(depth), int(conv_inner), int(dense_depth), int(dense_features),
    )


for _name, (_description, _sizes) in SLL_NETS.items():
    register_variant(_name, _description, sll_net, defaults=dict(zip(RESIDUAL_OPTIONS, _sizes)))
