"""Argument checks, convolution geometry and the float64 error constants of the sound bounds.

Shared by :mod:`lipmargin.lipschitz.dense`, :mod:`lipmargin.lipschitz.conv_fft` and
:mod:`lipmargin.lipschitz.conv`; nothing here is public API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch

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
