"""Lipschitz machinery: sound bounds, power-iteration estimates, the layer-rule registry, the fx graph.

Naming follows the project's rule: an ``*_estimate`` may be below the true value (a power
iteration converges to the operator norm from below); a ``*_bound`` is always >= the truth.

A network is traced into a graph of leaves (each with a rule in :data:`LAYER_RULES`) and tensor
operations; the per-leaf values compose over the graph (chain: product, sum: sum, ...).  For a
network ``f(x) = W phi(x) + b`` the pairwise head bound ``K * ||W_i - W_j||`` bounds the Lipschitz
constant of the logit difference ``f_i - f_j``.

Modules:

- :mod:`~lipmargin.lipschitz.power`: THE power-iteration step and the estimates built on it.
- :mod:`~lipmargin.lipschitz.rules`: :class:`LayerRule`, the registry and its look-ups.
- :mod:`~lipmargin.lipschitz.operators`: layer operators ``(A, A^T)``, :func:`operator_norm_bound`,
  pairwise head norms.
- :mod:`~lipmargin.lipschitz.dense`: dense-SVD bounds (``nn.Linear``, explicit matrices, tiny convs).
- :mod:`~lipmargin.lipschitz.conv` / :mod:`~lipmargin.lipschitz.conv_fft` /
  :mod:`~lipmargin.lipschitz.spec`: the sound conv2d bound (method choice, polyphase/FFT, geometry).
- :mod:`~lipmargin.lipschitz.rounding`: proven floating-point error bounds of a forward pass.
- :mod:`~lipmargin.lipschitz.torch_layers`: the rules of torch's built-in layers (registered on import).
- :mod:`~lipmargin.lipschitz.graph` / :mod:`~lipmargin.lipschitz.graph_ops` /
  :mod:`~lipmargin.lipschitz.graph_eval`: fx tracing, composition, forward with rounding error.
- :mod:`~lipmargin.lipschitz.estimate`: :class:`FeatureEstimate`, persistent power iteration over a graph.
"""

from __future__ import annotations

from lipmargin.lipschitz import torch_layers  # noqa: F401  (registers the rules of torch's layers)
from lipmargin.lipschitz.conv import conv2d_norm_bound
from lipmargin.lipschitz.dense import dense_conv_matrix, linear_norm_bound, spectral_norm_dense
from lipmargin.lipschitz.estimate import FeatureEstimate
from lipmargin.lipschitz.graph import ModelStructureError, trace_model
from lipmargin.lipschitz.operators import (
    conv2d_operator,
    float64_operator,
    linear_operator,
    operator_norm_bound,
    pairwise_head_norms,
    pairwise_head_norms_bound,
)
from lipmargin.lipschitz.power import converge_operator_norm, no_autocast, normalize, operator_norm_estimate, power_iteration, training_estimate
from lipmargin.lipschitz.rounding import ROUNDING_MARGIN
from lipmargin.lipschitz.rules import (
    LAYER_RULES,
    PEER_LAYER_RULES,
    LayerRule,
    find_layer_rule,
    flatten_layers,
    layer_rule,
    register_layer_rule,
    supported_layers,
)

__all__ = [
    "LAYER_RULES",
    "LayerRule",
    "register_layer_rule",
    "layer_rule",
    "find_layer_rule",
    "supported_layers",
    "PEER_LAYER_RULES",
    "flatten_layers",
    "linear_operator",
    "conv2d_operator",
    "float64_operator",
    "normalize",
    "power_iteration",
    "operator_norm_estimate",
    "training_estimate",
    "converge_operator_norm",
    "pairwise_head_norms",
    "pairwise_head_norms_bound",
    "operator_norm_bound",
    "linear_norm_bound",
    "conv2d_norm_bound",
    "spectral_norm_dense",
    "dense_conv_matrix",
    "FeatureEstimate",
    "trace_model",
    "ModelStructureError",
    "ROUNDING_MARGIN",
    "no_autocast",
]

_RENAMED = {"FeatureBound": "FeatureEstimate"}


def __getattr__(name: str) -> object:
    if name in _RENAMED:
        raise AttributeError(
            f"{name} was renamed {_RENAMED[name]} (it holds power-iteration estimates, not bounds): "
            f"use lipmargin.lipschitz.{_RENAMED[name]}"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
