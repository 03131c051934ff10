"""Provable upper bounds on the L2 operator norm of linear and conv2d layers.

Every ``*_bound`` function in this module returns a number that is, up to a
stated and deliberately generous floating-point margin, **guaranteed** to be
at least the exact largest singular value of the layer's linear map.  A bound
that is too small would make every robustness certificate built on it false,
so each step below is either exact or can only *increase* the value returned.

Public API
----------
``spectral_norm_dense(matrix)``
    Largest singular value of an explicit matrix (float64 SVD, no margin).
``linear_norm_bound(weight)``
    Upper bound on ``||W||_2`` for a ``nn.Linear`` weight ``(out, in)``.
``conv2d_norm_bound(weight, input_shape, ...)``
    Upper bound on the norm of ``x -> F.conv2d(x, weight, ...)`` for inputs of
    shape ``(1, *input_shape)`` with zero padding.
``dense_conv_matrix(weight, input_shape, ...)``
    The convolution written out as an explicit float64 matrix (tests, tiny
    layers).

Biases are irrelevant: they do not change the Lipschitz constant of an affine
map, so every function here takes only the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from lipmargin.lipschitz.rounding import mul_pow2

__all__ = [
    "spectral_norm_dense",
    "linear_norm_bound",
    "conv2d_norm_bound",
    "dense_conv_matrix",
]

IntPair = Union[int, Tuple[int, int], Sequence[int]]
PaddingArg = Union[int, Tuple[int, int], Sequence[int], str]

# Machine epsilon of float64 (2**-52, twice the unit roundoff).  Using eps
# instead of the unit roundoff in every error term below is a free factor 2
# of extra safety.
_EPS: float = float(torch.finfo(torch.float64).eps)

# Relative inflation applied to every returned bound.  It covers the handful
# of float64 operations done on the final scalar (sqrt, additions) many times
# over (those cost a few eps ~ 1e-15) and acts as a floor for the error terms.
_REL_MARGIN: float = 1e-9

# LAPACK documents |sigma_hat_i - sigma_i| <= p(m, n) * eps * ||A||_2 for its
# SVD and symmetric eigensolvers, with p(m, n) "a modestly growing function"
# of the dimensions.  We take p(m, n) = _LAPACK_FACTOR * max(m, n) and replace
# ||A||_2 by the larger ||A||_F.  Observed errors are ~1e-15 relative, so this
# is several orders of magnitude more than what actually happens.
_LAPACK_FACTOR: float = 16.0

# method="auto" uses the (essentially exact) dense SVD when its estimated work
# (multiply-adds, see _dense_cost) is below this budget, about 0.5 s on one
# CPU core; otherwise it computes the FFT bound plus the fold variants whose
# estimated work (_fft_cost) is below it, and returns the smallest.
_AUTO_WORK_BUDGET: float = 2.0e9

# 'auto' only tries folding an axis whose output size is at most this: the
# circular bound is already within ~1-2% for longer axes, so the (much more
# expensive) fold would buy almost nothing there.
_FOLD_MAX_OUT: int = 8

# Upper limit (bytes) on the complex work arrays of the FFT bound; frequencies
# are processed in chunks so huge layers do not exhaust memory.
_FFT_CHUNK_BYTES: int = 64 * 2**20


# ---------------------------------------------------------------------------
# argument checking
# ---------------------------------------------------------------------------


def _check_weight(weight: object, ndim: int, name: str = "weight") -> torch.Tensor:
    """Return ``weight`` detached as float64 after validating it."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-D tensor, got shape {tuple(weight.shape)}"
        )
    if weight.is_complex() or not weight.is_floating_point():
        raise ValueError(f"{name} must have a real floating dtype, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must not have a zero-sized dimension, got shape {tuple(weight.shape)}")
    w = weight.detach()
    # NaN/inf would propagate into a NaN bound, and "NaN >= true norm" is
    # False: refuse instead of returning something meaningless.
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or infinite entries")
    # Conversion of float16/bfloat16/float32 to float64 is exact.
    return w.to(torch.float64)


