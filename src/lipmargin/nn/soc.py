"""SOC: skew orthogonal convolutions (Singla & Feizi, ICML 2021).

Soundness: with the exactly skew-symmetric ``A``, ``exp(A)`` is orthogonal, so the truncated
series obeys ``||S_T(A)|| <= 1 + sum_{k > T} a^k / k!`` for any ``a >= ||A||``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz import (
    ROUNDING_MARGIN,
    no_autocast,
    operator_norm_estimate,
    power_iteration,
    register_layer_rule,
)
from lipmargin.lipschitz import conv2d_norm_bound
from lipmargin.nn._common import _check_odd, _check_positive, _unit_estimate, f64

__all__ = ["skew_kernel", "exp_series_tail_bound", "soc_bound_from_norm", "conv_matrix", "SOCConv2d"]


def skew_kernel(kernel: Tensor) -> Tensor:
    """``K - flip(K)^T``: the kernel of ``C - C^T`` for a stride-1 'same' conv ``C`` (odd kernels).

    The transposed convolution with padding ``k // 2`` is the convolution with the kernel
    transposed in its channels and flipped in space; the difference of two IEEE numbers is exactly
    the negative of the reversed difference, so the result is exactly skew-symmetric.
    """
    return kernel - kernel.transpose(0, 1).flip(2, 3)


def exp_series_tail_bound(a: float, terms: int) -> float:
    """An upper bound on ``sum_{k > terms} a^k / k!`` for ``a >= 0`` (``inf`` when it gives none).

    With ``n = terms + 1``: ``a^(n+j) / (n+j)! <= (a^n / n!) (a / (n+1))^j``, a geometric series
    that converges for ``a < n + 1``.

    Float64 rounding: the ratio is rounded up, so ``1 - ratio`` (exact by Sterbenz' lemma when the
    ratio is >= 1/2) never exceeds its real value; the few ulps of ``a^n``, ``n!`` and the divisions
    are covered by the relative ``1e-12`` and an underflow of ``a^n / n!`` by the absolute ``1e-300``.

    >>> exp_series_tail_bound(1.0, 6) >= 2.2627e-4  # e - sum_{k <= 6} 1/k! = 2.2627...e-4
    True
    >>> exp_series_tail_bound(0.0, 3), exp_series_tail_bound(8.0, 3)
    (0.0, inf)
    """
    if a < 0 or math.isnan(a) or terms < 0:
        raise ValueError(f"exp_series_tail_bound needs a >= 0 and terms >= 0, got a={a}, terms={terms}")
    if a == 0:
        return 0.0
    n = terms + 1
    ratio = math.nextafter(a / (n + 1), math.inf)
    if ratio >= 1 or math.isinf(a):
        return math.inf
    try:
        first = a**n / math.factorial(n)
    except OverflowError:
        return math.inf
    return first / (1.0 - ratio) * (1.0 + 1e-12) + 1e-300


def conv_matrix(kernel: Tensor, size: tuple[int, int], padding: int) -> Tensor:
    """The stride-1 zero-padded ``conv2d`` with ``kernel`` on ``(C_in, H, W)`` inputs as a matrix.

    Shape ``(C_out*H_out*W_out, C_in*H*W)``, rows and columns in ``reshape`` order, so that
    ``conv2d(x, kernel, padding=padding).flatten(1) == x.flatten(1) @ M.T``.  Entry
    ``[(o, p), (i, q)]`` is ``kernel[o, i, q - p + padding]`` where that tap exists, else 0.
    Differentiable in ``kernel``; meant for small images (its size is ``(C H W)^2``).
    """
    co, ci, kh, kw = kernel.shape
    h, w = size
    ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    dev = kernel.device
    th = torch.arange(h, device=dev)[None, :] - torch.arange(ho, device=dev)[:, None] + padding  # (Ho, H)
    tw = torch.arange(w, device=dev)[None, :] - torch.arange(wo, device=dev)[:, None] + padding  # (Wo, W)
    ok_h, ok_w = (th >= 0) & (th < kh), (tw >= 0) & (tw < kw)
    ih = th.clamp(0, kh - 1)[:, None, :, None].expand(ho, wo, h, w)  # (Ho, Wo, H, W)
    iw = tw.clamp(0, kw - 1)[None, :, None, :].expand(ho, wo, h, w)
    valid = (ok_h[:, None, :, None] & ok_w[None, :, None, :]).to(kernel.dtype)  # (Ho, Wo, H, W)
    taps = kernel[:, :, ih, iw] * valid  # (Co, Ci, Ho, Wo, H, W)
    return taps.permute(0, 2, 3, 1, 4, 5).reshape(co * ho * wo, ci * h * w)


def _reshapes(kernel: Tensor) -> list[Tensor]:
    """The reshaped kernel matrices of Singla & Feizi's 'Fantastic Four' norm estimate.

    ``(C_o k_h) x (C_i k_w)``, ``(C_o k_w) x (C_i k_h)``, ``C_o x (C_i k_h k_w)`` and
    ``(C_o k_h k_w) x C_i``; a 1x1 kernel has just one, the channel matrix.
    """
    co, ci, kh, kw = kernel.shape
    if kh == 1 and kw == 1:
        return [kernel.reshape(co, ci)]
    return [
        kernel.permute(0, 2, 1, 3).reshape(co * kh, ci * kw),
        kernel.permute(0, 3, 1, 2).reshape(co * kw, ci * kh),
        kernel.reshape(co, ci * kh * kw),
        kernel.permute(0, 2, 3, 1).reshape(co * kh * kw, ci),
    ]


def _matrix_operator(mat: Tensor) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(M, M^T)`` on vectors, for the power iteration of :mod:`lipmargin.lipschitz`."""
    return (lambda x: mat @ x), (lambda y: mat.t() @ y)


