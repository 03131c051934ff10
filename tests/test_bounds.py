"""Tests for the sound norm bounds (lipmargin.lipschitz.dense / .conv): every bound must be >= the exact norm.

The reference ("truth") is the float64 SVD of the operator written out as a
dense matrix BY THE TEST (the conv applied to every basis vector, independently
of the library's own dense_conv_matrix), or a hand-derived value, or a
power-iteration lower bound run on the real conv / matrix.  A bound below it is the worst possible bug (false
certificates), so soundness is checked for every method on every layer, and
tightness for the default method.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F

from lipmargin.lipschitz import (
    conv2d_norm_bound,
    dense_conv_matrix,
    linear_norm_bound,
    spectral_norm_dense,
)

METHODS = ("auto", "dense", "fft", "fft_fold_h", "fft_fold_w")
# Rounding slack allowed when comparing a bound with a float64 "truth" that is
# itself computed with rounding (both ~1e-15 relative; the bounds carry a
# deliberate margin of >= 1e-9, so this never hides a real violation).
REL_TOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Any:
    # Batched LAPACK eigensolvers in MKL can slow down by 100x when their
    # OpenMP threads compete for oversubscribed cores (shared CI runners);
    # these matrices are small, so one thread is also the fastest choice.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _conv_matrix(weight: torch.Tensor, input_shape: Tuple[int, int, int], **kw: Any) -> torch.Tensor:
    """The conv as a dense float64 matrix built here: F.conv2d (with its own padding) applied to
    every input basis vector, one column each."""
    n = input_shape[0] * input_shape[1] * input_shape[2]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    out = F.conv2d(basis, weight.double(), None, **kw)  # (n, C_out, H', W')
    return out.reshape(n, -1).T  # (out_dim, in_dim)


def _truth(weight: torch.Tensor, input_shape: Tuple[int, int, int], **kw: Any) -> float:
    return float(torch.linalg.svdvals(_conv_matrix(weight, input_shape, **kw))[0])


def _matrix_power_lower(w: torch.Tensor, iters: int = 2000) -> float:
    """``||W x|| / ||x||`` after power iteration on ``W^T W``: a rigorous lower bound on ``||W||``
    (up to float64 rounding of one matrix-vector product), independent of any SVD."""
    w = w.double()
    x = torch.ones(w.shape[1], dtype=torch.float64) + torch.linspace(0, 1, w.shape[1], dtype=torch.float64)
    for _ in range(iters):
        x = w.T @ (w @ x)
        x = x / x.norm()
    return float((w @ x).norm() / x.norm())


def _conv_kwargs(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}


def _random_configs(n: int, seed: int) -> List[Dict[str, Any]]:
    """Random small conv layers, skipping geometries with an empty output."""
    rng = random.Random(seed)
    out: List[Dict[str, Any]] = []
    while len(out) < n:
        groups = rng.choice([1, 2])
        c_in = groups * rng.randint(1, 8 // groups)
        c_out = groups * rng.randint(1, 8 // groups)
        kh, kw = rng.randint(1, 5), rng.randint(1, 5)
        stride = (rng.randint(1, 2), rng.randint(1, 2))
        padding = (rng.randint(0, 2), rng.randint(0, 2))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        h, w = rng.randint(1, 12), rng.randint(1, 12)
        if h + 2 * padding[0] < dilation[0] * (kh - 1) + 1:
            continue
        if w + 2 * padding[1] < dilation[1] * (kw - 1) + 1:
            continue
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        weight = torch.randn(c_out, c_in // groups, kh, kw, generator=gen)
        kind = rng.random()
        if kind < 0.25:
            # Positive kernels concentrate energy at frequency 0, where the
            # zero-padded and circular operators differ most.
            weight = weight.abs()
        elif kind < 0.35:
            weight = (weight > 0.3).to(torch.float32)
        out.append(
            dict(
                weight=weight,
                input_shape=(c_in, h, w),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
            )
        )
    return out


# ---------------------------------------------------------------------------
# random small layers: soundness of every method, tightness of the default
# ---------------------------------------------------------------------------

RANDOM_CONFIGS = _random_configs(200, seed=1234)


def test_random_layers_sound_and_tight() -> None:
    ratios: Dict[str, List[float]] = {m: [] for m in METHODS}
    for cfg in RANDOM_CONFIGS:
        kw = _conv_kwargs(cfg)
        weight, shape = cfg["weight"], cfg["input_shape"]
        mat = dense_conv_matrix(weight, shape, **kw)
        # The library's dense matrix must be the conv itself (entries are exact weight copies).
        x = torch.randn(1, *shape, dtype=torch.float64)
        y = F.conv2d(x, weight.double(), None, **kw)
        assert mat.shape == (y.numel(), x.numel())
        torch.testing.assert_close(mat @ x.flatten(), y.flatten(), rtol=1e-12, atol=1e-12)
        truth_matrix = _conv_matrix(weight, shape, **kw)
        assert torch.equal(mat, truth_matrix)
        true = float(torch.linalg.svdvals(truth_matrix)[0])
        for method in METHODS:
            bound = conv2d_norm_bound(weight, shape, method=method, **kw)
            assert bound >= true, (method, bound, true, cfg)
            ratios[method].append(bound / true if true > 0 else 1.0)
        assert ratios["auto"][-1] <= 1.3, (ratios["auto"][-1], cfg)
    # The dense method is exact up to its documented ~1e-9 margin.
    assert max(ratios["dense"]) <= 1 + 1e-8


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_dense_conv_matrix_string_padding_and_groups() -> None:
    gen = torch.Generator().manual_seed(0)
    for padding, k, groups in (("same", 4, 1), ("same", 3, 2), ("valid", 3, 2), ("same", 2, 4)):
        weight = torch.randn(4, 4 // groups, k, k, generator=gen, dtype=torch.float64)
        x = torch.randn(1, 4, 7, 6, generator=gen, dtype=torch.float64)
        mat = dense_conv_matrix(weight, (4, 7, 6), padding=padding, groups=groups)
        y = F.conv2d(x, weight, padding=padding, groups=groups)
        torch.testing.assert_close(mat @ x.flatten(), y.flatten(), rtol=1e-12, atol=1e-12)
        true = _truth(weight, (4, 7, 6), padding=padding, groups=groups)
        for method in METHODS:
            b = conv2d_norm_bound(weight, (4, 7, 6), padding=padding, groups=groups, method=method)
            assert b >= true, (padding, k, groups, method)


def test_exhaustive_axis_geometry() -> None:
    """Every 1-D geometry (size, kernel, stride, dilation, padding) in a small
    range, along H with W trivial and along W with H trivial: stresses the
    polyphase, dead-tap and circular-period logic of the FFT bound."""
    gen = torch.Generator().manual_seed(7)
    for n, k, s, d, p in itertools.product(range(1, 8), range(1, 5), range(1, 4), (1, 2), range(0, 4)):
        if n + 2 * p < d * (k - 1) + 1:
            continue
        kern = torch.rand(2, 2, k, generator=gen, dtype=torch.float64) + 0.1
        for axis in (0, 1):
            weight = kern[..., :, None] if axis == 0 else kern[..., None, :]
            shape = (2, n, 1) if axis == 0 else (2, 1, n)
            kw: Dict[str, Any] = dict(
                stride=(s, 1) if axis == 0 else (1, s),
                padding=(p, 0) if axis == 0 else (0, p),
                dilation=(d, 1) if axis == 0 else (1, d),
            )
            true = _truth(weight, shape, **kw)
            for method in ("fft", "fft_fold_h", "fft_fold_w"):
                b = conv2d_norm_bound(weight, shape, method=method, **kw)
                assert b >= true, (n, k, s, d, p, axis, method, b, true)


# ---------------------------------------------------------------------------
# adversarial cases
# ---------------------------------------------------------------------------


def _check_all(weight: torch.Tensor, shape: Tuple[int, int, int], tight: float = 1.3, **kw: Any) -> Dict[str, float]:
    true = _truth(weight, shape, **kw)
    res = {}
    for method in METHODS:
        b = conv2d_norm_bound(weight, shape, method=method, **kw)
        assert b >= true, (method, b, true)
        res[method] = b
    assert res["auto"] <= tight * true + 1e-12
    res["true"] = true
    return res


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_single_spike_kernel(stride: int, padding: int) -> None:
    # A one-tap kernel selects pixels: norm == |tap| whenever a pixel is read.
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 2, 1] = -2.5
    res = _check_all(weight, (1, 6, 5), stride=stride, padding=padding)
    assert res["true"] == pytest.approx(2.5, rel=1e-12)
    for method in METHODS:
        assert res[method] == pytest.approx(2.5, rel=1e-8), method


@pytest.mark.parametrize("size,padding,stride", [((8, 8), 1, 1), ((5, 7), 0, 1), ((3, 3), 1, 1), ((9, 6), 2, 2), ((12, 12), 1, 2)])
def test_all_ones_kernel(size: Tuple[int, int], padding: int, stride: int) -> None:
    weight = torch.ones(3, 2, 3, 3)
    _check_all(weight, (2, *size), padding=padding, stride=stride)


@pytest.mark.parametrize("h,k,p", [(8, 3, 1), (9, 4, 0), (10, 5, 2), (7, 2, 0), (6, 3, 0)])
def test_stride2_uneven_remainder(h: int, k: int, p: int) -> None:
    assert (h + 2 * p - k) % 2 == 1  # the last input row/col is never read
    gen = torch.Generator().manual_seed(h * 100 + k * 10 + p)
    weight = torch.randn(4, 3, k, k, generator=gen).abs()
    _check_all(weight, (3, h, h + 1), stride=2, padding=p)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 0), (1, 1), (2, 1), (3, 2)])
def test_one_by_one_conv_equals_matrix_norm(stride: int, padding: int) -> None:
    gen = torch.Generator().manual_seed(3)
    mat = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    ref = float(torch.linalg.matrix_norm(mat, ord=2))
    weight = mat[:, :, None, None]
    for method in METHODS:
        b = conv2d_norm_bound(weight, (5, 6, 4), stride=stride, padding=padding, method=method)
        assert ref * (1 - REL_TOL) <= b <= ref * (1 + 1e-8), method


@pytest.mark.parametrize(
    "shape,k,p,d",
    [((2, 2, 2), 5, 2, 1), ((2, 1, 1), 3, 1, 1), ((2, 1, 3), 5, 2, 1), ((2, 2, 3), 3, 2, 2), ((2, 3, 2), 4, 2, 1)],
)
def test_input_smaller_than_kernel(shape: Tuple[int, int, int], k: int, p: int, d: int) -> None:
    gen = torch.Generator().manual_seed(k * 10 + p)
    weight = torch.rand(3, 2, k, k, generator=gen) + 0.5
    _check_all(weight, shape, padding=p, dilation=d)


def test_padding_larger_than_input_and_zero_operator() -> None:
    weight = torch.ones(2, 2, 1, 1)
    # 1x1 kernel with padding 2 on a 1x1 input: 5x5 output, one pixel read.
    _check_all(weight, (2, 1, 1), padding=2)
    _check_all(weight, (2, 1, 1), padding=2, stride=2)
    # stride 3, padding 1, 1x1 input: the single output reads only padding.
    for method in METHODS:
        assert conv2d_norm_bound(weight, (2, 1, 1), stride=3, padding=1, method=method) == 0.0
    assert _truth(weight, (2, 1, 1), stride=3, padding=1) == 0.0


def test_depthwise_and_zero_weight() -> None:
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(6, 1, 3, 3, generator=gen)
    _check_all(weight, (6, 7, 7), padding=1, groups=6)
    _check_all(weight, (6, 8, 8), padding=1, groups=6, stride=2)
    zero = torch.zeros(4, 2, 3, 3)
    for method in METHODS:
        assert conv2d_norm_bound(zero, (2, 5, 5), padding=1, method=method) == 0.0


def test_dtype_and_grad_do_not_matter() -> None:
    gen = torch.Generator().manual_seed(5)
    w32 = torch.randn(4, 3, 3, 3, generator=gen, requires_grad=True)
    b32 = conv2d_norm_bound(w32, (3, 20, 20), padding=1, method="fft")
    b64 = conv2d_norm_bound(w32.detach().double(), (3, 20, 20), padding=1, method="fft")
    assert b32 == b64
    w16 = torch.randn(4, 3, 3, 3, generator=gen).half()
    assert conv2d_norm_bound(w16, (3, 8, 8), padding=1) == conv2d_norm_bound(w16.double(), (3, 8, 8), padding=1)


def _power_iteration(weight: torch.Tensor, shape: Tuple[int, int, int], iters: int, **kw: Any) -> float:
    """A lower bound on the true norm (Rayleigh quotient of the real operator)."""
    w = weight.double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, *shape, generator=gen, dtype=torch.float64)
    sigma = 0.0
    for _ in range(iters):
        x = x / x.norm()
        y = F.conv2d(x, w, **kw)
        sigma = float(y.norm())
        x = torch.autograd.grad(F.conv2d(x.requires_grad_(), w, **kw), x, y)[0]
    return sigma


@pytest.mark.parametrize(
    "c_in,c_out,k,s,p,n",
    [(3, 16, 3, 1, 1, 32), (16, 16, 3, 2, 1, 32), (16, 32, 3, 1, 1, 16), (32, 32, 4, 2, 0, 14), (32, 32, 3, 1, 1, 4)],
)
def test_realistic_geometry_against_power_iteration(c_in: int, c_out: int, k: int, s: int, p: int, n: int) -> None:
    # Too large for a dense truth: compare with a power-iteration lower bound.
    gen = torch.Generator().manual_seed(c_in + n)
    weight = torch.randn(c_out, c_in, k, k, generator=gen) / math.sqrt(c_in * k * k)
    est = _power_iteration(weight, (c_in, n, n), 60, stride=s, padding=p)
    for method in ("auto", "fft"):
        b = conv2d_norm_bound(weight, (c_in, n, n), stride=s, padding=p, method=method)
        assert est <= b, method
        assert b <= 1.15 * est, (method, b / est)


# ---------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (10, 3), (3, 10), (64, 64), (300, 17)])
def test_linear_random(shape: Tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = torch.randn(*shape, generator=gen)
    # Soundness against a lower bound from a power iteration (no SVD involved) ...
    lower = _matrix_power_lower(w)
    b = linear_norm_bound(w)
    assert lower <= b
    # ... and against the top eigenvalue of the Gram matrix (a different LAPACK algorithm).
    gram_truth = math.sqrt(float(torch.linalg.eigvalsh(w.double().T @ w.double())[-1]))
    assert gram_truth * (1 - REL_TOL) <= b <= gram_truth * (1 + 1e-8)
    assert spectral_norm_dense(w) == pytest.approx(gram_truth, rel=1e-12)
    # Any vector gives a rigorous lower bound ||Wx|| / ||x||.
    x = torch.randn(shape[1], 5, generator=gen, dtype=torch.float64)
    ratios = (w.double() @ x).norm(dim=0) / x.norm(dim=0)
    assert float(ratios.max()) <= b


@pytest.mark.parametrize("cond", [1.0, 1e6, 1e12, 1e16])
def test_linear_ill_conditioned(cond: float) -> None:
    gen = torch.Generator().manual_seed(int(math.log10(cond)))
    u, _ = torch.linalg.qr(torch.randn(40, 20, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), 20, dtype=torch.float64) * 3.0
    w = u @ torch.diag(s) @ v.T
    ref = float(torch.linalg.svdvals(w)[0])
    b = linear_norm_bound(w)
    assert ref <= b <= ref * (1 + 1e-8)
    assert b >= 3.0 * (1 - 1e-13)  # the designed top singular value


def test_linear_rank_one_and_zero() -> None:
    a = torch.arange(1.0, 6.0, dtype=torch.float64)
    w = torch.outer(a, a.flip(0))
    exact = float(a.norm() ** 2)
    b = linear_norm_bound(w)
    assert exact * (1 - 1e-15) <= b <= exact * (1 + 1e-8)
    assert linear_norm_bound(torch.zeros(3, 4)) == 0.0


# ---------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=torch.ones(2, 2, 3)), "weight"),
        (dict(weight=torch.ones(2, 2, 3, 3, dtype=torch.int64)), "weight"),
        (dict(weight=torch.full((2, 2, 3, 3), float("nan"))), "weight"),
        (dict(weight=torch.ones(0, 2, 3, 3)), "weight"),
        (dict(input_shape=(3, 8, 8)), "input_shape"),
        (dict(input_shape=(2, 8)), "input_shape"),
        (dict(input_shape=(2, 0, 8)), "input_shape"),
        (dict(weight=torch.ones(3, 1, 3, 3), groups=2), "groups"),
        (dict(weight=torch.ones(2, 1, 3, 3), input_shape=(3, 8, 8), groups=2), "groups|input_shape"),
        (dict(groups=0), "groups"),
        (dict(padding=-1), "padding"),
        (dict(padding=(1, -2)), "padding"),
        (dict(padding="full"), "padding"),
        (dict(padding="same", stride=2), "padding"),
        (dict(stride=0), "stride"),
        (dict(stride=(1, 2, 3)), "stride"),
        (dict(dilation=0), "dilation"),
        (dict(input_shape=(2, 2, 8)), "input_shape"),
        (dict(input_shape=(2, 8, 1), dilation=2, padding=1), "input_shape"),
        (dict(padding_mode="reflect"), "padding_mode"),
        (dict(method="power"), "method"),
        (dict(extra_periods=-1), "extra_periods"),
    ],
)
def test_conv_bad_arguments(kwargs: Dict[str, Any], match: str) -> None:
    args: Dict[str, Any] = dict(weight=torch.ones(2, 2, 3, 3), input_shape=(2, 8, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        conv2d_norm_bound(args.pop("weight"), args.pop("input_shape"), **args)


def test_dense_matrix_bad_arguments() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        dense_conv_matrix(torch.ones(2, 2, 3, 3), (2, 1, 1))
    with pytest.raises(ValueError, match="weight"):
        dense_conv_matrix(torch.ones(2, 3, 3), (2, 5, 5))


@pytest.mark.parametrize(
    "weight",
    [torch.ones(3), torch.ones(2, 2, 2), torch.ones(2, 3, dtype=torch.int32), torch.tensor([[1.0, float("inf")]]), torch.ones(0, 3)],
)
def test_linear_bad_arguments(weight: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="weight"):
        linear_norm_bound(weight)


def test_spectral_norm_dense_bad_arguments() -> None:
    with pytest.raises(ValueError, match="matrix"):
        spectral_norm_dense(torch.ones(2, 2, 2))


# ---------------------------------------------------------------------------
# longer property test
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_random_layers_many_seeds() -> None:
    for cfg in _random_configs(1500, seed=99):
        kw = _conv_kwargs(cfg)
        true = _truth(cfg["weight"], cfg["input_shape"], **kw)
        for method in METHODS:
            b = conv2d_norm_bound(cfg["weight"], cfg["input_shape"], method=method, **kw)
            assert b >= true, (method, b, true, cfg)
            if method == "auto":
                assert b <= 1.3 * true + 1e-12, (b, true, cfg)


@pytest.mark.parametrize("scale", [1e-160, 1e-40, 1e40, 1e150])
def test_extreme_weight_scales(scale: float) -> None:
    # The bound is homogeneous: tiny or huge float64 weights must neither
    # underflow to a too-small bound nor overflow.
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    for method in METHODS:
        ref = conv2d_norm_bound(weight, (3, 9, 9), padding=1, method=method)
        b = conv2d_norm_bound(weight * scale, (3, 9, 9), padding=1, method=method)
        assert b == pytest.approx(ref * scale, rel=1e-12), method
    lin = torch.randn(20, 10, generator=gen, dtype=torch.float64)
    assert linear_norm_bound(lin * scale) == pytest.approx(linear_norm_bound(lin) * scale, rel=1e-12)


# ---------------------------------------------------------------------------
# extreme magnitudes: subnormal and huge weights (issue 13)
# ---------------------------------------------------------------------------


def _times_pow2(w: torch.Tensor, k: int) -> torch.Tensor:
    """``w * 2**k`` exactly for integer-valued ``w`` with |w| < 2**14 (two steps keep 2**k normal)."""
    half = k // 2
    return w * 2.0**half * 2.0 ** (k - half)


@pytest.mark.parametrize("k", [-1070, -1060, -600, 985])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_bound_subnormal_and_huge_weights(k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    wi = torch.randint(-12000, 12001, (6, 5), generator=g).to(torch.float64)
    w = _times_pow2(wi, k)
    assert torch.equal(_times_pow2(w, -k), wi)  # the scaling was exact
    # ||W|| = ||Wi|| * 2**k exactly (homogeneity); ||Wi|| from the Gram matrix's top eigenvalue.
    exact = math.sqrt(float(torch.linalg.eigvalsh(wi.T @ wi)[-1]))
    b = linear_norm_bound(w)
    assert math.isfinite(b)
    scaled_back = math.ldexp(b, -k)  # exact (a power of two, result normal)
    assert scaled_back >= exact * (1 + REL_TOL)
    # tight up to 1e-6 and, for a subnormal result, two steps of its resolution 2**-1074
    assert scaled_back <= exact * (1 + 1e-6) + 2.0 ** (-1073 - k)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [-1070, -1055, 985])
def test_conv_bound_subnormal_and_huge_weights(method: str, k: int) -> None:
    g = torch.Generator().manual_seed(3)
    wi = torch.randint(-12000, 12001, (3, 2, 3, 3), generator=g).to(torch.float64)
    w = _times_pow2(wi, k)
    assert torch.equal(_times_pow2(w, -k), wi)
    exact = _truth(wi, (2, 6, 6), padding=1)
    b = conv2d_norm_bound(w, (2, 6, 6), padding=1, method=method)  # no OverflowError
    assert math.isfinite(b)
    assert math.ldexp(b, -k) >= exact * (1 + REL_TOL)


def test_bound_of_a_subnormal_weight_is_positive_and_of_zero_is_zero() -> None:
    w = torch.zeros(2, 2, dtype=torch.float64)
    assert linear_norm_bound(w) == 0.0
    w[0, 0] = 5e-324  # the smallest subnormal: ||W|| = 5e-324 exactly
    assert linear_norm_bound(w) >= 5e-324
    assert conv2d_norm_bound(w.reshape(1, 1, 2, 2), (1, 3, 3), method="fft") >= 5e-324
