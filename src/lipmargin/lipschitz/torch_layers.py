"""Lipschitz and rounding rules for torch's built-in layers (and peer libraries' activations).

Every rule is looked up by the layer's exact type (:func:`lipmargin.lipschitz.layer_rule`).  The
constants, each with its proof:

- ``Linear`` / ``Conv1d`` / ``Conv2d``: the sound operator-norm bounds of :mod:`lipmargin.lipschitz.dense` / :mod:`lipmargin.lipschitz.conv`
  (a Conv1d is a Conv2d on inputs of height 1 with a ``(1, k)`` kernel: the same linear map).
- ``ReLU``, ``Identity``, ``Flatten``, ``Unflatten``, ``Dropout`` in eval mode: 1.
- ``LeakyReLU(a)``: ``max(1, |a|)`` (slopes 1 and ``a``); ``ELU(alpha)``: ``max(1, |alpha|)``
  (slopes 1 and ``alpha e^x``, ``x < 0``); ``Tanh``: 1; ``Sigmoid``: 1/4; ``GELU``: 1.13
  (:data:`lipmargin.lipschitz.graph_ops.GELU_LIPSCHITZ`).
- ``BatchNorm1d/2d`` in eval mode: ``y = a_c x + b_c`` per channel with
  ``a_c = gamma_c / sqrt(var_c + eps)``: ``max_c |a_c|``.  Training mode (batch statistics) is
  refused.
- Average pooling (``AvgPool1d/2d``, ``AdaptiveAvgPool1d/2d``): a linear map ``P`` with entries
  ``>= 0``.  By Cauchy-Schwarz, ``(sum_i a_oi x_i)^2 <= r_o sum_i a_oi x_i^2`` with
  ``r = P 1`` the row sums, so ``||P x||^2 <= max_i (P^T r)_i ||x||^2`` (a Schur test), computed
  exactly for the layer's real input shape, padding and divisor.
- ``MaxPool1d/2d`` and ``LPPool1d/2d`` with ``p = 2``: each output depends on one window and
  ``|max(a) - max(b)| <= ||a - b||``, ``| ||a|| - ||b|| | <= ||a - b||``; summing over windows counts
  an input entry once per window that holds it, so the constant is ``sqrt(max coverage)``
  (overlapping windows counted exactly; 1 when windows do not overlap).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz.conv import conv2d_norm_bound
from lipmargin.lipschitz.dense import linear_norm_bound
from lipmargin.lipschitz.graph_ops import GELU_LIPSCHITZ
from lipmargin.lipschitz.operators import checked_conv2d, conv2d_layer_operator, conv2d_operator, linear_operator
from lipmargin.lipschitz.rounding import ROUNDING_MARGIN, affine_error_bound, next_up, elementwise_error_bound, round_up, unit_roundoff
from lipmargin.lipschitz.rules import register_layer_rule

__all__ = ["TRAINING_MODE_REFUSED", "exact_rounding", "ulps_rounding"]

#: Layers whose output in training mode depends on the batch or on chance.
TRAINING_MODE_REFUSED: tuple[type, ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)


def _zeros(x: Tensor) -> Tensor:
    return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)


def exact_rounding(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Copies, selections, max / min, sign flips: no rounding."""
    return _zeros(x)


