"""The linear operators of the built-in affine layers, their sound norm bound, and head norms.

``linear_operator`` / ``conv2d_operator`` return ``(A, A^T)`` for power iteration
(:mod:`lipmargin.lipschitz.power`); :func:`operator_norm_bound` is the sound per-layer value a
certificate uses; :func:`pairwise_head_norms` is the differentiable ``||W_i - W_j||`` of a linear
head and :func:`pairwise_head_norms_bound` its sound float64 counterpart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz.power import Operator
from lipmargin.lipschitz.rounding import ROUNDING_MARGIN, mul_pow2
from lipmargin.lipschitz.rules import LayerRule, layer_rule

__all__ = [
    "linear_operator",
    "conv2d_operator",
    "conv2d_layer_operator",
    "checked_conv2d",
    "float64_operator",
    "operator_norm_bound",
    "pairwise_head_norms",
    "pairwise_head_norms_bound",
]


def linear_operator(weight: Tensor) -> tuple[Operator, Operator]:
    """``x -> x W^T`` and its adjoint ``y -> y W`` for batches ``(B, in)`` / ``(B, out)``.

    >>> forward, adjoint = linear_operator(torch.tensor([[1.0, 2.0]]))
    >>> forward(torch.tensor([[1.0, 1.0]])), adjoint(torch.tensor([[1.0]]))
    (tensor([[3.]]), tensor([[1., 2.]]))
    """
    return (lambda x: x @ weight.t()), (lambda y: y @ weight)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def conv2d_operator(
    weight: Tensor,
    input_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> tuple[Operator, Operator]:
    """The zero-padded convolution acting on ``(B, *input_shape)`` and its exact adjoint.

    The adjoint is ``conv_transpose2d`` with the same stride, padding, dilation and groups, and the
    ``output_padding`` that makes its output exactly ``input_shape`` again.  Without it a stride-2
    layer whose ``H + 2p - k`` is odd would shrink the iterate by a pixel and the power iteration
    would estimate the norm on a smaller input.

    >>> forward, adjoint = conv2d_operator(torch.ones(1, 1, 3, 3), (1, 5, 5), stride=2)
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(1, 1, 5, 5, generator=g), torch.randn(1, 1, 2, 2, generator=g)
    >>> forward(x).shape, adjoint(y).shape
    (torch.Size([1, 1, 2, 2]), torch.Size([1, 1, 5, 5]))
    >>> torch.allclose((forward(x) * y).sum(), (x * adjoint(y)).sum())  # <A x, y> = <x, A^T y>
    True
    """
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    k = weight.shape[-2:]
    h, w = input_shape[-2:]
    out = [(n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate((h, w))]
    if out[0] < 1 or out[1] < 1:
        raise ValueError(
            f"convolution with kernel {tuple(k)}, stride {s}, padding {p}, dilation {d} "
            f"has an empty output on input of shape {tuple(input_shape)}"
        )
    # output_padding = what conv_transpose2d misses to reach the input size.
    op = tuple(
        n - ((o - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1) for i, (n, o) in enumerate(zip((h, w), out))
    )

    def forward(x: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, s, p, d, groups)

    def adjoint(y: Tensor) -> Tensor:
        return F.conv_transpose2d(y, weight, None, s, p, op, groups, d)

    return forward, adjoint


def checked_conv2d(m: nn.Conv2d) -> nn.Conv2d:
    """``m`` itself; ``TypeError`` unless its padding is zeros with explicit integer sizes."""
    if m.padding_mode != "zeros":
        raise TypeError(
            f"Lipschitz rule for Conv2d supports padding_mode='zeros' only, got {m.padding_mode!r}"
        )
    if isinstance(m.padding, str):
        raise TypeError(
            f"Lipschitz rule for Conv2d needs explicit integer padding, got padding={m.padding!r}"
        )
    return m


def conv2d_layer_operator(m: nn.Module, input_shape: Sequence[int]) -> tuple[Operator, Operator]:
    """:func:`conv2d_operator` of an ``nn.Conv2d`` layer (its real stride, padding, dilation, groups)."""
    c = checked_conv2d(m)  # type: ignore[arg-type]
    return conv2d_operator(c.weight, input_shape, c.stride, c.padding, c.dilation, c.groups)  # type: ignore[arg-type]


def operator_norm_bound(layer: nn.Module, input_shape: Sequence[int]) -> float:
    """A value provably >= the L2 Lipschitz constant of ``layer`` on inputs of ``input_shape``.

    ``input_shape`` excludes the batch dimension.  Raises ``TypeError`` for a layer without a
    registered rule.

    >>> operator_norm_bound(nn.Linear(2, 2), (2,)) >= 0.0
    True
    >>> layer = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.fill_(1.0)
    >>> bound = operator_norm_bound(layer, (1, 4, 4))
    >>> x = torch.ones(1, 1, 4, 4)  # ||layer(x)|| / ||x|| is a lower bound of the true norm
    >>> bound >= float(layer(x).detach().norm() / x.norm())
    True
    >>> operator_norm_bound(nn.Bilinear(2, 2, 2), (2,))
    Traceback (most recent call last):
    ...
    TypeError: no Lipschitz rule for module Bilinear ...
    """
    rule = layer_rule(layer)
    if rule.bound is not None:
        return float(rule.bound(layer, tuple(input_shape)))
    assert rule.constant is not None  # enforced by register_layer_rule
    return float(rule.constant(layer))


def pairwise_head_norms(weight: Tensor) -> Tensor:
    """``D[i, j] = ||W_i - W_j||_2`` for a head weight ``(C, d)``; differentiable, ``(C, C)``.

    Written as explicit differences (not ``cdist``'s Gram trick) so that ``D[i, i]`` is exactly 0
    and small distances keep their precision.  Where a distance is 0 (the diagonal, or two equal
    rows) its gradient is defined as 0 instead of sqrt's infinite slope.

    >>> pairwise_head_norms(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    tensor([[0., 5.],
            [5., 0.]])
    """
    diff = weight.unsqueeze(1) - weight.unsqueeze(0)  # (C, C, d)
    sq = diff.pow(2).sum(-1)  # (C, C)
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def pairwise_head_norms_bound(weight: Tensor) -> Tensor:
    """``(C, C)`` float64 values >= the exact ``||W_i - W_j||``, for any finite weights.

    The weight is first scaled by an exact power of two so that its largest entry lies in
    ``[1/2, 1)`` (subnormal weights become normal; nothing overflows).  The float64 differences,
    squares, sum and root then carry a relative error far below :data:`ROUNDING_MARGIN`; squares
    that underflow are covered by an absolute ``2**-500 sqrt(d)`` on every pair of rows that differ.
    The result is scaled back exactly (or rounded up once if subnormal).  Equal rows give exactly 0.

    >>> d = pairwise_head_norms_bound(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    >>> bool(d[0, 1] >= 5.0), float(d[0, 0]), round(float(d[0, 1]), 6)
    (True, 0.0, 5.0)
    """
    w = weight.detach().to(torch.float64)
    top = w.abs().max() if w.numel() else torch.zeros((), dtype=torch.float64)
    if not torch.isfinite(top):
        return torch.full((w.shape[0], w.shape[0]), math.inf, dtype=torch.float64).fill_diagonal_(0.0)
    if top == 0:
        return torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64)
    _, e = torch.frexp(top)  # top = f 2**e, f in [1/2, 1)
    scaled = mul_pow2(w, -e)  # exact
    differ = (w.unsqueeze(1) != w.unsqueeze(0)).any(-1)  # (C, C)
    d = pairwise_head_norms(scaled) * (1.0 + ROUNDING_MARGIN) + differ * (2.0**-500 * math.sqrt(w.shape[1]))
    d = mul_pow2(torch.nextafter(d, torch.full_like(d, math.inf)), e)
    return torch.where(differ, torch.nextafter(d, torch.full_like(d, math.inf)), torch.zeros_like(d))


def float64_operator(rule: LayerRule, m: nn.Module, input_shape: Sequence[int]) -> tuple[Operator, Operator]:
    """The layer's operator with its parameters promoted to float64 (the module is not changed).

    Exact types only, like the rule look-up: a subclass of ``nn.Linear`` with its own rule keeps
    its own operator.
    """
    assert rule.operator is not None
    if type(m) is nn.Linear:
        return linear_operator(m.weight.detach().double())
    if type(m) is nn.Conv2d:
        c = checked_conv2d(m)
        return conv2d_operator(c.weight.detach().double(), input_shape, c.stride, c.padding, c.dilation, c.groups)  # type: ignore[arg-type]
    fwd, adj = rule.operator(m, tuple(input_shape))
    dtype = next(m.parameters()).dtype

    def f64(op: Operator) -> Operator:
        return lambda x: op(x.to(dtype)).double()

    return f64(fwd), f64(adj)
