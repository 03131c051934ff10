"""The circular-embedding (polyphase + FFT) bound on a zero-padded conv2d, and the exact fold.

The maths, step by step, is in :func:`lipmargin.lipschitz.conv.conv2d_norm_bound`'s docstring;
every step here is exact or can only increase the value returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from lipmargin.lipschitz.spec import _EPS, _LAPACK_FACTOR, _REL_MARGIN, _ConvSpec

# Upper limit (bytes) on the complex work arrays of the FFT bound; frequencies
# are processed in chunks so huge layers do not exhaust memory.
_FFT_CHUNK_BYTES: int = 64 * 2**20


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
