"""AOL: almost-orthogonal Lipschitz layers (Prach & Lampert, ECCV 2022).

Soundness: the layer is linear plus bias; its bound is the sound operator norm of the rescaled
weight (:mod:`lipmargin.lipschitz.dense` and :mod:`lipmargin.lipschitz.conv`), computed in float64 from the stored values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz import no_autocast, register_layer_rule
from lipmargin.lipschitz import conv2d_norm_bound, linear_norm_bound
from lipmargin.nn._common import _check_odd, _check_positive, _conv_gram, _safe_rsqrt, _unit_estimate, f64

__all__ = ["aol_linear_scale", "aol_conv_scale", "AOLLinear", "AOLConv2d"]


def aol_linear_scale(weight: Tensor) -> Tensor:
    """AOL column scales ``d_i = (sum_j |W^T W|_ij)^{-1/2}`` for a ``(out, in)`` weight; ``(in,)``.

    ``W diag(d)`` has spectral norm <= 1 (Prach & Lampert 2022, Theorem 1: ``diag(d)^{-2}``
    dominates ``W^T W`` by Gershgorin's theorem).
    """
    gram = weight.t() @ weight  # (in, in)
    return _safe_rsqrt(gram.abs().sum(1))


def aol_conv_scale(kernel: Tensor) -> Tensor:
    """AOL input-channel scales for a conv kernel ``(C_out, C_in, k, k)``; ``(C_in,)``.

    ``P^T P`` of the convolution is the convolution of the kernel with itself (all shifts), so
    ``d_i = (sum_{j, s} |(K^T * K)_{ij}(s)|)^{-1/2}``.  With zero padding the true conv is a
    restriction of the full (unbounded) one, whose Gram rows sum to at most these values, so the
    rescaled zero-padded conv also has norm <= 1.
    """
    gram = _conv_gram(kernel.transpose(0, 1))  # (C_in, C_in, 2k-1, 2k-1)
    return _safe_rsqrt(gram.abs().sum((1, 2, 3)))


class AOLLinear(nn.Module):
    """Almost-Orthogonal Lipschitz linear layer (Prach & Lampert, ECCV 2022).

    ``y = W diag(d) x + b`` with ``d = aol_linear_scale(W)``: spectral norm <= 1 for every ``W``.
    Initialised orthogonal, so that ``d = 1`` and the layer starts exactly orthogonal.

    >>> import torch
    >>> layer = AOLLinear(4, 3).double()
    >>> with torch.no_grad():
    ...     _ = layer.weight.normal_()  # any weight: the rescaled one has spectral norm <= 1
    >>> bool(torch.linalg.matrix_norm(layer.effective_weight().detach(), 2) <= 1 + 1e-12)
    True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = _check_positive(in_features, "in_features", "AOLLinear")
        self.out_features = _check_positive(out_features, "out_features", "AOLLinear")
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        nn.init.orthogonal_(self.weight)

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W diag(d)``, the weight the forward pass applies (in ``dtype`` if given)."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        return w * aol_linear_scale(w)[None, :]

    def forward(self, x: Tensor) -> Tensor:
        with no_autocast(self.weight):
            w = self.effective_weight()
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class AOLConv2d(nn.Module):
    """Almost-Orthogonal Lipschitz convolution (Prach & Lampert, ECCV 2022): stride 1, 'same' padding.

    The kernel's input channels are rescaled by :func:`aol_conv_scale`.  Layers with as many
    outputs as inputs start as the identity (the paper's identity-centre initialisation); others
    start from an orthogonal centre tap (the paper's orthogonal initialisation for width changes).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.in_channels = _check_positive(in_channels, "in_channels", "AOLConv2d")
        self.out_channels = _check_positive(out_channels, "out_channels", "AOLConv2d")
        self.kernel_size = _check_odd(kernel_size, "AOLConv2d")
        self.padding = self.kernel_size // 2
        k = self.kernel_size
        self.weight = nn.Parameter(torch.zeros(self.out_channels, self.in_channels, k, k))
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        with torch.no_grad():
            centre = torch.empty(self.out_channels, self.in_channels)
            if self.in_channels == self.out_channels:
                centre.copy_(torch.eye(self.in_channels))
            else:
                nn.init.orthogonal_(centre)
            self.weight[:, :, k // 2, k // 2] = centre

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The rescaled kernel the forward pass applies (in ``dtype`` if given)."""
        w = self.weight if dtype is None else self.weight.to(dtype)
        return w * aol_conv_scale(w).view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        with no_autocast(self.weight):
            w = self.effective_weight()
        return F.conv2d(x, w, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


def _aol_linear_bound(m: nn.Module, input_shape: tuple[int, ...]) -> float:
    return linear_norm_bound(m.effective_weight(f64).detach())  # type: ignore[operator]


def _aol_conv_bound(m: nn.Module, input_shape: tuple[int, ...]) -> float:
    kernel = m.effective_weight(f64).detach()  # type: ignore[operator]
    return conv2d_norm_bound(kernel, tuple(input_shape), padding=m.padding)  # type: ignore[arg-type]


register_layer_rule(AOLLinear, estimate=_unit_estimate, bound=_aol_linear_bound)
register_layer_rule(AOLConv2d, estimate=_unit_estimate, bound=_aol_conv_bound)
