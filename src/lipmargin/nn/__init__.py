"""Layers with known Lipschitz constants: activations and the 1-Lipschitz layer families.

Every layer registers a :class:`~lipmargin.lipschitz.LayerRule` next to its class, with

- ``estimate``: a constant 1 (a scalar tensor on the layer's device and dtype) for the
  1-Lipschitz families (SOC up to its truncated series), so training needs no estimate;
- ``bound(module, input_shape)``: a number provably >= the Lipschitz constant of the layer's
  *actual* effective operator, computed in float64 from its parameters and buffers with the sound
  norm bounds of :mod:`lipmargin.lipschitz.dense` and :mod:`lipmargin.lipschitz.conv`; never assumed to be 1.

What a bound describes: the layer's **eval-mode** function with its current parameters and buffers
(certificates evaluate models in eval mode).  CPL and SOC scale their weights with a persistent power
iteration (the one of :mod:`lipmargin.lipschitz`), as in their papers; a training-mode forward first
advances it (changing the function slightly) and SOC then sums fewer series terms.  In eval mode
both cap that scale with a sound norm bound (cached per weight version), so that a lagging estimate
cannot make the certified function expansive; the cap is inactive while the estimate is good.
Each family module states its soundness argument (``J`` is the Jacobian; a continuous,
piecewise-smooth map is ``L``-Lipschitz when ``||J|| <= L`` wherever ``J`` exists, including
Clarke's generalised Jacobians with ReLU derivatives anywhere in ``[0, 1]``).

Modules:

- :mod:`~lipmargin.nn.activations`: MaxMin, GroupSort, Normalize (input normalisation as a layer)
- :mod:`~lipmargin.nn.aol`: AOLLinear, AOLConv2d (almost-orthogonal layers)
- :mod:`~lipmargin.nn.cpl`: CPLLinear, CPLConv2d (convex potential layers)
- :mod:`~lipmargin.nn.sll`: SLLLinear, SLLConv2d (SDP-based Lipschitz layers)
- :mod:`~lipmargin.nn.soc`: SOCConv2d (skew orthogonal convolution) and its series bounds
- :mod:`~lipmargin.nn.householder`: the HouseHolder activation
- :mod:`~lipmargin.nn.reshape`: InvertibleDownsample, ChannelPad, ZeroPadding
- :mod:`~lipmargin.nn.pooling`: ScaledAvgPool2d
- :mod:`~lipmargin.nn._common`: helpers shared by the families
"""

from lipmargin.nn.activations import GroupSort, MaxMin, Normalize, max_min_pairs
from lipmargin.nn.aol import AOLConv2d, AOLLinear, aol_conv_scale, aol_linear_scale
from lipmargin.nn.cpl import CPLConv2d, CPLLinear, cpl_step_size
from lipmargin.nn.householder import HouseHolder
from lipmargin.nn.pooling import ScaledAvgPool2d
from lipmargin.nn.reshape import ChannelPad, InvertibleDownsample, ZeroPadding
from lipmargin.nn.sll import SLLConv2d, SLLLinear, sll_conv_scale, sll_linear_scale
from lipmargin.nn.soc import SOCConv2d, conv_matrix, exp_series_tail_bound, skew_kernel, soc_bound_from_norm

__all__ = [
    "AOLConv2d",
    "AOLLinear",
    "CPLConv2d",
    "CPLLinear",
    "ChannelPad",
    "GroupSort",
    "HouseHolder",
    "InvertibleDownsample",
    "MaxMin",
    "Normalize",
    "SLLConv2d",
    "SLLLinear",
    "SOCConv2d",
    "ScaledAvgPool2d",
    "ZeroPadding",
    "aol_conv_scale",
    "aol_linear_scale",
    "conv_matrix",
    "cpl_step_size",
    "exp_series_tail_bound",
    "max_min_pairs",
    "skew_kernel",
    "sll_conv_scale",
    "sll_linear_scale",
    "soc_bound_from_norm",
]