class SOCConv2d(nn.Module):
    """Skew Orthogonal Convolution (Singla & Feizi, ICML 2021): stride 1, 'same' padding, odd kernel.

    ``A`` is the convolution with :func:`skew_kernel` of a free kernel ``L``, rescaled by
    ``correction / sigma`` where ``sigma`` is the smallest of the 'Fantastic Four' power-iteration
    estimates (persistent vectors, advanced by each training forward), as in the paper; the
    output is the truncated exponential ``sum_{k <= T} A^k x / k!`` (``train_terms`` in training,
    ``eval_terms`` otherwise).  Different channel counts work as in the paper: the input is
    zero-padded to ``max(in, out)`` channels and the output truncated to ``out_channels``.

    ``exp(A)`` is orthogonal, but the truncated series is not exactly: the layer's sound bound is
    ``1 + exp_series_tail_bound(a, eval_terms)`` with ``a`` the sound norm bound of ``A``'s
    convolution on the real input size (1 + 1.5e-6 for ``a = 2`` and 12 terms).

    Eval mode additionally caps the scale so that ``||A|| <= eval_max_norm`` (a sound bound of the
    unscaled skew convolution on the input's size, cached per weight version and size).  The
    estimates lag behind the kernel after large optimiser steps (the top directions of a
    high-dimensional kernel move quickly), which can make ``||A||`` several times larger than
    intended and the 12-term series far from orthogonal; the cap keeps the certified function
    near-orthogonal and changes nothing while the estimates are good (``||A||`` is about 1 then).

    >>> import torch
    >>> from lipmargin.lipschitz import operator_norm_bound
    >>> layer = SOCConv2d(2, 3, 3).eval()
    >>> layer(torch.randn(1, 2, 4, 4)).shape
    torch.Size([1, 3, 4, 4])
    >>> 1.0 <= operator_norm_bound(layer, (2, 4, 4)) < 1.001  # ||A|| <= 2: a tiny series tail
    True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        *,
        train_terms: int = 6,
        eval_terms: int = 12,
        correction: float | None = None,
        eval_max_norm: float = 2.0,
        power_iters: int = 1,
        init_iters: int = 50,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive(in_channels, "in_channels", "SOCConv2d")
        self.out_channels = _check_positive(out_channels, "out_channels", "SOCConv2d")
        self.kernel_size = _check_odd(kernel_size, "SOCConv2d")
        self.padding = self.kernel_size // 2
        self.train_terms = _check_positive(train_terms, "train_terms", "SOCConv2d")
        self.eval_terms = _check_positive(eval_terms, "eval_terms", "SOCConv2d")
        # The paper's 0.7 compensates for the reshaped-matrix estimate exceeding the conv norm; a
        # 1x1 kernel's estimate is the exact norm.
        self.correction = float(correction if correction is not None else (1.0 if self.kernel_size == 1 else 0.7))
        if not self.correction > 0 or not eval_max_norm > 0:
            raise ValueError(f"SOCConv2d: correction and eval_max_norm must be > 0, got {correction}, {eval_max_norm}")
        self.eval_max_norm = float(eval_max_norm)
        self.power_iters = int(power_iters)
        #: Inputs of at most this many pixels apply A as a dense matrix (:func:`conv_matrix`).
        self.dense_pixels = 4
        self.channels = max(self.in_channels, self.out_channels)
        c, k = self.channels, self.kernel_size
        self.weight = nn.Parameter(torch.randn(c, c, k, k) / math.sqrt(c))
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self._n_vectors = len(_reshapes(self.weight.detach()))
        for i, mat in enumerate(_reshapes(self.weight.detach())):
            v = torch.randn(mat.shape[1])
            self.register_buffer(f"v{i}", v / v.norm())
        self._bound_cache: tuple[tuple, float] | None = None
        self._advance(init_iters)

    def _vectors(self) -> list[Tensor]:
        return [getattr(self, f"v{i}") for i in range(self._n_vectors)]

    @torch.no_grad()
    def _advance(self, n_iter: int) -> None:
        mats = _reshapes(skew_kernel(self.weight.detach()))
        for mat, v in zip(mats, self._vectors()):
            v.copy_(power_iteration(*_matrix_operator(mat), v, n_iter))

    def skew_norm_bound(self, size: tuple[int, int]) -> float:
        """Sound bound on the norm of the unscaled skew convolution on ``(channels, *size)`` inputs.

        Cached per (storage, version, dtype, device) of the weight and ``size``.
        """
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, str(w.device), tuple(size))
        if self._bound_cache is None or self._bound_cache[0] != key:
            kernel = skew_kernel(w.detach().to(f64))
            value = conv2d_norm_bound(kernel, (self.channels, *size), padding=self.padding, method="fft")
            self._bound_cache = (key, value)
        return self._bound_cache[1]

    def skew_operator_kernel(self, dtype: torch.dtype | None = None, size: tuple[int, int] | None = None) -> Tensor:
        """The kernel of ``A`` as the forward pass applies it (in ``dtype`` if given).

        ``size=None``: the training-mode kernel; ``size=(H, W)``: the eval-mode kernel for inputs of
        that spatial size (scale capped so that ``||A|| <= eval_max_norm``).
        """
        w = self.weight if dtype is None else self.weight.to(dtype)
        skew = skew_kernel(w)
        sigmas = []
        for mat, v in zip(_reshapes(skew), self._vectors()):
            v = v.detach() if dtype is None else v.detach().to(dtype)
            sigmas.append(operator_norm_estimate(_matrix_operator(mat)[0], v))
        sigma = torch.stack(sigmas).min().clamp_min(torch.finfo(skew.dtype).tiny)
        scale = self.correction / sigma
        if size is not None:
            b = self.skew_norm_bound(size)
            if b > 0:
                scale = torch.minimum(scale, torch.full_like(scale, self.eval_max_norm / b))
        return skew * scale

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"SOCConv2d expects {self.in_channels} input channels, got shape {tuple(x.shape)}")
        size = None if self.training else (int(x.shape[-2]), int(x.shape[-1]))
        with no_autocast(self.weight):
            if self.training and self.power_iters > 0:
                self._advance(self.power_iters)
            kernel = self.skew_operator_kernel(size=size)
        if self.channels > self.in_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.channels - self.in_channels))
        terms = self.train_terms if self.training else self.eval_terms
        h, w = x.shape[-2:]
        if h * w <= self.dense_pixels:
            # Few pixels (the last stages of a LipConvNet): the convolution as one dense
            # (C*H*W)^2 matrix.  The same linear map; a matmul does fewer operations than a conv
            # that mostly multiplies zero padding, and its backward is far faster on a CPU.
            mat = conv_matrix(kernel, (h, w), self.padding)  # (C*H*W, C*H*W)
            flat = x.reshape(x.shape[0], -1)  # (B, C*H*W)
            out_flat, term = flat, flat
            for i in range(1, terms + 1):
                term = (term @ mat.t()) / i
                out_flat = out_flat + term
            out = out_flat.reshape(x.shape)
        else:
            out, term = x, x
            for i in range(1, terms + 1):
                term = F.conv2d(term, kernel, padding=self.padding) / i
                out = out + term
        out = out[:, : self.out_channels]
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"train_terms={self.train_terms}, eval_terms={self.eval_terms}, correction={self.correction}"
        )


def soc_bound_from_norm(a: float, terms: int) -> float:
    """Sound bound on ``||sum_{k <= terms} A^k / k!||`` for skew-symmetric ``A`` with ``||A|| <= a``.

    ``exp(A)`` is orthogonal, so by the triangle inequality the truncation differs from a norm-1
    operator by at most the tail; the triangle inequality on the series itself gives ``exp(a)``.

    >>> soc_bound_from_norm(0.0, 6)  # A = 0: the identity, up to the rounding margin
    1.000000001
    >>> 1.000226 < soc_bound_from_norm(1.0, 6) < 1.000227  # 1 + e - sum_{k <= 6} 1/k!
    True
    """
    return min(1.0 + exp_series_tail_bound(a, terms), math.exp(a) if a < 700 else math.inf) * (1.0 + ROUNDING_MARGIN)


def _soc_bound(m: nn.Module, input_shape: tuple[int, ...]) -> float:
    size = (int(input_shape[1]), int(input_shape[2]))
    kernel = m.skew_operator_kernel(f64, size=size).detach()  # type: ignore[operator]
    # a only enters through the series tail (~a^13 / 13!), so the fast circular bound is enough.
    a = conv2d_norm_bound(kernel, (m.channels, *size), padding=m.padding, method="fft")  # type: ignore[arg-type]
    return soc_bound_from_norm(a, m.eval_terms)  # type: ignore[arg-type]


register_layer_rule(SOCConv2d, estimate=_unit_estimate, bound=_soc_bound)