def _is_int(value: object) -> bool:
    # bool is an int subclass but True/False as a stride is surely a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _pair(value: object, name: str, minimum: int) -> Tuple[int, int]:
    """Normalise an int or pair of ints, enforcing ``>= minimum``."""
    if _is_int(value):
        pair = (int(value), int(value))  # type: ignore[arg-type]
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_int(v) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _check_input_shape(input_shape: object) -> Tuple[int, int, int]:
    if (
        not isinstance(input_shape, (tuple, list, torch.Size))
        or len(input_shape) != 3
        or not all(_is_int(v) for v in input_shape)
    ):
        raise ValueError(
            f"input_shape must be a tuple of 3 ints (C_in, H, W), got {input_shape!r}"
        )
    c, h, w = (int(v) for v in input_shape)
    if min(c, h, w) < 1:
        raise ValueError(f"input_shape entries must be >= 1, got {input_shape!r}")
    return c, h, w


@dataclass(frozen=True)
class _ConvSpec:
    """Validated convolution geometry.  Padding is (low, high) per axis."""

    c_out: int
    c_in: int
    groups: int
    kernel: Tuple[int, int]
    size: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    pad: Tuple[Tuple[int, int], Tuple[int, int]]
    out: Tuple[int, int]


def _conv_spec(
    weight: torch.Tensor,
    input_shape: object,
    stride: object,
    padding: object,
    dilation: object,
    groups: object,
    padding_mode: object,
) -> _ConvSpec:
    if padding_mode != "zeros":
        raise ValueError(
            f"padding_mode must be 'zeros' (the only mode supported), got {padding_mode!r}"
        )
    c_out, c_in_g, kh, kw = weight.shape
    c_in, h, w = _check_input_shape(input_shape)
    if not _is_int(groups) or int(groups) < 1:  # type: ignore[arg-type]
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    g = int(groups)  # type: ignore[arg-type]
    if c_out % g != 0:
        raise ValueError(
            f"groups={g} must divide the number of output channels weight.shape[0]={c_out}"
        )
    if c_in % g != 0:
        raise ValueError(f"groups={g} must divide the input channels input_shape[0]={c_in}")
    if c_in_g * g != c_in:
        raise ValueError(
            f"input_shape[0]={c_in} does not match weight.shape[1] * groups = "
            f"{c_in_g} * {g} = {c_in_g * g}"
        )
    st = _pair(stride, "stride", 1)
    dil = _pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        if padding == "valid":
            pad = ((0, 0), (0, 0))
        elif padding == "same":
            if st != (1, 1):
                raise ValueError("padding='same' is only allowed with stride 1 (as in torch)")
            # torch puts the odd extra element of 'same' padding at the end.
            tot = (dil[0] * (kh - 1), dil[1] * (kw - 1))
            pad = ((tot[0] // 2, tot[0] - tot[0] // 2), (tot[1] // 2, tot[1] - tot[1] // 2))
        else:
            raise ValueError(
                f"padding must be an int >= 0, a pair of them, 'valid' or 'same', got {padding!r}"
            )
    else:
        p = _pair(padding, "padding", 0)
        pad = ((p[0], p[0]), (p[1], p[1]))
    out = []
    for ax, (n, k) in enumerate(((h, kh), (w, kw))):
        span = dil[ax] * (k - 1) + 1
        padded = n + pad[ax][0] + pad[ax][1]
        if padded < span:
            raise ValueError(
                f"input_shape={tuple(input_shape)} gives an empty output: padded size {padded} "  # type: ignore[arg-type]
                f"along axis {ax + 1} is smaller than the dilated kernel span {span} "
                "(increase the input size or the padding)"
            )
        out.append((padded - span) // st[ax] + 1)
    return _ConvSpec(
        c_out=c_out,
        c_in=c_in,
        groups=g,
        kernel=(kh, kw),
        size=(h, w),
        stride=st,
        dilation=dil,
        pad=pad,
        out=(out[0], out[1]),
    )


# ---------------------------------------------------------------------------
# dense reference
# ---------------------------------------------------------------------------


def spectral_norm_dense(matrix: torch.Tensor) -> float:
    """Largest singular value of a 2-D matrix, computed by a float64 SVD.

    This is the plain numerical value with *no* safety margin; use
    :func:`linear_norm_bound` for a guaranteed upper bound.
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
    """
    w = _check_weight(weight, 4)
    spec = _conv_spec(w, input_shape, stride, padding, dilation, groups, "zeros")
    return _dense_from_spec(w, spec)


# ---------------------------------------------------------------------------
# FFT (circular embedding) bound
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _AxisPlan:
    """Stride-1 polyphase rewrite of one spatial axis.

    ``live[r][q]``: whether tap ``q`` of polyphase component ``r`` can ever
    multiply a real (non-padding) input pixel for some kept output.  ``qmin``
    and ``qmax`` bound the live taps, ``n_circ`` is the smallest circular
    period for which the restriction argument holds (see ``_axis_plan``).
    ``any_live`` False means the layer never reads a real pixel (zero map).
    """

    stride: int
    kq: int
    live: Tuple[Tuple[bool, ...], ...]
    qmin: int
    qmax: int
    n_circ: int
    any_live: bool


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _axis_plan(n: int, k: int, s: int, d: int, p_lo: int, p_hi: int, out: int) -> _AxisPlan:
    """Geometry of one axis; see ``conv2d_norm_bound`` for the maths.

    Padded input ``xp`` (length ``n + p_lo + p_hi``, real pixels at
    ``[p_lo, p_lo + n)``); output ``i`` reads ``xp[s*i + a]`` for dilated tap
    ``a = d*t`` (``t < k``).  Writing ``a = s*q + r`` gives
    ``xp[s*(i + q) + r] = P_r[i + q]`` with polyphase components
    ``P_r[m] = xp[s*m + r]``: a stride-1 correlation in ``q``.
    """
    ke = d * (k - 1) + 1
    kq = _ceil_div(ke, s)
    live = [[False] * kq for _ in range(s)]
    read_lo: list[int] = []
    read_hi: list[int] = []
    qmins: list[int] = []
    qmaxs: list[int] = []
    for r in range(s):
        # Real pixels of component r: s*m + r in [p_lo, p_lo + n).
        lo_r = _ceil_div(p_lo - r, s)
        hi_r = _ceil_div(p_lo + n - r, s)
        qs = []
        for q in range(kq):
            a = s * q + r
            if a >= ke or a % d != 0:
                continue  # structural zero (kernel padding or dilation hole)
            # Outputs i in [0, out) read P_r[i + q]; live iff [q, q + out)
            # meets the real support [lo_r, hi_r).
            if lo_r < hi_r and q < hi_r and q + out > lo_r:
                live[r][q] = True
                qs.append(q)
        if qs:
            qmins.append(min(qs))
            qmaxs.append(max(qs))
            # Only P_r[m] with m in [min q, out - 1 + max q] is ever read;
            # other pixels give zero columns, which do not change the norm.
            read_lo.append(max(lo_r, min(qs)))
            read_hi.append(min(hi_r, out + max(qs)))
    if not qmins:
        return _AxisPlan(s, kq, tuple(tuple(x) for x in live), 0, 0, 1, False)
    qmin, qmax = min(qmins), max(qmaxs)
    lo, hi = min(read_lo), max(read_hi)
    # Indices touched by kept outputs with live taps: v = i + q in [vlo, vhi).
    vlo, vhi = qmin, out + qmax
    # Circular period N must (a) keep the kept outputs distinct: N >= out;
    # (b) keep the read pixels distinct and stop any touched index outside
    # [lo, hi) from wrapping onto a read pixel:
    #   v in [vlo, lo): v + N >= hi  <=  N >= hi - vlo,
    #   v in [hi, vhi): v - N < lo   <=  N >= vhi - lo,
    # and hi - lo <= hi - vlo since vlo <= lo.
    n_circ = max(out, hi - vlo, vhi - lo, 1)
    return _AxisPlan(s, kq, tuple(tuple(x) for x in live), qmin, qmax, n_circ, True)


def _polyphase_kernel(w: torch.Tensor, spec: _ConvSpec, plans: Tuple[_AxisPlan, _AxisPlan]) -> torch.Tensor:
    """Stride-1 kernel of the polyphase rewrite, dead taps zeroed and cropped.

    Returns ``(groups, C_out/groups, C', Qh, Qw)`` where ``C'`` enumerates
    (input channel, row phase, column phase) triples that have a live tap.
    """
    ph, pw = plans
    c_out, c_in_g, kh, kw = w.shape
    (dh, dw), (sh, sw) = spec.dilation, spec.stride
    # Dilation == ordinary kernel with zeros inserted (exact).
    wd = torch.zeros(
        c_out, c_in_g, ph.kq * sh, pw.kq * sw, dtype=w.dtype, device=w.device
    )
    wd[:, :, : dh * (kh - 1) + 1 : dh, : dw * (kw - 1) + 1 : dw] = w
    # a = s*q + r  <->  (q, r) after reshaping the tap axis to (kq, s).
    wd = wd.view(c_out, c_in_g, ph.kq, sh, pw.kq, sw).permute(0, 1, 3, 5, 2, 4)
    mh = torch.tensor(ph.live, dtype=w.dtype, device=w.device)  # (sh, kq_h)
    mw = torch.tensor(pw.live, dtype=w.dtype, device=w.device)  # (sw, kq_w)
    # Dead taps only ever multiply padding zeros in the true operator, so
    # removing them leaves the true operator unchanged.
    wd = wd * mh[:, None, :, None] * mw[None, :, None, :]
    wd = wd[..., ph.qmin : ph.qmax + 1, pw.qmin : pw.qmax + 1]
    # Phases with no live tap at all are all-zero input columns: drop them.
    keep = (mh.sum(1)[:, None] * mw.sum(1)[None, :]) > 0  # (sh, sw)
    wd = wd[:, :, keep]  # (c_out, c_in_g, n_keep, Qh, Qw)
    qh, qw = wd.shape[-2:]
    wd = wd.reshape(spec.groups, c_out // spec.groups, -1, qh, qw)
    return wd


def _phases(taps: int, n: int, half: bool, device: torch.device) -> torch.Tensor:
    """``exp(-2 pi i q w / n)`` for taps ``q < taps`` and frequencies ``w``
    (``w < n``, or ``w <= n // 2`` if ``half``).

    ``(q * w) mod n`` is reduced in exact integer arithmetic first, so the
    angle is accurate to a few ulps of 2*pi whatever the size.
    """
    nf = n // 2 + 1 if half else n
    qq = torch.arange(taps, dtype=torch.int64, device=device)[:, None]
    ww = torch.arange(nf, dtype=torch.int64, device=device)[None, :]
    ang = (qq * ww % n).to(torch.float64) * (-2.0 * math.pi / n)
    return torch.polar(torch.ones_like(ang), ang)


def _fft_bound_for_period(k: torch.Tensor, n_h: int, n_w: int) -> float:
    """Upper bound on the norm of the circular conv with kernel ``k`` on
    an ``n_h x n_w`` torus; ``k`` is ``(G, O, C, Qh, Qw)`` float64.

    The circular multi-channel convolution is block-diagonalised by the 2-D
    DFT: its singular values are exactly those of the ``O x C`` matrices
    ``K_hat(w) = sum_{a,b} K[:, :, a, b] exp(-2 pi i (a w1/n_h + b w2/n_w))``.
    For a real kernel ``K_hat(-w) = conj(K_hat(w))`` (same singular values),
    so half of the frequencies suffice.
    """
    g, o, c, qh, qw = k.shape
    amax = float(k.abs().max())
    if amax == 0.0:
        return 0.0
    # Scale by a power of two (exact) so that the Gram matrices can neither
    # overflow nor underflow (a flushed-to-zero Gram would give a bound that
    # is too small); the scale is multiplied back, exactly, at the end.
    exponent = math.frexp(amax)[1]
    k = k * math.ldexp(1.0, -exponent)
    # Halve the longer axis (w and -w have conjugate symbols).
    half_h = n_h > n_w
    eh = _phases(qh, n_h, half_h, k.device)  # (qh, n_h or n_h//2+1)
    ew = _phases(qw, n_w, not half_h, k.device)
    nfh, nfw = eh.shape[1], ew.shape[1]
    kc = k.to(torch.complex128)
    m = min(o, c)
    # Chunk over rows of frequencies to bound memory (K_hat and its Gram).
    per_row = g * nfw * (o * c + m * m) * 16
    rows = max(1, min(nfh, _FFT_CHUNK_BYTES // max(per_row, 1)))
    lam_max = 0.0
    for start in range(0, nfh, rows):
        e = eh[:, start : start + rows]
        khat = torch.einsum("gocab,ax,by->gxyoc", kc, e, ew)
        khat = khat.reshape(g, -1, o, c)
        # sigma_max(K)^2 = lambda_max of the smaller Gram matrix.
        gram = khat @ khat.mH if o <= c else khat.mH @ khat
        lam = float(torch.linalg.eigvalsh(gram)[..., -1].max())
        if not math.isfinite(lam):
            # Overflow (weights ~1e150): max() would silently skip a NaN, so
            # return the only safe answer.
            return math.inf
        lam_max = max(lam_max, lam)
    # --- rounding margin, everything expressed through
    # F = sum_taps ||K[:, :, a, b]||_F >= ||K_hat(w)||_F for every w and
    # >= the Frobenius norm of the entrywise sum_taps |K|.
    taps = qh * qw
    frob = float(torch.linalg.vector_norm(k, dim=(1, 2)).sum(dim=(-2, -1)).max())
    frob *= 1.0 + 1e-12
    # (1) DFT by explicit sums: each phase has error <= ~30 eps (angle and
    #     cos/sin), each entry is a sum of `taps` products, so entrywise
    #     |K_hat_computed - K_hat| <= (64 + 4*taps) eps sum_taps |K|; we use
    #     twice that.  Weyl: sigma_max moves by at most its Frobenius norm.
    e_dft = (128.0 + 8.0 * taps) * _EPS * frob
    # (2) Gram product (inner dimension max(o, c), complex: |dG| <=
    #     ~4 (n + 2) eps |K||K|^H) plus eigvalsh backward error
    #     (LAPACK: p(m) eps ||G||, p taken as 16 m); both <= const * eps * F^2.
    e_gram = (8.0 * (max(o, c) + 2) + _LAPACK_FACTOR * m + 8.0) * _EPS * frob * frob
    sigma = math.sqrt(max(lam_max, 0.0) + e_gram) + e_dft
    return math.ldexp(sigma * (1.0 + _REL_MARGIN), exponent)


def _plans(spec: _ConvSpec) -> Tuple[_AxisPlan, _AxisPlan]:
    ph, pw = (
        _axis_plan(
            spec.size[ax],
            spec.kernel[ax],
            spec.stride[ax],
            spec.dilation[ax],
            spec.pad[ax][0],
            spec.pad[ax][1],
            spec.out[ax],
        )
        for ax in (0, 1)
    )
    return ph, pw


def _fft_cost(spec: _ConvSpec, plans: Tuple[_AxisPlan, _AxisPlan]) -> float:
    """Rough work estimate (complex multiply-adds) of ``_fft_bound``."""
    ph, pw = plans
    phases = sum(any(r) for r in ph.live) * sum(any(r) for r in pw.live)
    o = spec.c_out // spec.groups
    c = (spec.c_in // spec.groups) * phases
    m, n = min(o, c), max(o, c)
    nh, nw = ph.n_circ, pw.n_circ
    freqs = min(nh * (nw // 2 + 1), nw * (nh // 2 + 1))
    return float(spec.groups) * freqs * (m * m * n + m**3)


def _fft_bound(w: torch.Tensor, spec: _ConvSpec, extra_periods: int = 0) -> float:
    ph, pw = _plans(spec)
    if not (ph.any_live and pw.any_live):
        # No output ever reads a real pixel: the operator is exactly zero.
        return 0.0
    k = _polyphase_kernel(w, spec, (ph, pw))
    # Every period >= n_circ gives a valid bound (the restriction argument
    # only needs N >= n_circ); the grid maximum of the symbol varies with N,
    # so the minimum over a few periods is a free, still valid, improvement.
    best = math.inf
    for dh in range(extra_periods + 1):
        for dw in range(extra_periods + 1):
            best = min(best, _fft_bound_for_period(k, ph.n_circ + dh, pw.n_circ + dw))
    return best


def _transpose_spec(w: torch.Tensor, spec: _ConvSpec) -> Tuple[torch.Tensor, _ConvSpec]:
    """Swap the two spatial axes (a permutation of inputs and outputs, so
    the operator norm is unchanged)."""
    return w.transpose(2, 3), _ConvSpec(
        c_out=spec.c_out,
        c_in=spec.c_in,
        groups=spec.groups,
        kernel=spec.kernel[::-1],
        size=spec.size[::-1],
        stride=spec.stride[::-1],
        dilation=spec.dilation[::-1],
        pad=spec.pad[::-1],
        out=spec.out[::-1],
    )


def _fold_w(w: torch.Tensor, spec: _ConvSpec) -> Optional[Tuple[torch.Tensor, _ConvSpec]]:
    """Rewrite the conv exactly as a conv along H only, W folded into channels.

    Output column ``j`` reads input column ``u = s*j + d*b - p_lo`` through
    tap ``b``.  With ``S[j, u, b] = [s*j + d*b - p_lo == u]`` the folded
    weight ``B[(o, j), (c, u), a] = sum_b K[o, c, a, b] S[j, u, b]`` has at
    most one nonzero term per entry (exact), and
    ``y[o, i, j] = sum_{(c,u),a} B[(o,j),(c,u),a] x_padH[c, s_h*i + d_h*a, u]``
    is the same operator up to a permutation of inputs and outputs.  Columns
    ``u`` that no output reads are dropped (zero columns).  Returns ``None``
    if no column is read (the operator is zero).
    """
    o, cg, kh, kw = w.shape
    n, n_out = spec.size[1], spec.out[1]
    s, d, p_lo = spec.stride[1], spec.dilation[1], spec.pad[1][0]
    j = torch.arange(n_out, device=w.device)[:, None, None]
    u = torch.arange(n, device=w.device)[None, :, None]
    b = torch.arange(kw, device=w.device)[None, None, :]
    sel = (s * j + d * b - p_lo == u).to(w.dtype)  # (n_out, n, kw)
    read = sel.sum(dim=(0, 2)) > 0
    n_read = int(read.sum())
    if n_read == 0:
        return None
    folded = torch.einsum("ocab,jub->ojcua", w, sel[:, read, :])
    folded = folded.reshape(o * n_out, cg * n_read, kh, 1)
    return folded, _folded_spec(spec, n_read)


def _folded_spec(spec: _ConvSpec, n_read: int) -> _ConvSpec:
    """Geometry of ``_fold_w``'s rewrite when ``n_read`` columns are read."""
    return _ConvSpec(
        c_out=spec.c_out * spec.out[1],
        c_in=spec.c_in * n_read,
        groups=spec.groups,
        kernel=(spec.kernel[0], 1),
        size=(spec.size[0], 1),
        stride=(spec.stride[0], 1),
        dilation=(spec.dilation[0], 1),
        pad=(spec.pad[0], (0, 0)),
        out=(spec.out[0], 1),
    )


def _folded(w: torch.Tensor, spec: _ConvSpec, axis: int) -> Optional[Tuple[torch.Tensor, _ConvSpec]]:
    """Fold spatial ``axis`` (0 = H, 1 = W) into the channels (exact)."""
    if axis == 0:
        w, spec = _transpose_spec(w, spec)
    return _fold_w(w, spec)


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


def conv2d_norm_bound(
    weight: torch.Tensor,
    input_shape: Tuple[int, int, int],
    *,
    stride: IntPair = 1,
    padding: PaddingArg = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    method: Literal["auto", "dense", "fft", "fft_fold_h", "fft_fold_w"] = "auto",
    extra_periods: int = 0,
) -> float:
    """Guaranteed upper bound on the L2 operator norm of a zero-padded conv2d.

    The map is ``x -> F.conv2d(x, weight, None, stride, padding, dilation,
    groups)`` for ``x`` of shape ``(1, *input_shape)``; ``weight`` is
    ``(C_out, C_in/groups, kh, kw)`` and ``input_shape`` is ``(C_in, H, W)``.
    ``padding`` may be an int, a pair, ``'valid'`` or ``'same'`` (stride 1,
    torch's convention).  Only ``padding_mode='zeros'`` is supported.

    ``method`` (every choice returns a valid upper bound):
      * ``'dense'``: exact largest singular value of :func:`dense_conv_matrix`
        (per group) plus the LAPACK margin of :func:`linear_norm_bound`.
        Memory and time grow like the dense matrix: tiny layers only.
      * ``'fft'``: the circular-embedding bound below; scales to real layers.
      * ``'fft_fold_h'`` / ``'fft_fold_w'``: first fold that spatial axis
        into the channels (an exact rewrite, see ``_fold_w``), then the FFT
        bound along the other axis.  Tighter when that axis is small.
      * ``'auto'`` (default): ``'dense'`` if its estimated cost is below
        ``_AUTO_WORK_BUDGET`` (about 1000 x 1000 per group); otherwise the
        FFT bound and each fold variant under that budget (only for axes
        with at most ``_FOLD_MAX_OUT`` outputs), returning the minimum (a minimum of valid upper bounds is a valid upper bound).

    The weight is first scaled exactly by a power of two so that its largest
    entry is in ``[1/2, 1)`` (``_scaled_bound``): subnormal and huge weights
    get sound bounds; ``inf`` only if the bound itself exceeds float64.
    ``extra_periods``: for the FFT variants, also try the periods ``N + 1 ..
    N + extra_periods`` on each axis and keep the smallest (each is a valid
    bound); costs ``(extra_periods + 1)**2`` times more.

    Why the FFT bound is an upper bound (each step exact or norm-nonincreasing):

    1. Groups: the operator is block diagonal over groups (disjoint input and
       output channels), so its norm is the max over groups.  Exact; the
       groups are stacked as a batch.
    2. Dilation: a dilated kernel is the ordinary kernel with zeros inserted.
       Exact.
    3. Stride ``s`` (polyphase): with the zero-padded input ``xp`` and taps
       ``a = s*q + r``, output ``i`` equals ``sum_{r,q} K_r[q] P_r[i+q]``
       where ``P_r[m] = xp[s*m + r]``: a stride-1 correlation of the
       ``s_h*s_w`` phase images (as extra input channels) with sub-kernels of
       ``ceil(k_eff/s)`` taps.  ``x -> (P_r)`` is an isometric embedding
       (padding entries are zeros) followed by a permutation.
    4. Dead taps / unread pixels: a tap that, for every kept output, only
       meets padding is removed; pixels no kept output reads are dropped
       (zero columns).  Both leave the true operator unchanged.
    5. Circular embedding: place the phase images on an ``N_h x N_w`` torus
       (zeros elsewhere) and run the circular correlation.  ``N`` is chosen
       per axis (``_axis_plan``) so that kept outputs are distinct and no
       index read by a kept output wraps onto a real pixel; then the true
       operator equals ``S C E`` with ``E`` an isometric embedding and ``S`` a
       coordinate selection, so ``||true|| <= ||C||``.
    6. ``||C||`` is exactly ``max_w ||K_hat(w)||_2`` (the 2-D DFT block
       diagonalises circular multi-channel convolutions), computed in
       float64 as the top eigenvalue of the smaller Gram matrix per frequency.
    7. Rounding: explicit, generous bounds on the DFT, Gram and eigensolver
       errors are added (``_fft_bound_for_period``), then a relative
       ``1e-9``.  Their total is ~1e-9 relative for real layers.

    The circular bound is exact for the circular operator and usually within
    a few percent of the zero-padded norm when the output is several times
    larger than the kernel; it is looser when they are comparable, which is
    what the fold and dense variants used by ``'auto'`` fix for small layers.
    """
    w = _check_weight(weight, 4)
    spec = _conv_spec(w, input_shape, stride, padding, dilation, groups, padding_mode)
    if method not in ("auto", "dense", "fft", "fft_fold_h", "fft_fold_w"):
        raise ValueError(
            "method must be one of 'auto', 'dense', 'fft', 'fft_fold_h', "
            f"'fft_fold_w', got {method!r}"
        )
    if not _is_int(extra_periods) or extra_periods < 0:
        raise ValueError(f"extra_periods must be an int >= 0, got {extra_periods!r}")
    with torch.no_grad():
        return _scaled_bound(w, lambda ws: _conv2d_bound_normal(ws, spec, method, extra_periods))


def _conv2d_bound_normal(w: torch.Tensor, spec: _ConvSpec, method: str, extra_periods: int) -> float:
    """:func:`conv2d_norm_bound` for a float64 weight whose largest entry is in [1/2, 1)."""
    if method == "dense":
        return _dense_bound(w, spec)
    if method == "fft":
        return _fft_bound(w, spec, extra_periods)
    if method in ("fft_fold_h", "fft_fold_w"):
        folded = _folded(w, spec, 0 if method == "fft_fold_h" else 1)
        return 0.0 if folded is None else _fft_bound(*folded, extra_periods)
    # auto
    if _dense_cost(spec) <= _AUTO_WORK_BUDGET:
        # Exact up to the ~1e-10 margin: nothing else can beat it.
        return _dense_bound(w, spec)
    best = _fft_bound(w, spec, extra_periods)
    for axis in (0, 1):
        if spec.out[axis] > _FOLD_MAX_OUT:
            continue
        # Folding an axis makes the per-frequency matrices about
        # (output size) x (input size) along it larger: estimate first.
        sw, ss = _transpose_spec(w, spec) if axis == 0 else (w, spec)
        fs = _folded_spec(ss, ss.size[1])
        fold_cost = _fft_cost(fs, _plans(fs)) * (extra_periods + 1) ** 2
        if fold_cost <= _AUTO_WORK_BUDGET:
            folded = _fold_w(sw, ss)
            if folded is None:
                return 0.0
            best = min(best, _fft_bound(*folded, extra_periods))
    return best
