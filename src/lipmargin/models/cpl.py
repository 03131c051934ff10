"""CPL nets (Meunier et al., ICML 2022): convex potential layers with an unconstrained linear head."""

from __future__ import annotations

from collections.abc import Sequence

from lipmargin.models._registry import register_variant
from lipmargin.models._residual import RESIDUAL_OPTIONS, residual_net
from lipmargin.models.lipnet import LipschitzNet
from lipmargin.nn import CPLConv2d, CPLLinear

__all__ = ["CPL_NETS", "cpl_net"]

#: name -> (description, defaults of width, depth, conv_inner, dense_depth, dense_features).
#: cpl-s is CPU-sized (the paper's CPL-S is 45 channels, 20 conv, 7 dense of 2048 features);
#: cpl-xl is the CPL-XL of the CLL paper's CIFAR-100 runs.
CPL_NETS: dict[str, tuple[str, tuple[int, int, int, int, int]]] = {
    "cpl-s": ("CPU-sized CPL net: 16 ch, 10 conv CPLs, pool 4, 2 dense CPLs of 512", (16, 10, 5, 2, 512)),
    "cpl-xl": ("CPL-XL (CLL paper): 120 ch, 70 conv CPLs, pool 4, 15 dense CPLs of 4096", (120, 70, 5, 15, 4096)),
}


def cpl_net(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width: int,
    depth: int,
    conv_inner: int = 5,
    dense_depth: int,
    dense_features: int,
) -> LipschitzNet:
    """CPL network: zero channel padding to ``width``, ``depth`` conv CPLs (3x3, ``conv_inner`` inner
    channels, the reference code's default of 5), window-sum pooling 4x4 / 4 (norm 1),
    ``dense_depth`` dense CPLs of ``dense_features`` inner features, linear head.

    >>> net = cpl_net((1, 8, 8), 3, width=2, depth=1, dense_depth=1, dense_features=4)
    >>> [type(m).__name__ for m in net.features]
    ['ChannelPad', 'CPLConv2d', 'ScaledAvgPool2d', 'Flatten', 'CPLLinear']
    """
    return residual_net(
        "cpl", lambda c, i, hw: CPLConv2d(c, i, hw), CPLLinear, input_shape, num_classes,
        int(width), int(depth), int(conv_inner), int(dense_depth), int(dense_features),
    )


for _name, (_description, _sizes) in CPL_NETS.items():
    register_variant(_name, _description, cpl_net, defaults=dict(zip(RESIDUAL_OPTIONS, _sizes)))
