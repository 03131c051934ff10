"""SLL: SDP-based Lipschitz layers (Araujo et al., ICLR 2023).

Soundness: ``x -> x - 2 W^T T^{-1} relu(W x + b)`` has ``J = I - 2 W^T (T^{-1} D) W``, symmetric
with eigenvalues in ``[1 - 2 ||T^{-1/2} W||^2, 1]``, so ``||J|| <= max(1, 2 n^2 - 1)`` for any
``n >= ||T^{-1/2} W||`` (the SLL theorem gives ``||T^{-1/2} W|| <= 1``; the bound computes ``n``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz import no_autocast, register_layer_rule
from lipmargin.lipschitz import conv2d_norm_bound, linear_norm_bound
from lipmargin.nn._common import (
    _check_odd,
    _check_positive,
    _conv_gram,
    _max_one,
    _safe_reciprocal,
    _unit_estimate,
    f64,
)

__all__ = ["sll_linear_scale", "sll_conv_scale", "SLLLinear", "SLLConv2d"]


def _sll_t(gram_abs: Tensor, q: Tensor) -> Tensor:
    """``t_a = sum_b |G|_ab q_b / q_a`` with ``q = exp(q_param)``; ``gram_abs`` is ``(m, m)``.

    For a convolution ``|G|_ab`` is already summed over all shifts.  ``T - G`` is positive
    semi-definite: ``|x_a x_b| <= (x_a^2 q_b/q_a + x_b^2 q_a/q_b) / 2`` summed against ``|G|``.
    """
    w = torch.exp(q)  # (m,) positive weights
    return (gram_abs * w[None, :]).sum(1) / w


def sll_linear_scale(weight: Tensor, q: Tensor) -> Tensor:
    """SLL ``T^{-1}`` (diagonal, ``(inner,)``) for a ``(inner, features)`` weight and log-weights ``q``.

    ``T = diag(sum_b |W W^T|_ab q_b / q_a)`` dominates ``W W^T`` (Araujo et al. 2023, Theorem 3),
    so ``x - 2 W^T T^{-1} relu(W x + b)`` is 1-Lipschitz.  Rows with ``T_aa = 0`` are zero rows of
    ``W`` and get 0.
    """
    gram = weight @ weight.t()  # (inner, inner)
    return _safe_reciprocal(_sll_t(gram.abs(), q))


def sll_conv_scale(kernel: Tensor, q: Tensor) -> Tensor:
    """SLL ``T^{-1}`` over the inner channels of a conv kernel ``(inner, C, k, k)``; ``(inner,)``.

    The Gram over all shifts dominates the Gram of the zero-padded transposed convolution (which
    is the full one followed by a restriction), so the theorem carries over.
    """
    gram = _conv_gram(kernel).abs().sum((2, 3))  # (inner, inner)
    return _safe_reciprocal(_sll_t(gram, q))


class SLLLinear(nn.Module):
    """SDP-based Lipschitz Layer, dense (Araujo et al., ICLR 2023): ``x - 2 W^T T^{-1} relu(W x + b)``.

    ``W`` is ``(inner_features, features)``; ``T`` from :func:`sll_linear_scale` with learnable
    log-weights ``q`` (initialised to 0, i.e. the AOL-like choice ``q = 1``).

    >>> import torch
    >>> from lipmargin.lipschitz import operator_norm_bound
    >>> layer = SLLLinear(4, 6).eval()
    >>> layer(torch.randn(2, 4)).shape
    torch.Size([2, 4])
    >>> operator_norm_bound(layer, (4,)) <= 1 + 1e-6
    True
    """

    def __init__(self, features: int, inner_features: int, bias: bool = True) -> None:
        super().__init__()
        self.features = _check_positive(features, "features", "SLLLinear")
        self.inner_features = _check_positive(inner_features, "inner_features", "SLLLinear")
        self.weight = nn.Parameter(torch.empty(self.inner_features, self.features))
        self.bias = nn.Parameter(torch.empty(self.inner_features)) if bias else None
        self.q = nn.Parameter(torch.zeros(self.inner_features))
        nn.init.xavier_normal_(self.weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.features)
            nn.init.uniform_(self.bias, -bound, bound)

    def inverse_t(self, dtype: torch.dtype | None = None) -> Tensor:
        """The diagonal of ``T^{-1}`` the forward pass uses, ``(inner_features,)``."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        q = self.q if dtype is None else self.q.to(dtype)
        return sll_linear_scale(w, q)

    def forward(self, x: Tensor) -> Tensor:
        with no_autocast(self.weight):
            inv_t = self.inverse_t()
        z = F.relu(F.linear(x, self.weight, self.bias)) * inv_t
        return x - 2.0 * (z @ self.weight)

    def extra_repr(self) -> str:
        return f"features={self.features}, inner_features={self.inner_features}"