def ulps_rounding(ulps: float):
    def rounding(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return elementwise_error_bound(y, ulps, y.dtype)

    return rounding


# ---- affine layers ----------------------------------------------------------------------------


def _linear_rounding(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    w = m.weight.detach().double().abs()
    b = None if m.bias is None else m.bias.detach().double().abs()
    return affine_error_bound(lambda v: v @ w.t(), x, b, m.in_features, y.dtype)


def _conv_rounding(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    w = m.weight.detach().double().abs()
    conv = F.conv2d if isinstance(m, nn.Conv2d) else F.conv1d
    fan_in = (m.in_channels // m.groups) * math.prod(m.kernel_size)
    b = None
    if m.bias is not None:
        b = m.bias.detach().double().abs().reshape((-1,) + (1,) * (x.dim() - 2))
    return affine_error_bound(lambda v: conv(v, w, None, m.stride, m.padding, m.dilation, m.groups), x, b, fan_in, y.dtype)


def _conv1d_checked(m: nn.Conv1d) -> nn.Conv1d:
    if m.padding_mode != "zeros":
        raise TypeError(f"Conv1d with padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
    return m


def _conv1d_op(m: nn.Module, in_shape: tuple[int, ...]):
    c = _conv1d_checked(m)  # type: ignore[arg-type]
    pad = c.padding if isinstance(c.padding, str) else c.padding[0]
    if isinstance(pad, str):
        pad = 0 if pad == "valid" else c.dilation[0] * (c.kernel_size[0] - 1) // 2
    # Conv1d on (C, L) == Conv2d on (C, 1, L) with kernel (1, k): one operator formula for both.
    fwd2, adj2 = conv2d_operator(
        c.weight.unsqueeze(2), (in_shape[0], 1, in_shape[-1]), (1, c.stride[0]), (0, pad), (1, c.dilation[0]), c.groups
    )

    def forward(v: Tensor) -> Tensor:
        return fwd2(v.unsqueeze(2)).squeeze(2)

    def adjoint(u: Tensor) -> Tensor:
        return adj2(u.unsqueeze(2)).squeeze(2)

    return forward, adjoint


def _conv1d_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    c = _conv1d_checked(m)  # type: ignore[arg-type]
    pad = c.padding if isinstance(c.padding, str) else (0, c.padding[0])
    # Conv1d on (C, L) == Conv2d on (C, 1, L) with kernel (1, k): the same linear map.
    return conv2d_norm_bound(
        c.weight.detach().unsqueeze(2), (in_shape[0], 1, in_shape[-1]), stride=(1, c.stride[0]),
        padding=pad, dilation=(1, c.dilation[0]), groups=c.groups,
    )


def _conv_bound(m: nn.Module, input_shape: tuple[int, ...]) -> float:
    c = checked_conv2d(m)  # type: ignore[arg-type]
    return conv2d_norm_bound(
        c.weight.detach(), tuple(input_shape), stride=c.stride, padding=c.padding,  # type: ignore[arg-type]
        dilation=c.dilation, groups=c.groups,
    )


register_layer_rule(nn.Linear, operator=lambda m, s: linear_operator(m.weight),
                    bound=lambda m, s: linear_norm_bound(m.weight.detach()), rounding=_linear_rounding)
register_layer_rule(nn.Conv2d, operator=conv2d_layer_operator, bound=_conv_bound, rounding=_conv_rounding)
register_layer_rule(nn.Conv1d, operator=_conv1d_op, bound=_conv1d_bound, rounding=_conv_rounding)

# ---- activations, reshapes --------------------------------------------------------------------

register_layer_rule(nn.ReLU, nn.Flatten, nn.Unflatten, nn.Identity, nn.ReLU6, nn.Hardtanh,
                    constant=lambda m: 1.0, rounding=exact_rounding)
register_layer_rule(nn.LeakyReLU, constant=lambda m: max(1.0, abs(float(m.negative_slope))), rounding=ulps_rounding(1.0))
register_layer_rule(nn.ELU, constant=lambda m: max(1.0, abs(float(m.alpha))), rounding=ulps_rounding(8.0))
register_layer_rule(nn.Tanh, constant=lambda m: 1.0, rounding=ulps_rounding(8.0))
register_layer_rule(nn.Sigmoid, constant=lambda m: 0.25, rounding=ulps_rounding(8.0))
register_layer_rule(nn.GELU, constant=lambda m: GELU_LIPSCHITZ, rounding=ulps_rounding(8.0))


def _dropout_estimate(m: nn.Module) -> Tensor:
    # In training mode inverted dropout scales kept entries by 1 / (1 - p).
    return torch.tensor(1.0 / (1.0 - m.p) if m.training and m.p < 1 else 1.0)


register_layer_rule(nn.Dropout, nn.Dropout1d, nn.Dropout2d, estimate=_dropout_estimate,
                    bound=lambda m, s: 1.0, rounding=exact_rounding)

# ---- batch normalisation (eval mode) ----------------------------------------------------------


def _bn_scale(m: nn.Module, dtype: torch.dtype = torch.float64) -> Tensor:
    if m.running_var is None:
        raise TypeError(f"{type(m).__name__} without running statistics normalises with batch statistics; not supported")
    var = m.running_var.detach().to(dtype)
    a = 1.0 / torch.sqrt(var + m.eps)
    if m.weight is not None:
        a = a * m.weight.detach().to(dtype)
    return a


def _bn_bound(m: nn.Module, s: tuple[int, ...]) -> float:
    if m.training:
        raise TypeError(f"{type(m).__name__} in training mode uses batch statistics; call model.eval()")
    # |a_c| = |gamma| / sqrt(var + eps) in float64: the sum, sqrt, division and product each round
    # once (relative error < 5 * 2**-53 in all); ROUNDING_MARGIN covers that many times over.
    a = _bn_scale(m).abs().max()
    return next_up(float(a) * (1.0 + ROUNDING_MARGIN))


def _bn_estimate(m: nn.Module) -> Tensor:
    var = m.running_var
    a = torch.rsqrt(var + m.eps) if var is not None else torch.ones(m.num_features)
    if m.weight is not None:
        a = a * m.weight
    return a.abs().max()


def _bn_rounding(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    # However torch evaluates it ((x - mean) * invstd * gamma + beta, or x * scale + shift with
    # scale, shift precomputed), each output is a handful (< 8) of roundings of terms bounded by
    # |x| |a| + |mean| |a| + |beta|; 16 u on that sum is a generous bound.
    u = unit_roundoff(y.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    a = _bn_scale(m).abs().reshape(shape)
    mean = m.running_mean.detach().double().abs().reshape(shape)
    beta = 0.0 if m.bias is None else m.bias.detach().double().abs().reshape(shape)
    t = (x.detach().double().abs() + mean) * a + beta
    tiny = float(torch.finfo(y.dtype).tiny)
    n = t[0].numel()
    return round_up(16 * u * t.reshape(t.shape[0], -1).norm(dim=1) * (1 + 1e-12) + 8 * tiny * math.sqrt(n))


register_layer_rule(nn.BatchNorm1d, nn.BatchNorm2d, estimate=_bn_estimate, bound=_bn_bound, rounding=_bn_rounding)

# ---- pooling ----------------------------------------------------------------------------------


def _avg_pool_fn(m: nn.Module):
    if isinstance(m, nn.AvgPool2d):
        return lambda v: F.avg_pool2d(v, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
    if isinstance(m, nn.AvgPool1d):
        return lambda v: F.avg_pool1d(v, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return lambda v: F.adaptive_avg_pool2d(v, m.output_size)
    return lambda v: F.adaptive_avg_pool1d(v, m.output_size)


_SCHUR_CACHE: dict[tuple, float] = {}


def _schur_constant(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    key = (type(m), repr(m), in_shape)
    if key not in _SCHUR_CACHE:
        _SCHUR_CACHE[key] = _schur_uncached(_avg_pool_fn(m), in_shape)
    return _SCHUR_CACHE[key]


def _schur_uncached(pool, in_shape: tuple[int, ...]) -> float:
    x = torch.ones(1, 1, *in_shape[1:], dtype=torch.float64, requires_grad=True)
    rows = pool(torch.ones_like(x)).detach()  # r = P 1
    (c,) = torch.autograd.grad((pool(x) * rows).sum(), x)  # c = P^T r
    # c sums non-negative terms (relative error < n u); the margin covers it by far.
    return next_up(math.sqrt(float(c.max()) * (1.0 + ROUNDING_MARGIN)) * (1.0 + ROUNDING_MARGIN))


def _avg_pool_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    return _schur_constant(m, tuple(in_shape))


def _window(m: nn.Module) -> int:
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)):
        return 0  # computed from the shape in _avg_rounding
    k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * (2 if isinstance(m, nn.AvgPool2d) else 1)
    return math.prod(k)


def _avg_rounding(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    pool = _avg_pool_fn(m)
    n = _window(m)
    if n == 0:  # adaptive: a window spans at most ceil(in / out) + 1 entries per axis
        outs = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * (x.dim() - 2)
        n = math.prod(-(-i // (o or i)) + 1 for i, o in zip(x.shape[2:], outs))
    # a sum of n products with the weights (1 / divisor) >= 0: an affine map with |P| = P.
    return affine_error_bound(pool, x, None, n, y.dtype)


register_layer_rule(nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                    bound=_avg_pool_bound, rounding=_avg_rounding)


def _as_pair(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


@functools.lru_cache(maxsize=256)
def _coverage(spatial: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
              dilation: tuple[int, ...], ceil_mode: bool) -> float:
    """``sqrt`` of the largest number of pooling windows that contain one input entry."""
    hw = spatial if len(spatial) == 2 else (1,) + spatial
    k, s, p, d = ((1,) + t if len(t) == 1 else t for t in (kernel, stride, padding, dilation))
    ones = torch.ones(1, 1, *hw, dtype=torch.float64)
    # ceil_mode may add a last window that starts inside the padded input: padding the far side by
    # stride - 1 more can only add windows, so the count stays an upper bound.
    extra = [(s_i - 1) if ceil_mode else 0 for s_i in s]
    padded = F.pad(ones, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]))
    cols = F.unfold(padded, k, dilation=d, stride=s)
    counts = F.fold(cols, padded.shape[-2:], k, dilation=d, stride=s)
    n = int(counts.max().round())
    root = math.isqrt(n)
    return float(root) if root * root == n else next_up(math.sqrt(n))


def _max_pool_bound(m: nn.Module, in_shape: tuple[int, ...]) -> float:
    nd = 2 if isinstance(m, (nn.MaxPool2d, nn.LPPool2d)) else 1
    if isinstance(m, (nn.LPPool1d, nn.LPPool2d)):
        if float(m.norm_type) != 2.0:
            raise TypeError(f"{type(m).__name__} with norm_type={m.norm_type} is not supported (only p = 2)")
        if m.ceil_mode:
            raise TypeError(f"{type(m).__name__} with ceil_mode=True rescales partial windows; not supported")
        pad, dil = (0,) * nd, (1,) * nd
    else:
        pad, dil = _as_pair(m.padding, nd), _as_pair(m.dilation, nd)
    kernel = _as_pair(m.kernel_size, nd)
    stride = _as_pair(m.stride if m.stride is not None else m.kernel_size, nd)
    return _coverage(tuple(in_shape[1:]), kernel, stride, pad, dil, bool(m.ceil_mode))


def _lp_rounding(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    # y = (k * avg(x^2))^(1/2): squares and a sum of n of them (relative gamma_{n+1}, the terms are
    # non-negative), a division and a product (2 u), a sqrt (halves the relative error, + u):
    # within (n + 8) u of |y| relative.
    n = math.prod(_as_pair(m.kernel_size, y.dim() - 2))
    return elementwise_error_bound(y, float(n + 8), y.dtype)


register_layer_rule(nn.MaxPool1d, nn.MaxPool2d, bound=_max_pool_bound, rounding=exact_rounding)
register_layer_rule(nn.LPPool1d, nn.LPPool2d, bound=_max_pool_bound, rounding=_lp_rounding)

# ---- peer libraries (matched by exact class name, never imported here) ------------------------


def _coefficient(m: nn.Module) -> float:
    return abs(float(getattr(m, "_coefficient_lip", 1.0)))


def _coefficient_rounding(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return _zeros(x) if _coefficient(m) == 1.0 else elementwise_error_bound(y, 1.0, y.dtype)


# deel-torchlip's sorting activations are 1-Lipschitz (piecewise permutations of the entries;
# MaxMin outputs [relu(x), relu(-x)], whose squared differences add up to at most (x - x')^2
# per entry), times the module's Lipschitz coefficient.
register_layer_rule(
    "deel.torchlip.modules.activation.GroupSort", "deel.torchlip.modules.activation.GroupSort2",
    "deel.torchlip.modules.activation.FullSort", "deel.torchlip.modules.activation.MaxMin",
    constant=_coefficient, rounding=_coefficient_rounding,
)
