"""Sound norm bounds from a dense float64 SVD: explicit matrices, ``nn.Linear`` weights, tiny convs.

Every ``*_bound`` here returns a number that is, up to a stated and deliberately generous
floating-point margin, **guaranteed** to be at least the exact largest singular value of the
layer's linear map (a bound that is too small would make every certificate built on it false).

- ``spectral_norm_dense(matrix)``: largest singular value of an explicit matrix (float64 SVD, no
  margin: a reference value, not a bound).
- ``linear_norm_bound(weight)``: upper bound on ``||W||_2`` for a ``(out, in)`` weight.
- ``dense_conv_matrix(weight, input_shape, ...)``: a zero-padded conv2d written out as an explicit
  float64 matrix (tests, tiny layers); ``_dense_bound`` is the conv bound built from it.

Biases are irrelevant: they do not change the Lipschitz constant of an affine map.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from lipmargin.lipschitz.rounding import mul_pow2
from lipmargin.lipschitz.spec import _EPS, _LAPACK_FACTOR, _REL_MARGIN, IntPair, PaddingArg, _check_weight, _conv_spec, _ConvSpec

__all__ = ["spectral_norm_dense", "linear_norm_bound", "dense_conv_matrix"]


def spectral_norm_dense(matrix: torch.Tensor) -> float:
    """Largest singular value of a 2-D matrix, computed by a float64 SVD.

    This is the plain numerical value with *no* safety margin; use
    :func:`linear_norm_bound` for a guaranteed upper bound.

    >>> spectral_norm_dense(torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    4.0
    """
    m = _check_weight(matrix, 2, "matrix")
    return float(torch.linalg.svdvals(m)[0])


def _lapack_margin(sigma_hat: float, frob: float, dims: Tuple[int, int]) -> float:
    """Inflate a float64-SVD singular value into a safe upper bound.

    ``sigma_hat + _LAPACK_FACTOR * max(m, n) * eps * ||A||_F`` covers the
    documented LAPACK backward error (see ``_LAPACK_FACTOR``); the extra
    relative ``_REL_MARGIN`` covers the arithmetic on the scalars here.
    """
    err = _LAPACK_FACTOR * max(dims) * _EPS * frob
    return (sigma_hat + err) * (1.0 + _REL_MARGIN)


# Absolute floor (in the scaled units of _scaled_bound, where the largest
# entry is in [1/2, 1)) added to every bound.  Scaling a float64 weight by a
# power of two is exact except for entries that underflow, each off by at most
# 2**-1074; a weight entry occurs in at most (output positions) rows of the
# operator, so the operator moves by less than numel * positions * 2**-1074,
# far below 2**-900 for any layer that fits in memory (numel * positions <
# 2**170).
_ABS_FLOOR_SCALED: float = 2.0**-900


def _scaled_bound(w: torch.Tensor, bound_fn: Callable[[torch.Tensor], float]) -> float:
    """``bound_fn`` applied to ``w`` scaled into the normal range, scaled back soundly.

    ``w = W' * 2**e`` with ``max |W'|`` in ``[1/2, 1)`` (``math.frexp`` of the
    largest entry).  Operator norms are positively homogeneous, so
    ``||W|| = ||W'|| * 2**e`` exactly.  ``W'`` is computed with exact
    power-of-two multiplications (``mul_pow2``; only underflowing entries
    round, covered by ``_ABS_FLOOR_SCALED``).  The scaled bound is sound
    because ``W'`` has neither subnormal Gram entries nor overflow; it gets the
    floor added, then ``math.ldexp`` scales it back (exact unless the result is
    subnormal: one rounding, covered by one ``nextafter`` step up; overflow
    gives ``inf``, a sound if useless answer).
    """
    amax = float(w.abs().max())
    if amax == 0.0:
        return 0.0
    exponent = math.frexp(amax)[1]
    scaled = mul_pow2(w, torch.tensor(-exponent))
    b = bound_fn(scaled)
    if not math.isfinite(b):
        return math.inf
    if b == 0.0:
        # The inner bounds return 0 only for a structurally zero operator (no
        # tap ever reads a pixel), whatever the weight values: exactly 0.
        return 0.0
    b = math.nextafter(b + _ABS_FLOOR_SCALED, math.inf)  # the addition rounds once
    try:
        return math.nextafter(math.ldexp(b, exponent), math.inf)
    except OverflowError:
        return math.inf


def linear_norm_bound(weight: torch.Tensor) -> float:
    """Guaranteed upper bound on ``||W||_2`` for a ``(out, in)`` weight.

    Soundness: ``W`` is converted to float64 exactly, its largest singular
    value ``s`` is computed by LAPACK's SVD, which is backward stable:
    ``s`` is an exact singular value of ``W + E`` with
    ``||E||_2 <= p(m, n) * eps * ||W||_2``, so by Weyl's inequality
    ``|s - ||W||_2| <= p(m, n) * eps * ||W||_2``.  We add
    ``16 * max(m, n) * eps * ||W||_F`` (``>= ||W||_2``) and then multiply by
    ``1 + 1e-9``.  Observed SVD errors are ~1e-15 relative, far inside this.
    Tightness: the added margin is at most about
    ``16 * max(m, n) * sqrt(min(m, n)) * 2.2e-16 + 1e-9`` relative, i.e. below
    ``1e-8`` for any layer up to tens of thousands of units.

    Extreme magnitudes (subnormal or ~1e300 entries) are handled by
    :func:`_scaled_bound`: the bound is computed for ``W`` scaled exactly by a
    power of two, then scaled back and rounded up.

    >>> w = torch.tensor([[3.0, 0.0], [0.0, -4.0]])  # ||W||_2 = 4 by hand
    >>> b = linear_norm_bound(w)
    >>> b >= 4.0, b <= 4.0 * (1 + 1e-8)
    (True, True)
    """
    return _scaled_bound(_check_weight(weight, 2), _linear_norm_bound_normal)


def _linear_norm_bound_normal(w: torch.Tensor) -> float:
    """:func:`linear_norm_bound` for a float64 weight whose largest entry is in [1/2, 1)."""
    sigma = float(torch.linalg.svdvals(w)[0])
    frob = float(torch.linalg.vector_norm(w))
    if not (math.isfinite(sigma) and math.isfinite(frob)):
        # Only reachable through float64 overflow (entries ~1e154); NaN would
        # compare False against everything, so return the safe value.
        return math.inf
    return _lapack_margin(sigma, frob, (w.shape[0], w.shape[1]))


def _pad_input(x: torch.Tensor, spec: _ConvSpec) -> torch.Tensor:
    (ph0, ph1), (pw0, pw1) = spec.pad
    return F.pad(x, (pw0, pw1, ph0, ph1))


def _dense_from_spec(w: torch.Tensor, spec: _ConvSpec, chunk: int = 2048) -> torch.Tensor:
    """Dense float64 matrix of the conv described by ``spec`` (weight ``w``)."""
    c_in, (h, wd) = spec.c_in, spec.size
    n_in = c_in * h * wd
    n_out = spec.c_out * spec.out[0] * spec.out[1]
    mat = torch.empty(n_out, n_in, dtype=torch.float64, device=w.device)
    # Push the identity basis through the convolution, in chunks so the
    # im2col buffers stay small.  Each output entry is a sum of products in
    # which at most one factor pair is (weight, 1.0) and all the others are
    # (weight, 0.0), so every matrix entry is an exact copy of a weight.
    for start in range(0, n_in, chunk):
        stop = min(n_in, start + chunk)
        basis = torch.zeros(stop - start, n_in, dtype=torch.float64, device=w.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        x = _pad_input(basis.view(-1, c_in, h, wd), spec)
        y = F.conv2d(x, w, stride=spec.stride, dilation=spec.dilation, groups=spec.groups)
        mat[:, start:stop] = y.reshape(stop - start, n_out).T
    return mat


def dense_conv_matrix(
    weight: torch.Tensor,
    input_shape: Tuple[int, int, int],
    stride: IntPair = 1,
    padding: PaddingArg = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """The zero-padded ``conv2d`` as an explicit float64 matrix.

    Returns ``M`` of shape ``(C_out*H_out*W_out, C_in*H*W)`` such that
    ``M @ x.flatten() == F.conv2d(x[None], weight, None, stride, padding,
    dilation, groups).flatten()`` for ``x`` of shape ``input_shape`` (both in
    C-order).  Memory is ``8 * rows * cols`` bytes: meant for tests and tiny
    layers only.

    >>> dense_conv_matrix(torch.tensor([[[[1.0, 2.0]]]]), (1, 1, 3))  # a 1x2 kernel on a 1x3 row
    tensor([[1., 2., 0.],
            [0., 1., 2.]], dtype=torch.float64)
    """
    w = _check_weight(weight, 4)
    spec = _conv_spec(w, input_shape, stride, padding, dilation, groups, "zeros")
    return _dense_from_spec(w, spec)


def _dense_bound(w: torch.Tensor, spec: _ConvSpec) -> float:
    """Exact dense SVD per group plus the LAPACK margin."""
    g = spec.groups
    og = spec.c_out // g
    sub = _ConvSpec(
        c_out=og,
        c_in=spec.c_in // g,
        groups=1,
        kernel=spec.kernel,
        size=spec.size,
        stride=spec.stride,
        dilation=spec.dilation,
        pad=spec.pad,
        out=spec.out,
    )
    rows = og * spec.out[0] * spec.out[1]
    cols = (spec.c_in // g) * spec.size[0] * spec.size[1]
    best = 0.0
    # The exactness argument of _dense_from_spec is for CPU conv2d (im2col +
    # GEMM); GPU libraries may pick other algorithms, and these matrices are
    # small anyway.
    w = w.cpu()
    # Block-diagonal over groups: the norm is the max over the blocks.
    for gi in range(g):
        mat = _dense_from_spec(w[gi * og : (gi + 1) * og], sub)
        sigma = float(torch.linalg.svdvals(mat)[0])
        frob = float(torch.linalg.vector_norm(mat))
        if not (math.isfinite(sigma) and math.isfinite(frob)):
            return math.inf  # overflow: see _fft_bound_for_period
        best = max(best, _lapack_margin(sigma, frob, (rows, cols)))
    return best


def _dense_cost(spec: _ConvSpec) -> float:
    g = spec.groups
    rows = (spec.c_out // g) * spec.out[0] * spec.out[1]
    cols = (spec.c_in // g) * spec.size[0] * spec.size[1]
    # Measured: a real SVD costs about as much per m^2 n as the complex
    # Gram + eigvalsh of the FFT path.
    return g * float(min(rows, cols)) ** 2 * max(rows, cols)