class SLLConv2d(nn.Module):
    """SDP-based Lipschitz Layer, convolutional (Araujo et al., ICLR 2023).

    ``x - 2 C^T T^{-1} relu(C x + b)`` with ``C`` the stride-1 'same' convolution ``channels ->
    inner_channels`` and ``T`` from :func:`sll_conv_scale`.
    """

    def __init__(self, channels: int, inner_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.channels = _check_positive(channels, "channels", "SLLConv2d")
        self.inner_channels = _check_positive(inner_channels, "inner_channels", "SLLConv2d")
        self.kernel_size = _check_odd(kernel_size, "SLLConv2d")
        self.padding = self.kernel_size // 2
        k = self.kernel_size
        self.weight = nn.Parameter(torch.empty(self.inner_channels, self.channels, k, k))
        self.bias = nn.Parameter(torch.empty(self.inner_channels)) if bias else None
        self.q = nn.Parameter(torch.zeros(self.inner_channels))
        nn.init.xavier_normal_(self.weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.channels * k * k)
            nn.init.uniform_(self.bias, -bound, bound)

    def inverse_t(self, dtype: torch.dtype | None = None) -> Tensor:
        """The diagonal of ``T^{-1}`` over the inner channels, ``(inner_channels,)``."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        q = self.q if dtype is None else self.q.to(dtype)
        return sll_conv_scale(w, q)

    def forward(self, x: Tensor) -> Tensor:
        with no_autocast(self.weight):
            inv_t = self.inverse_t()
        z = F.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding))
        z = z * inv_t.view(1, -1, 1, 1)
        return x - 2.0 * F.conv_transpose2d(z, self.weight, padding=self.padding)

    def extra_repr(self) -> str:
        return f"{self.channels}, inner_channels={self.inner_channels}, kernel_size={self.kernel_size}"


def _sll_linear_bound(m: nn.Module, input_shape: tuple[int, ...]) -> float:
    w = m.weight.detach().to(f64)  # type: ignore[union-attr]
    scaled = w * m.inverse_t(f64).detach().sqrt()[:, None]  # type: ignore[operator]  # T^{-1/2} W
    n = linear_norm_bound(scaled)
    return _max_one(2.0 * n * n - 1.0)


def _sll_conv_bound(m: nn.Module, input_shape: tuple[int, ...]) -> float:
    w = m.weight.detach().to(f64)  # type: ignore[union-attr]
    scaled = w * m.inverse_t(f64).detach().sqrt().view(-1, 1, 1, 1)  # type: ignore[operator]
    # The circular (FFT) bound suffices: the circular convolution's Gram rows are sums of the same
    # all-shift Gram entries, so the SLL argument gives n <= 1 for it too, and values below 1 are
    # clamped anyway.  It is much faster than 'auto' on mid-sized layers.
    n = conv2d_norm_bound(scaled, tuple(input_shape), padding=m.padding, method="fft")  # type: ignore[arg-type]
    return _max_one(2.0 * n * n - 1.0)


register_layer_rule(SLLLinear, estimate=_unit_estimate, bound=_sll_linear_bound)
register_layer_rule(SLLConv2d, estimate=_unit_estimate, bound=_sll_conv_bound)
