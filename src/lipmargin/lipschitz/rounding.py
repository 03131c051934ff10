"""Proven bounds on the floating-point forward error of a certified forward pass.

A certificate ``radius = min_j (f_c - f_j) / L[c, j]`` is about the *exact* function ``f``; the
margins we see come from a forward pass evaluated in floating point.  The functions here bound the
difference, so that a radius computed from the rounded logits can be deflated until it is provably
not larger than the radius of the exact logits.

Model of arithmetic (IEEE 754, round to nearest, gradual underflow) for a format with unit
roundoff ``u`` (``2**-24`` for float32, ``2**-53`` for float64) and smallest *normal* number
``tiny`` (``torch.finfo(dtype).tiny``):

- ``fl(a + b) = (a + b)(1 + d)``, ``|d| <= u`` (an addition whose result is subnormal is exact);
- ``fl(a * b) = a b (1 + d) + e``, ``|d| <= u``, ``|e| <= tiny`` (``e`` is the underflow error: at
  most half the smallest subnormal with gradual underflow, less than ``tiny`` if results are
  flushed to zero), and ``sqrt`` is correctly rounded.
- Overflow is not modelled: an overflowing forward pass produces ``inf``/``nan``, which the callers
  refuse or which makes a radius 0 / ``nan``.

Dot products (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sections 3.1 and
3.3): with ``gamma_n = n u / (1 - n u)`` (valid while ``n u < 1``), ``prod_{i<=n} (1 + d_i)^{+-1}
= 1 + t`` with ``|t| <= gamma_n``.  In ``s = b + sum_{i=1}^{n} a_i x_i`` summed in *any* order
(pairwise, blocked, vectorised, fused multiply-add), every product passes through at most ``n``
additions after its own rounding, so

    |fl(s) - s| <= gamma_{n+1} (|b| + sum_i |a_i| |x_i|) + 2 n tiny.

The ``2 n tiny`` collects the ``n`` underflow errors, each amplified by at most ``(1 + u)^n < 2``.
What this does NOT cover (assumptions of every allowance here): TF32 or reduced-precision matmul
modes, Winograd / FFT convolution algorithms (they are not a sum of the products), bfloat16 /
float16 (refused with ``TypeError``), denormals-are-zero on *inputs* (DAZ).

A whole network: if the computed input of a layer ``g`` (Lipschitz constant ``L``) is ``x^`` and
the exact one ``x`` with ``||x^ - x|| <= e``, then
``||fl(g(x^)) - g(x)|| <= ||fl(g(x^)) - g(x^)|| + L e``: the local rounding error evaluated at the
*computed* input, plus the propagated error (:func:`propagate_error`).

The bounds themselves are evaluated in float64 from non-negative quantities; every rounding in
that evaluation is accounted for explicitly (factors stated where they are applied), so that the
float64 rounding of the bound can only make it larger.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor

__all__ = [
    "unit_roundoff",
    "underflow_unit",
    "gamma",
    "round_up",
    "mul_pow2",
    "nonnegative_norm_bound",
    "affine_error_bound",
    "propagate_error",
    "elementwise_error_bound",
    "margin_radius_lower",
    "radius_lower",
    "SQRT2_UP",
    "ROUNDING_MARGIN",
    "next_up",
]

#: Relative inflation applied to float64 results that are called bounds.  float64 SVD / FFT / norm
#: computations on the layer sizes we meet are accurate to ~1e-13 relative; 1e-9 leaves four
#: orders of magnitude of head room.
ROUNDING_MARGIN = 1e-9

_U64 = 2.0**-53
_TINY64 = torch.finfo(torch.float64).tiny

#: ``sqrt(2)`` rounded up: ``math.sqrt`` is correctly rounded, one step up is >= the real number.
SQRT2_UP = math.nextafter(math.sqrt(2.0), math.inf)

# Relative inflation that covers k <= 16 float64 roundings of a non-negative expression:
# true <= computed * (1 + gamma_16) and gamma_16 < 17 * 2**-53 < 2**-48; the multiplication by the
# factor rounds once more, which the remaining head room (2**-48 vs 17 * 2**-53) covers.
_SLACK64 = 1.0 + 2.0**-48

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def next_up(v: float) -> float:
    """One float up: >= the exact result of the one rounded operation that gave ``v`` (a product
    that underflowed to 0 becomes the smallest subnormal, never a false 0); negative, infinite and
    NaN values are returned unchanged.

    >>> next_up(1.0) > 1.0, next_up(0.0) > 0.0, next_up(-1.0)
    (True, True, -1.0)
    """
    return math.nextafter(v, math.inf) if v >= 0 and math.isfinite(v) else v


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` of ``dtype`` (``2**-24`` float32, ``2**-53`` float64).

    ``TypeError`` for any other dtype: half precision formats are not supported for certified
    arithmetic (their tiny exponent range makes the underflow terms dominate).
    """
    if dtype not in _UNIT_ROUNDOFF:
        raise TypeError(f"certified arithmetic supports float32 and float64, not {dtype}")
    return _UNIT_ROUNDOFF[dtype]


