"""Forward-rounding allowance computed inside an exported predictor's own graph.

An exported predictor evaluates the network in floating point (float64 for TorchScript and
torch.export, float32 for ONNX, whose CPU runtime has no float64 convolution).  Its radius must
not be larger than the radius of the *exact* network, nor than the one :func:`lipmargin.certify`
reports.  Each layer therefore becomes a *step* ``(x, err) -> (y, err')`` that runs the layer and
updates ``err``, a per-sample ``(B,)`` upper bound of ``||x^ - x||_2`` (computed vs exact
activation), with the formulas of :mod:`lipmargin.lipschitz.rounding`:

    err' = L * err + local,   local = alpha * ||t^|| + beta

where ``L`` is a sound Lipschitz bound of the exact (float64) layer, ``t^`` a non-negative tensor
computed in the graph (``|W| |x^| + |b|`` for an affine layer, ``|y^|`` for an elementwise one)
and ``alpha``, ``beta`` constants fixed at export time.

Why ``alpha * ||t^|| + beta`` bounds the local error although it is computed in the graph's own
dtype (unit roundoff ``u``, smallest normal ``tiny``), for a layer with ``n`` products per output
and ``N`` outputs per sample:

- The layer's error at the computed input: ``|y^ - y| <= gamma_{n+2} t + 2 n tiny`` per output.
  ``gamma_{n+1}`` is the dot product (any summation order); one more ``gamma_1`` covers the
  weights and bias being rounded to the graph's dtype (``|W64 - Wd| <= gamma_1 |Wd|``; zero in
  float64), with ``t = |Wd| |x^| + |bd|``.
- ``t`` is computed in the graph from non-negative terms: ``t <= t^ (1 + gamma_{n+1}) + 2 n tiny``.
- ``||t^||`` is computed as ``sqrt(sum t^^2)``.  Entries ``>= theta`` (``2**-62`` float32,
  ``2**-510`` float64) have normal squares (relative error ``u``), the sum of non-negative
  terms loses at most a factor ``(1 - u)^N``, the square root one more ``u``: their norm is at
  most ``sqrt^ (1 + gamma_{N+3})``; entries below ``theta`` have a norm below ``theta sqrt(N)``.

So ``alpha = gamma_{n+2} (1 + gamma_{n+1}) (1 + gamma_{N+3})`` and ``beta = gamma_{n+2}
((1 + gamma_{n+1}) theta + 2 n tiny) sqrt(N) + 2 n tiny sqrt(N) + tiny`` (the last ``tiny``: the
in-graph products ``alpha * norm`` may underflow).  Both are computed in float64 with a
``1 + 1e-12`` inflation (a few float64 roundings) and rounded *up* to the graph's dtype.  The
in-graph update ``L * err + (alpha * nrm + beta)`` rounds 4 times per layer; the final error is
multiplied by ``1 + 2 gamma_{4 (layers + 2)}`` (:func:`final_factor`), which covers those chains.

Assumptions (also in the README): IEEE 754 arithmetic in the stated dtype with round to nearest
and gradual underflow (or flush-to-zero of results; not denormals-are-zero of inputs); no TF32 or
other reduced-precision matmul mode; convolutions evaluated as sums of the products (direct,
im2col + GEMM, any order, FMA allowed), not Winograd or FFT algorithms; for ONNX files, ONNX
Runtime's CPU execution provider.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor, nn

from lipmargin.lipschitz.rounding import gamma, underflow_unit, unit_roundoff

__all__ = [
    "STEP_RULES",
    "register_step_rule",
    "ExactStep",
    "AffineStep",
    "ElementwiseStep",
    "build_step",
    "final_factor",
    "up_to",
    "down_to",
]

#: Square-underflow threshold per dtype (see the module docstring).
_THETA = {torch.float32: 2.0**-62, torch.float64: 2.0**-510}

_INFLATE64 = 1.0 + 1e-12  # covers a handful of float64 roundings of the Python constants


def up_to(value: float, dtype: torch.dtype) -> Tensor:
    """0-d tensor of ``dtype`` that is >= ``value`` (the nearest one above or equal)."""
    t = torch.tensor(value, dtype=torch.float64).to(dtype)
    if math.isfinite(value) and Fraction(float(t)) < Fraction(value):
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    return t


def down_to(value: float, dtype: torch.dtype) -> Tensor:
    """0-d tensor of ``dtype`` that is <= ``value``."""
    t = torch.tensor(value, dtype=torch.float64).to(dtype)
    if math.isfinite(value) and Fraction(float(t)) > Fraction(value):
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    return t


def _norm(t: Tensor) -> Tensor:
    return (t * t).flatten(1).sum(1).sqrt()  # (B,)


class ExactStep(nn.Module):
    """A layer computed exactly in floating point (ReLU, MaxMin, GroupSort, Flatten, Identity)
    with Lipschitz constant at most 1: the error passes through unchanged."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, err: Tensor) -> tuple[Tensor, Tensor]:
        return self.layer(x), err


