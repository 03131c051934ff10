"""A sound upper bound on the L2 operator norm of a zero-padded conv2d, choosing the tightest method."""

from __future__ import annotations

from typing import Literal, Tuple

import torch

from lipmargin.lipschitz.conv_fft import _fft_bound, _fft_cost, _fold_w, _folded, _folded_spec, _plans, _transpose_spec
from lipmargin.lipschitz.dense import _dense_bound, _dense_cost, _scaled_bound
from lipmargin.lipschitz.spec import IntPair, PaddingArg, _check_weight, _conv_spec, _is_int

__all__ = ["conv2d_norm_bound"]

# method="auto" uses the (essentially exact) dense SVD when its estimated work
# (multiply-adds, see _dense_cost) is below this budget, about 0.5 s on one
# CPU core; otherwise it computes the FFT bound plus the fold variants whose
# estimated work (_fft_cost) is below it, and returns the smallest.
_AUTO_WORK_BUDGET: float = 2.0e9

# 'auto' only tries folding an axis whose output size is at most this: the
# circular bound is already within ~1-2% for longer axes, so the (much more
# expensive) fold would buy almost nothing there.
_FOLD_MAX_OUT: int = 8


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

    A 3x3 kernel with a single tap ``-2.5`` only copies pixels (scaled): its norm is 2.5 by hand.

    >>> weight = torch.zeros(1, 1, 3, 3)
    >>> weight[0, 0, 1, 1] = -2.5
    >>> [round(conv2d_norm_bound(weight, (1, 8, 8), padding=1, method=m), 6) for m in ("dense", "fft")]
    [2.5, 2.5]
    >>> conv2d_norm_bound(weight, (1, 8, 8), padding=1) >= 2.5
    True
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