def underflow_unit(dtype: torch.dtype) -> float:
    """Absolute error allowed per product for underflow: the smallest normal number of ``dtype``."""
    unit_roundoff(dtype)  # refuses unsupported dtypes
    return float(torch.finfo(dtype).tiny)


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)`` for ``dtype``, rounded up to a float64.

    Computed exactly with rationals and rounded upwards, so the returned float is >= the real
    ``gamma_n``.  ``ValueError`` if ``n < 0`` or ``n u >= 1/2`` (the bound degenerates).
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"gamma needs an integer n >= 0; got {n!r}")
    u = Fraction(unit_roundoff(dtype))
    nu = n * u
    if nu >= Fraction(1, 2):
        raise ValueError(f"gamma_{n} is not useful for {dtype}: n * u = {float(nu):.3g} >= 1/2")
    exact = nu / (1 - nu)
    g = float(exact)
    return g if Fraction(g) >= exact else math.nextafter(g, math.inf)


def round_up(t: Tensor, factor: float = _SLACK64) -> Tensor:
    """``t * factor`` moved one float up: for non-negative float64 ``t`` the result is >= the
    real ``t * factor`` (one rounding of the product is covered by the ``nextafter`` step)."""
    return torch.nextafter(t * factor, torch.full_like(t, math.inf))


def mul_pow2(t: Tensor, k: Tensor) -> Tensor:
    """``t * 2**k`` for float64 ``t`` and integer ``k`` (broadcast), in at most three exact steps.

    Multiplying by a power of two is exact unless the result underflows (then the error is at most
    half the smallest subnormal per step) or overflows; ``2**k`` itself must be a normal float64,
    hence the steps of at most ``2**+-1000``.
    """
    k = k.to(torch.float64)
    for _ in range(3):
        step = k.clamp(-1000.0, 1000.0)
        t = t * torch.pow(2.0, step)
        k = k - step
    return t


def nonnegative_norm_bound(v: Tensor) -> Tensor:
    """Per-sample upper bound of the L2 norm of a non-negative float64 tensor ``v`` ``(B, ...)``.

    Each sample is scaled by an exact power of two so that its largest entry ``m`` lies in
    ``[1/2, 1)`` (no overflow of the squares; entries that underflow when scaled or squared are
    below ``2**-1021`` after scaling and are covered by an absolute term), the sum of squares of
    ``N`` entries is taken in any order (relative error ``gamma_N``), then the square root (one
    rounding) and the scale back (exact, or rounded once if subnormal; covered by ``round_up``).
    Returns ``(B,)`` float64.
    """
    if v.dtype != torch.float64:
        raise TypeError(f"nonnegative_norm_bound needs float64, got {v.dtype}")
    flat = v.reshape(v.shape[0], -1)  # (B, N)
    n = flat.shape[1]
    if n == 0:
        return torch.zeros(flat.shape[0], dtype=torch.float64, device=v.device)
    m = flat.amax(1)  # (B,)
    _, e = torch.frexp(torch.where(m > 0, m, torch.ones_like(m)))  # m = f 2**e, f in [1/2, 1)
    scaled = mul_pow2(flat, -e.unsqueeze(1))  # (B, N), max in [1/2, 1)
    s = (scaled * scaled).sum(1)  # (B,), >= 1/4 where m > 0
    # Each scaled entry lost at most 3 * 2**-1075 to underflow (three steps) and each square at most
    # 2**-1074: per entry, an absolute error below 2**-1070 on the square; N of them, then the sum's
    # relative error gamma_N.  As s >= 1/4 the absolute term is representable.
    s = (s + n * 2.0**-1070) * (1.0 + gamma(n + 1, torch.float64))
    s = round_up(s)
    norm_scaled = round_up(torch.sqrt(s))  # sqrt rounds once
    norm = round_up(mul_pow2(norm_scaled, e), 1.0)  # exact power-of-two scale, or one rounding if subnormal
    return torch.where(m > 0, norm, torch.zeros_like(norm))