class AffineStep(nn.Module):
    """A Linear / Conv2d layer: ``err' = L err + alpha ||abs_layer(|x|) + |b| || + beta``."""

    def __init__(self, layer: nn.Module, abs_layer: nn.Module, abs_bias: Tensor | None, lip: Tensor, alpha: Tensor, beta: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.abs_layer = abs_layer
        self.has_bias = abs_bias is not None
        self.register_buffer("abs_bias", abs_bias if abs_bias is not None else torch.zeros(0))
        self.register_buffer("lip", lip)
        self.register_buffer("alpha", alpha)
        self.register_buffer("beta", beta)

    def forward(self, x: Tensor, err: Tensor) -> tuple[Tensor, Tensor]:
        y = self.layer(x)
        t = self.abs_layer(x.abs())
        if self.has_bias:
            t = t + self.abs_bias
        return y, self.lip * err + (self.alpha * _norm(t) + self.beta)


class ElementwiseStep(nn.Module):
    """An elementwise layer with a relative error bound: ``err' = L err + alpha ||y^|| + beta``."""

    def __init__(self, layer: nn.Module, lip: Tensor, alpha: Tensor, beta: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("lip", lip)
        self.register_buffer("alpha", alpha)
        self.register_buffer("beta", beta)

    def forward(self, x: Tensor, err: Tensor) -> tuple[Tensor, Tensor]:
        y = self.layer(x)
        return y, self.lip * err + (self.alpha * _norm(y) + self.beta)


def _affine_constants(fan_in: int, n_out: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``alpha``, ``beta`` of the module docstring, rounded up to ``dtype``."""
    tiny, theta = underflow_unit(dtype), _THETA[dtype]
    g_fwd, g_t, g_norm = gamma(fan_in + 2, dtype), gamma(fan_in + 1, dtype), gamma(n_out + 3, dtype)
    sqrt_n = math.sqrt(n_out) * _INFLATE64
    alpha = g_fwd * (1 + g_t) * (1 + g_norm) * _INFLATE64
    beta = (g_fwd * ((1 + g_t) * theta + 2 * fan_in * tiny) * sqrt_n + 2 * fan_in * tiny * sqrt_n + tiny) * _INFLATE64
    return up_to(alpha, dtype), up_to(beta, dtype)


# A rule: (exported layer in the graph dtype, original float64 layer, input shape, output shape,
# Lipschitz bound of the original layer, dtype) -> step.
StepRule = Callable[[nn.Module, nn.Module, tuple[int, ...], tuple[int, ...], float, torch.dtype], nn.Module]

#: Step rules by the exact type of the *exported* layer; filled by :func:`register_step_rule`.
STEP_RULES: dict[type, StepRule] = {}


def register_step_rule(*types: type) -> Callable[[StepRule], StepRule]:
    def decorator(rule: StepRule) -> StepRule:
        for t in types:
            STEP_RULES[t] = rule
        return rule

    return decorator


def _abs_copy(layer: nn.Module) -> nn.Module:
    """The layer's linear part with ``|W|`` (no bias), same stride / padding / groups."""
    out = copy.deepcopy(layer)
    out.weight = nn.Parameter(layer.weight.detach().abs(), requires_grad=False)
    out.bias = None
    return out


@register_step_rule(nn.Linear, nn.Conv2d)
def _affine_rule(layer, original, in_shape, out_shape, lip, dtype):  # type: ignore[no-untyped-def]
    fan_in = layer.weight[0].numel()  # products per output: (C_in / groups) * kh * kw, or in_features
    n_out = math.prod(out_shape)
    alpha, beta = _affine_constants(fan_in, n_out, dtype)
    abs_bias = None
    if layer.bias is not None:
        b = layer.bias.detach().abs()
        abs_bias = b.view(-1, 1, 1) if isinstance(layer, nn.Conv2d) else b
    return AffineStep(layer, _abs_copy(layer), abs_bias, up_to(lip, dtype), alpha, beta)


def normalize_step(layer: nn.Module, mean: Tensor, std: Tensor, out_shape: tuple[int, ...], lip: float, dtype: torch.dtype) -> nn.Module:
    """``y = (x - m) / s`` per channel with the float64 ``mean``/``std`` of the certified model.

    In the graph ``m``, ``s`` are rounded to ``dtype`` (relative ``u``), then one subtraction and
    one division: ``y^ = ((x - m) - m d1)(1 + d3) / (s (1 + d2)) (1 + d4)``, so
    ``|y^ - y| <= gamma_3 |y| + u |m| / s (1 + gamma_3)``, and with ``|y| <= |y^| + |y^ - y|``
    the error is at most ``2 gamma_4 |y^| + 2 u max|m / s|`` per entry (``gamma_3 < 1/2``).
    """
    u, tiny, theta = unit_roundoff(dtype), underflow_unit(dtype), _THETA[dtype]
    n_out = math.prod(out_shape)
    g = 2 * gamma(4, dtype)
    g_norm = gamma(n_out + 3, dtype)
    ratio = float((mean.to(torch.float64).abs() / std.to(torch.float64)).max())
    sqrt_n = math.sqrt(n_out) * _INFLATE64
    alpha = g * (1 + g_norm) * _INFLATE64
    beta = (g * theta * sqrt_n + 2 * u * ratio * (1 + 1e-6) * sqrt_n + 2 * tiny * sqrt_n + tiny) * _INFLATE64
    return ElementwiseStep(layer, up_to(lip, dtype), up_to(alpha, dtype), up_to(beta, dtype))


def build_step(layer: nn.Module, original: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], lip: float, dtype: torch.dtype) -> nn.Module:
    """The step for ``layer`` (already converted to ``dtype``); ``TypeError`` naming it if none."""
    rule = STEP_RULES.get(type(layer))
    if rule is None:
        supported = ", ".join(sorted(t.__name__ for t in STEP_RULES))
        raise TypeError(
            f"no forward-rounding rule for layer {type(original).__name__} ({original!r}): the exported "
            f"predictor cannot bound its floating-point error; supported: {supported}"
        )
    return rule(layer, original, in_shape, out_shape, lip, dtype)


def final_factor(num_steps: int, dtype: torch.dtype) -> Tensor:
    """``1 + 2 gamma_{4 (num_steps + 2)}`` rounded up: covers the in-graph update chains."""
    return up_to((1 + 2 * gamma(4 * (num_steps + 2), dtype)) * _INFLATE64, dtype)