def affine_error_bound(
    abs_linear: Callable[[Tensor], Tensor],
    x: Tensor,
    abs_bias: Tensor | None,
    fan_in: int,
    dtype: torch.dtype,
) -> Tensor:
    """Per-sample ``(B,)`` float64 bound of ``||fl(A x + b) - (A x + b)||_2`` in ``dtype``.

    ``x`` is the (computed) input batch ``(B, ...)`` the layer received, ``abs_linear(v)`` applies
    ``|A|`` entrywise-absolute linear map to a float64 batch (e.g. ``F.conv2d(v, w.abs(), stride=..,
    padding=..)`` or ``v @ w.abs().T``) and ``abs_bias`` is ``|b|`` broadcastable to the output
    (or ``None``).  ``fan_in`` is the number of products per output.

    Per output ``i`` the error is at most ``gamma_{n+1} t_i + 2 n tiny`` with ``t = |A||x| + |b|``
    (module docstring).  ``t`` is itself computed in float64 from non-negative terms: the computed
    ``t^`` satisfies ``t <= t^ (1 + gamma64_{n+1}) + 2 n tiny64``.  Hence, with ``N`` outputs per
    sample,

        err <= gamma_{n+1} ((1 + gamma64_{n+1}) ||t^|| + 2 n tiny64 sqrt(N)) + 2 n tiny sqrt(N),

    evaluated with :func:`nonnegative_norm_bound` for ``||t^||`` and the final few (< 16) float64
    roundings of non-negative numbers covered by the factor ``1 + 2**-48`` and a ``nextafter`` step.
    """
    g = gamma(fan_in + 1, dtype)
    g64 = gamma(fan_in + 1, torch.float64)
    with torch.no_grad():
        t = abs_linear(x.detach().to(torch.float64).abs())
        if abs_bias is not None:
            t = t + abs_bias.to(torch.float64)
        t = t.reshape(t.shape[0], -1)  # (B, N)
        n_out = t.shape[1]
        norm = nonnegative_norm_bound(t)  # (B,)
        sqrt_n = math.nextafter(math.sqrt(n_out), math.inf)
        under64 = 2.0 * fan_in * _TINY64 * sqrt_n
        under = 2.0 * fan_in * underflow_unit(dtype) * sqrt_n
        return round_up(g * ((1.0 + g64) * norm + under64) + under)


def propagate_error(error_in: Tensor, lipschitz_bound: float, local: Tensor) -> Tensor:
    """Error after a layer: ``lipschitz_bound * error_in + local`` rounded up.

    Two float64 roundings of non-negative numbers (product, sum) give a relative error of at most
    ``gamma_2 < 2.0000001 u``; the factor ``1 + 4 u`` rounded once more still exceeds
    ``(1 + gamma_2)`` (``(1 + 4u)(1 - u) > 1 + 2.9 u``).
    """
    if not lipschitz_bound >= 0:
        raise ValueError(f"lipschitz_bound must be >= 0; got {lipschitz_bound}")
    return (lipschitz_bound * error_in.to(torch.float64) + local.to(torch.float64)) * (1.0 + 4 * _U64)


def elementwise_error_bound(y: Tensor, ulps: float, dtype: torch.dtype) -> Tensor:
    """Per-sample ``(B,)`` bound of the L2 error of an elementwise op with computed result ``y``.

    The op's result is assumed within ``ulps * u * |y_exact|`` plus an underflow error below
    ``tiny`` per entry.  As ``|y_exact| <= |y| + |error|``, the relative part is at most
    ``ulps u |y| / (1 - ulps u)``; the absolute part adds ``tiny sqrt(numel)`` per sample.
    """
    if not ulps >= 0:
        raise ValueError(f"ulps must be >= 0; got {ulps}")
    rel = Fraction(ulps) * Fraction(unit_roundoff(dtype))
    if rel >= Fraction(1, 2):
        raise ValueError(f"ulps * u = {float(rel):.3g} is too large for a relative error bound")
    factor = math.nextafter(float(rel / (1 - rel)), math.inf)
    with torch.no_grad():
        a = y.detach().to(torch.float64).abs()
        a = a.reshape(a.shape[0], -1)
        norm = nonnegative_norm_bound(a)
        sqrt_n = math.nextafter(math.sqrt(a.shape[1]), math.inf)
        return round_up(factor * norm + underflow_unit(dtype) * sqrt_n)


def _down(t: Tensor) -> Tensor:
    """One float step toward zero (covers one round-to-nearest of a computed value)."""
    return torch.nextafter(t, torch.zeros_like(t))


def margin_radius_lower(margin: Tensor, logit_error: Tensor, pairwise_rows: Tensor) -> Tensor:
    """Lower bound of ``(margin - sqrt(2) logit_error) / rows``, clamped at 0, elementwise.

    Args:
        margin: ``(B, C)`` float64 ``f_c - f_j`` of the computed logits (``c`` the prediction); it
            may carry one float64 rounding of the subtraction.
        logit_error: ``(B,)`` bound of ``||f^(x) - f(x)||_2`` (computed vs exact logits).  Since
            ``|d(f_c - f_j)| <= |d f_c| + |d f_j| <= sqrt(2) ||d f||_2``, the exact margin is at
            least ``margin - sqrt(2) logit_error``.
        pairwise_rows: ``(B, C)`` float64 ``L[c, j]``.

    Returns ``(B, C)`` float64 with every rounding directed toward zero: the margin is moved one
    step down (its own subtraction), ``sqrt(2) e`` is rounded up, and the difference and the
    quotient are each moved one step toward zero.  A zero row means a constant difference: ``inf``
    if the deflated margin is positive, 0 otherwise.  The predicted class's own column is not
    masked here (see :func:`radius_lower`).
    """
    margin = margin.to(torch.float64)
    rows = pairwise_rows.to(torch.float64)
    err = logit_error.to(torch.float64).reshape(-1, 1)  # (B, 1)
    allowance = torch.nextafter(SQRT2_UP * err, torch.full_like(err, math.inf))  # (B, 1), rounded up
    num = _down(_down(margin) - allowance).clamp_min(0.0)  # (B, C)
    safe = torch.where(rows > 0, rows, torch.ones_like(rows))
    ratio = _down(num / safe)
    ratio = torch.where(rows > 0, ratio, torch.where(num > 0, math.inf, 0.0))
    # nan (from nan logits or errors) stays nan-free and certifies nothing
    return torch.where(torch.isnan(ratio), torch.zeros_like(ratio), ratio)


def radius_lower(logits: Tensor, logit_error: Tensor, pairwise: Tensor) -> tuple[Tensor, Tensor]:
    """``(radius (B,), prediction (B,))``: the certified radius of the computed ``logits`` deflated
    for a forward error of at most ``logit_error`` (``(B,)``) so that it is <= the radius of the
    exact logits; ``pairwise`` ``(C, C)`` float64 bounds ``Lip(f_i - f_j)``."""
    pred = logits.argmax(1)  # (B,)
    l64 = logits.to(torch.float64)
    margin = l64.gather(1, pred.unsqueeze(1)) - l64  # (B, C)
    ratio = margin_radius_lower(margin, logit_error, pairwise.to(torch.float64)[pred])
    ratio = ratio.masked_fill(torch.nn.functional.one_hot(pred, logits.shape[1]).bool(), math.inf)
    return ratio.amin(1), pred
